"""Every text of a phantom case, written from its findings: report, VQA, REC/REG, seg and RefSeg.

The templates follow the style of M3D's ``prompt_templates.py`` (section 2.4 of M3D_FACTS) in our
own words: a caption prompt asks for the findings, REC/REG wrap boxes in ``<bx_start>``/``<bx_end>``,
seg answers hold exactly one ``[SEG]`` and negatives none. Wording is chosen with the numpy
``Generator`` passed in, so a seed gives the same texts. Templates are module-level tuples so that
a notebook can show, count or extend them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m3d_lite.data.phantom import LESION_KINDS, PHASES, PLANES, SUBLOCATIONS, WINDOW_NAMES, Findings, Lesion

LETTERS = "ABCD"
NO_ABNORMALITY = "No abnormality"

# ---------------------------------------------------------------------------------------------
# Definitions of every class and lesion kind (M3D's term_dict: used for description prompts).
TERM_DICTIONARY: dict[str, list[str]] = {
    "liver": [
        "The largest solid organ of the abdomen, in the right upper quadrant under the diaphragm.",
        "A wedge-shaped organ that makes bile and stores nutrients, with a large right and small left lobe.",
        "The organ filling the right upper abdomen, homogeneous on CT, brightest in the portal venous phase.",
    ],
    "spleen": [
        "A lymphoid organ in the left upper quadrant, posterolateral to the stomach, that filters the blood.",
        "The crescent-shaped organ under the left ribs, enhancing in stripes in the arterial phase.",
    ],
    "right kidney": [
        "The right bean-shaped retroperitoneal organ filtering blood into urine, lower than the left.",
        "The kidney on the patient's right, beside the spine, below the liver; its cortex enhances brightly.",
    ],
    "left kidney": [
        "The left bean-shaped retroperitoneal organ that filters blood into urine, near the spleen.",
        "The kidney on the patient's left, beside the spine, whose renal sinus faces the midline.",
    ],
    "pancreas": [
        "A lobulated gland lying across the upper abdomen behind the stomach, with head, body and tail.",
        "The gland that makes digestive enzymes and insulin; head by the duodenum, tail near the spleen.",
    ],
    "aorta": [
        "The main artery of the body, a round tube just in front of and slightly left of the spine.",
        "The large artery that carries blood from the heart; it is brightest on CT in the arterial phase.",
    ],
    "inferior vena cava": [
        "The large vein that returns blood from the lower body, to the right of the aorta.",
        "An oval vessel in front of the right side of the spine, passing through the back of the liver.",
    ],
    "stomach": [
        "The hollow digestive organ of the left upper abdomen, holding fluid and an anterior air pocket.",
        "A J-shaped muscular sac between the oesophagus and the duodenum, beneath the left diaphragm.",
    ],
    "gallbladder": [
        "A small pear-shaped sac under the liver that stores bile and has near-water attenuation on CT.",
        "The bile reservoir at the inferior surface of the liver, with fundus, body and neck.",
    ],
    "vertebrae": [
        "The bony segments of the spine in the posterior midline, the densest structures of the abdomen.",
        "Stacked bones with a cylindrical body and a posterior arch that protects the spinal canal.",
    ],
    "lungs": [
        "The air-filled organs of breathing; an abdominal scan shows only their bases above the diaphragm.",
        "Spongy organs of very low attenuation at the top of the scan, around the domes of the diaphragm.",
    ],
    "cyst": [
        "A thin-walled sac of fluid with water attenuation that does not enhance after contrast.",
        "A round, sharply marginated lesion of near 0-20 HU, usually benign.",
    ],
    "solid mass": [
        "A lesion of soft-tissue attenuation that enhances after contrast and may be a tumour.",
        "A space-occupying lesion made of tissue rather than fluid, often needing further work-up.",
    ],
    "calcification": [
        "A deposit of calcium in tissue, much denser than soft tissue (over 300 HU) on CT.",
        "A very bright focus on CT, often the sign of an old, healed inflammation.",
    ],
    "stone": [
        "A hard concretion, such as a kidney stone or a gallstone, of calcific density on CT.",
        "A dense calculus inside a hollow system that can block its outflow and cause colic.",
    ],
}

# ---------------------------------------------------------------------------------------------
# Report templates.
_TECHNIQUE = (
    "{Plane} CT images of the abdomen {phase_phrase}, displayed in a {window} window.",
    "CT of the upper abdomen {phase_phrase}; {plane} images reviewed in a {window} window.",
    "{Plane} abdominal CT {phase_phrase}, shown with a {window} window.",
    "Technique: {plane} CT of the abdomen {phase_phrase}. Window: {window}.",
)
_PHASE_PHRASES = {
    "non-contrast": ("without intravenous contrast", "without contrast"),
    "arterial": ("in the arterial phase", "in the late arterial phase after intravenous contrast"),
    "portal venous": ("in the portal venous phase", "after intravenous contrast, portal venous phase"),
    "delayed": ("in the delayed phase", "in the delayed (excretory) phase after intravenous contrast"),
}
_PHASE_SIGNS = {
    "non-contrast": ("No intravenous contrast is present in the vessels.", "The vessels are unopacified."),
    "arterial": (
        "The aorta is densely opacified and the renal cortex enhances more than the medulla.",
        "There is bright arterial enhancement of the aorta with corticomedullary differentiation.",
    ),
    "portal venous": (
        "The liver, spleen and inferior vena cava enhance homogeneously.",
        "The portal venous phase shows uniform enhancement of the liver and kidneys.",
    ),
    "delayed": (
        "Excreted contrast opacifies the renal collecting systems.",
        "Contrast is seen in both renal collecting systems.",
    ),
}
_LESION_SENTENCES = (
    "A {size} mm {kind_phrase} of {attenuation} is seen in the {place} (about {hu} HU).",
    "There is a {kind_phrase} in the {place} measuring {size} mm, of {attenuation}.",
    "In the {place} there is a {size} mm {kind_phrase} of {attenuation} (approximately {hu} HU).",
    "The {place} contains a {size} mm {kind_phrase} of {attenuation}.",
)
_NORMAL_SENTENCES = (
    "The {organs} are unremarkable.",
    "No focal abnormality of the {organs}.",
    "The {organs} appear normal in size and attenuation.",
)
_NO_LESION_SENTENCES = (
    "No focal lesion is identified.",
    "No focal abnormality is seen in the solid organs.",
    "There is no mass, cyst or calcification.",
)
_BACKGROUND_SENTENCES = (
    "The visualised lung bases are clear. The vertebrae show no destructive lesion.",
    "Lung bases are clear and the spine is intact.",
    "No abnormality of the visualised lung bases or the vertebral bodies.",
)
_CHOLECYSTECTOMY_SENTENCES = ("The gallbladder is surgically absent.", "Status post cholecystectomy.")
_KIND_PHRASES = {
    "cyst": ("cyst", "cystic lesion", "simple cyst"),
    "solid mass": ("solid mass", "solid lesion", "soft-tissue mass"),
    "calcification": ("calcification", "calcified focus", "coarse calcification"),
    "stone": ("stone", "calculus", "calcified stone"),
}

# ---------------------------------------------------------------------------------------------
# VQA templates (question type -> question wordings).
_PLANE_QUESTIONS = (
    "In which plane is this CT image displayed?",
    "What is the acquisition plane of this scan?",
    "Which imaging plane does this image show?",
)
_PHASE_QUESTIONS = (
    "In which contrast phase was this CT scan acquired?",
    "What is the contrast phase of this CT image?",
    "Which phase of contrast enhancement does this scan show?",
)
_WINDOW_QUESTIONS = (
    "Which window setting is used to display this image?",
    "What CT window is this image shown in?",
)
_LESION_ORGAN_QUESTIONS = (
    "Which organ contains the {kind}?",
    "In which organ is the {kind} located?",
    "Which organ shows the {kind} in this image?",
)
_POSITION_QUESTIONS = (  # (question, answer organ); every answer is present in a case (gallbladder excluded)
    ("Which organ occupies most of the right upper abdomen in this image?", "liver"),
    ("Which organ lies in the left upper abdomen, posterolateral to the stomach?", "spleen"),
    ("Which vessel runs just in front of the spine, slightly to the left?", "aorta"),
    ("Which structure in the posterior midline is the densest in the image?", "vertebrae"),
    ("Which air-filled organ is seen above the diaphragm at the top of the scan?", "lungs"),
    ("Which hollow organ in the left upper abdomen contains fluid and air?", "stomach"),
)
_KIND_QUESTIONS = (
    "What type of lesion is seen in the {organ}?",
    "What abnormality is present in the {organ}?",
    "Which kind of lesion does the {organ} show?",
)
_NO_LESION_QUESTIONS = (
    "What abnormality is seen in this scan?",
    "Which lesion is present in the abdominal organs?",
    "What focal abnormality does this CT show?",
)
_LOCATION_QUESTIONS = (
    "Where in the {organ} is the {kind} located?",
    "In which part of the {organ} is the {kind}?",
    "Which part of the {organ} contains the {kind}?",
)

# ---------------------------------------------------------------------------------------------
# Caption, REC, REG and seg templates ({} is a class name, a definition or a box text).
CAPTION_PROMPTS = (
    "Describe the findings of this CT scan.",
    "Please write the findings section of a radiology report for this image.",
    "What are the findings in this abdominal CT?",
    "Generate a report of the findings you see in this volume.",
    "Can you describe this CT image as a radiologist would?",
    "Write a short findings paragraph for this scan.",
    "Summarise the imaging findings of this CT.",
    "Report on this abdominal CT, including the phase and any lesion.",
)
REC_QUESTIONS = (
    "Where is the {} in this image? Please output the box.",
    "Can you find the {} and give its bounding box?",
    "Locate the {} in this CT and answer with box coordinates.",
    "Please output the bounding box of the {}.",
    "Find the {} in this volume. Answer with a box.",
)
REC_DESCRIPTION_QUESTIONS = (
    "Description: {} Please find this target and answer with its box.",
    "{} Where is it in this image? Please output the box.",
    "Find the structure described here and output its bounding box: {}",
)
REC_ANSWERS = (
    "Coordinates are {box}.",
    "Sure, the bounding box is {box}.",
    "The {name} is located at {box}.",
    "Here it is: {box}.",
)
REC_DESCRIPTION_ANSWERS = (
    "The target is the {name} and its box is {box}.",
    "This describes the {name}, found at {box}.",
    "It is the {name}; coordinates are {box}.",
)
REG_QUESTIONS = (
    "What structure is inside the box {}?",
    "Which organ lies within the coordinates {}?",
    "Please identify the target in the region {}.",
    "What do you see in the box {}?",
)
REG_ANSWERS = ("The target is the {name}.", "It is the {name}.", "This region contains the {name}.")
REG_DESCRIPTION_ANSWERS = ("The target is the {name}: {definition}", "{name_cap}. {definition}")
NEGATIVE_ANSWERS = (
    "Sorry, there is no {} in this image.",
    "There is no {} in this scan.",
    "The {} cannot be found in this image.",
    "No {} is visible here.",
)
SEG_QUESTIONS = (
    "Can you segment the {} in this image?",
    "Please segment the {}.",
    "Segment the {} in this CT scan.",
    "What is the segmentation of the {}?",
    "Could you outline the {} in this volume?",
)
SEG_DESCRIPTION_QUESTIONS = (
    "{} Please answer and segment.",
    "Description: {} Please segment the target.",
    "{} Which structure is this? Please segment it.",
)
# Every answer names its target right before [SEG]: the state that predicts [SEG] (the mask prompt) then
# carries which organ or lesion was asked for. M3D's "It is [SEG]." leaves it to the LLM to carry the name
# from the question; in SmolLM2-135M the organ is then 4 % of that state's variance, against 22 % here
# (benchmarks/seg_prompt_probe.py), and the masks stay empty.
M3D_SEG_ANSWERS = ("It is [SEG].", "Sure, the segmentation is [SEG].", "Here is the mask: [SEG].", "[SEG].")
SEG_ANSWERS = ("The {} is [SEG].", "Sure, the {} is [SEG].", "This is the {}: [SEG].", "The {}: [SEG].")
SEG_DESCRIPTION_ANSWERS = (
    "The target is the {} and the segmentation is [SEG].",
    "It is the {}, segmented as [SEG].",
    "This is the {}: [SEG].",
)

# ---------------------------------------------------------------------------------------------
# Referring segmentation: description-based (0) and reasoning-based (1) questions per lesion.
REFSEG_DESCRIPTION_QUESTIONS = (
    "Please segment the {kind} in the {place}.",
    "Can you segment the {size} mm lesion of {attenuation} in the {organ}?",
    "Where is the {kind} of the {organ}? Please output its segmentation.",
    "Segment the lesion of {attenuation} in the {place} on this {phase} scan.",
)
REFSEG_DESCRIPTION_ANSWERS = (
    "It is the {size} mm {kind} in the {place}: [SEG].",
    "Sure, the {kind} in the {place} is [SEG].",
    "The lesion, a {kind} of {attenuation} in the {place}, is [SEG].",
)
REFSEG_REASONING_QUESTIONS = (
    "The patient {clue}. Which region in this scan could explain it? Please segment it.",
    "A patient {clue}. What finding is most relevant? Please segment it.",
    "The patient {clue}. Please find and segment the responsible region.",
    "Given that the patient {clue}, which area should be examined? Segment it.",
)
REFSEG_REASONING_ANSWERS = (
    "The {kind} in the {place} [SEG] could explain it: {why}.",
    "This is most likely due to the {kind} in the {place}, segmented as [SEG]; {why}.",
    "The relevant region is the {size} mm {kind} in the {place}, [SEG]: {why}.",
)
_CLUES: dict[tuple[str, str], tuple[str, str]] = {  # (kind, organ group) -> (clue, explanation)
    ("stone", "kidney"): (
        "has flank pain and blood in the urine",
        "a dense stone in the renal collecting system can block urine flow and cause renal colic",
    ),
    ("stone", "gallbladder"): (
        "has right upper abdominal pain after fatty meals",
        "a gallstone can block the cystic duct and cause biliary colic",
    ),
    ("solid mass", "liver"): (
        "has cirrhosis and a rising alpha-fetoprotein",
        "an enhancing solid liver mass is suspicious for hepatocellular carcinoma",
    ),
    ("solid mass", "kidney"): (
        "has painless blood in the urine",
        "a solid renal mass is suspicious for renal cell carcinoma",
    ),
    ("solid mass", "pancreas"): (
        "has painless jaundice and weight loss",
        "a solid pancreatic mass can obstruct the bile duct and suggests a tumour",
    ),
    ("solid mass", "spleen"): (
        "has fullness in the left upper abdomen",
        "a solid splenic mass may be lymphoma or a metastasis",
    ),
    ("cyst", "pancreas"): (
        "had a cystic pancreatic lesion reported on ultrasound",
        "a pancreatic cyst needs follow-up to exclude a cystic neoplasm",
    ),
    ("calcification", "pancreas"): (
        "has chronic epigastric pain and drinks heavily",
        "pancreatic calcifications are a sign of chronic pancreatitis",
    ),
}
_DEFAULT_CLUES = {
    "cyst": (
        "had an incidental lesion reported on ultrasound",
        "a fluid-attenuation, non-enhancing lesion is a simple cyst, usually benign",
    ),
    "calcification": (
        "had tuberculosis many years ago",
        "dense calcified foci are typical of old healed granulomas",
    ),
}


@dataclass
class VQAItem:
    """One M3D-VQA multiple-choice item: type 1..5, question, four choices (``NA`` padded), answer letter."""

    question_type: int
    question: str
    choices: tuple[str, str, str, str]
    answer_letter: str

    @property
    def answer(self) -> str:
        """The text of the correct choice."""
        return self.choices[LETTERS.index(self.answer_letter)]


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _place(lesion: Lesion) -> str:
    """Readable location, e.g. 'right lobe of the liver', 'head of the pancreas'."""
    return f"{lesion.sublocation} of the {lesion.organ}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption_prompt(rng: np.random.Generator) -> str:
    """A request for the report (the question of the caption task)."""
    return _pick(rng, CAPTION_PROMPTS)


def report(findings: Findings, rng: np.random.Generator) -> str:
    """A findings paragraph: technique (plane, phase, window), phase signs, each lesion, normal organs."""
    technique = _pick(rng, _TECHNIQUE).format(
        Plane=findings.plane.capitalize(),
        plane=findings.plane,
        window=findings.window,
        phase_phrase=_pick(rng, _PHASE_PHRASES[findings.phase]),
    )
    sentences = [technique, _pick(rng, _PHASE_SIGNS[findings.phase])]
    for lesion in findings.lesions:
        sentences.append(
            _pick(rng, _LESION_SENTENCES).format(
                size=lesion.size_mm,
                kind_phrase=_pick(rng, _KIND_PHRASES[lesion.kind]),
                place=_place(lesion),
                attenuation=lesion.attenuation,
                hu=lesion.hu,
            )
        )
    if not findings.lesions:
        sentences.append(_pick(rng, _NO_LESION_SENTENCES))
    with_lesion = {lesion.organ for lesion in findings.lesions}
    solid = [
        o
        for o in ("liver", "spleen", "pancreas", "right kidney", "left kidney", "gallbladder")
        if o in findings.organs and o not in with_lesion
    ]
    if solid:
        text = _pick(rng, _NORMAL_SENTENCES).format(organs=_join(solid))
        sentences.append(text[0].upper() + text[1:])
    if "gallbladder" not in findings.organs:
        sentences.append(_pick(rng, _CHOLECYSTECTOMY_SENTENCES))
    sentences.append(_pick(rng, _BACKGROUND_SENTENCES))
    return " ".join(sentences)


def _item(rng: np.random.Generator, qtype: int, question: str, answer: str, distractors) -> VQAItem:
    """Shuffle ``answer`` with up to 3 distinct ``distractors`` into A-D, padding with 'NA'."""
    others = [d for d in dict.fromkeys(distractors) if d != answer]
    others = [others[i] for i in rng.permutation(len(others))[:3]]
    options = [answer, *others]
    options = [options[i] for i in rng.permutation(len(options))]
    options += ["NA"] * (4 - len(options))
    return VQAItem(qtype, question, tuple(options), LETTERS[options.index(answer)])


def vqa_items(findings: Findings, rng: np.random.Generator) -> list[VQAItem]:
    """M3D-VQA items for a case: plane, phase, window, organ, abnormality and location questions.

    Every answer follows from the findings (and is visible in the case's series image); each lesion
    gets an abnormality (type 4) and a location (type 5) question; a case without lesions gets a
    type-4 item whose answer is 'No abnormality'.
    """
    items = [
        _item(rng, 1, _pick(rng, _PLANE_QUESTIONS), findings.plane, PLANES),
        _item(rng, 2, _pick(rng, _PHASE_QUESTIONS), findings.phase, PHASES),
        _item(
            rng,
            2,
            _pick(rng, _WINDOW_QUESTIONS),
            f"{findings.window} window",
            [f"{w} window" for w in WINDOW_NAMES],
        ),
    ]
    position = [(q, a) for q, a in _POSITION_QUESTIONS if a in findings.organs]
    question, organ = position[int(rng.integers(len(position)))]
    items.append(_item(rng, 3, question, organ, [a for _, a in _POSITION_QUESTIONS]))
    kinds = [lesion.kind for lesion in findings.lesions]
    lesion_organs = {lesion.organ for lesion in findings.lesions}
    for lesion in findings.lesions:
        if kinds.count(lesion.kind) == 1:  # the kind names the lesion unambiguously
            wrong = [o for o in SUBLOCATIONS if o not in lesion_organs]
            items.append(
                _item(
                    rng, 3, _pick(rng, _LESION_ORGAN_QUESTIONS).format(kind=lesion.kind), lesion.organ, wrong
                )
            )
    for lesion in findings.lesions:  # at most one lesion per organ, so the organ names it
        twin = {"stone": "calcification", "calcification": "stone"}.get(lesion.kind)
        wrong = [k for k in LESION_KINDS if k != twin] + [NO_ABNORMALITY]
        items.append(
            _item(rng, 4, _pick(rng, _KIND_QUESTIONS).format(organ=lesion.organ), lesion.kind, wrong)
        )
        items.append(
            _item(
                rng,
                5,
                _pick(rng, _LOCATION_QUESTIONS).format(organ=lesion.organ, kind=lesion.kind),
                lesion.sublocation,
                SUBLOCATIONS[lesion.organ],
            )
        )
    if not findings.lesions:
        items.append(_item(rng, 4, _pick(rng, _NO_LESION_QUESTIONS), NO_ABNORMALITY, LESION_KINDS))
    return items


def closed_vqa_question(item: VQAItem) -> str:
    """M3D's closed-ended question: ``question + " Choices: A. a B. b C. c D. d"``."""
    a, b, c, d = item.choices
    return f"{item.question} Choices: A. {a} B. {b} C. {c} D. {d}"


def closed_vqa_answer(item: VQAItem) -> str:
    """M3D's closed-ended answer: ``"{letter}. {text}"``."""
    return f"{item.answer_letter}. {item.answer}"


def open_vqa_question(item: VQAItem) -> str:
    """M3D's open-ended question: the question alone."""
    return item.question


def open_vqa_answer(item: VQAItem) -> str:
    """M3D's open-ended answer: the text of the correct choice."""
    return item.answer


def rec_question(name_or_description: str, rng: np.random.Generator, description: bool = False) -> str:
    """REC question: find a class by ``name`` (or by a definition when ``description``) and give its box."""
    return _pick(rng, REC_DESCRIPTION_QUESTIONS if description else REC_QUESTIONS).format(name_or_description)


def rec_answer(box_text: str, name: str, rng: np.random.Generator, description: bool = False) -> str:
    """REC answer holding ``box_text`` (and naming the class when the question was a description)."""
    return _pick(rng, REC_DESCRIPTION_ANSWERS if description else REC_ANSWERS).format(box=box_text, name=name)


def reg_question(box_text: str, rng: np.random.Generator) -> str:
    """REG question: what is inside the box ``box_text``."""
    return _pick(rng, REG_QUESTIONS).format(box_text)


def reg_answer(name: str, rng: np.random.Generator, definition: str | None = None) -> str:
    """REG answer naming ``name`` (followed by ``definition`` when given)."""
    if definition is None:
        return _pick(rng, REG_ANSWERS).format(name=name)
    return _pick(rng, REG_DESCRIPTION_ANSWERS).format(
        name=name, name_cap=name.capitalize(), definition=definition
    )


def negative_answer(name: str, rng: np.random.Generator) -> str:
    """Answer for a class that is absent from the image (no box, no [SEG])."""
    return _pick(rng, NEGATIVE_ANSWERS).format(name)


def seg_question(name: str, rng: np.random.Generator, description: bool = False) -> str:
    """Seg question by class ``name``, or by a definition (pass it as ``name``) when ``description``."""
    return _pick(rng, SEG_DESCRIPTION_QUESTIONS if description else SEG_QUESTIONS).format(name)


def seg_answer(name: str, rng: np.random.Generator, description: bool = False) -> str:
    """Seg answer with exactly one [SEG] (naming ``name`` when the question was a description)."""
    return _pick(rng, SEG_DESCRIPTION_ANSWERS if description else SEG_ANSWERS).format(name)


def refseg_qas(lesion: Lesion, findings: Findings, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """Six (question_type, question, answer) rows for one lesion: 3 description-based (0), 3 reasoning (1).

    Answers contain exactly one [SEG] and an explanation, as M3D-RefSeg's do.
    """
    group = lesion.organ.split()[-1]
    clue, why = _CLUES.get((lesion.kind, group)) or _DEFAULT_CLUES[lesion.kind]
    fields = dict(
        kind=lesion.kind,
        organ=lesion.organ,
        place=_place(lesion),
        size=lesion.size_mm,
        attenuation=lesion.attenuation,
        phase=findings.phase,
        clue=clue,
        why=why,
    )
    rows = []
    for qtype, questions, answers in (
        (0, REFSEG_DESCRIPTION_QUESTIONS, REFSEG_DESCRIPTION_ANSWERS),
        (1, REFSEG_REASONING_QUESTIONS, REFSEG_REASONING_ANSWERS),
    ):
        for index in rng.permutation(len(questions))[:3]:
            rows.append((qtype, questions[index].format(**fields), _pick(rng, answers).format(**fields)))
    return rows
