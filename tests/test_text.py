"""Texts from findings: report, VQA (5 types, M3D closed/open format), REC/REG/seg and RefSeg wording."""

from __future__ import annotations

import numpy as np
import pytest

from m3d_lite.config import DataConfig
from m3d_lite.data import text
from m3d_lite.data.phantom import LESION_KINDS, ORGANS, PHASES, PLANES, Findings, Lesion, make_case
from m3d_lite.data.text import VQAItem

ALL_ORGANS = tuple(ORGANS.values())
STONE = Lesion(1, "stone", "left kidney", "lower pole", 14, "calcific density", 640)
CYST = Lesion(2, "cyst", "liver", "right lobe", 31, "non-enhancing fluid attenuation", 8)
WITH_LESIONS = Findings("c1", "arterial", "coronal", "bone", ALL_ORGANS, (STONE, CYST))
NORMAL = Findings(
    "c2", "non-contrast", "sagittal", "lung", tuple(o for o in ALL_ORGANS if o != "gallbladder"), ()
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_report_mentions_acquisition_and_every_lesion():
    report = text.report(WITH_LESIONS, rng())
    assert "coronal" in report.lower() and "arterial" in report and "bone" in report
    for lesion in WITH_LESIONS.lesions:
        assert f"{lesion.size_mm} mm" in report
        assert f"{lesion.sublocation} of the {lesion.organ}" in report
        assert lesion.attenuation in report
    assert "unremarkable" in report or "normal" in report or "No focal abnormality" in report


def test_report_without_lesions_and_without_gallbladder():
    report = text.report(NORMAL, rng())
    assert "without" in report and "sagittal" in report.lower()
    assert any(s in report for s in ("No focal lesion", "no mass", "No focal abnormality is seen"))
    assert "gallbladder is surgically absent" in report or "cholecystectomy" in report
    assert " mm " not in report


def test_report_wording_varies_with_the_generator_and_is_reproducible():
    reports = {text.report(WITH_LESIONS, rng(s)) for s in range(20)}
    assert len(reports) > 5
    assert text.report(WITH_LESIONS, rng(3)) == text.report(WITH_LESIONS, rng(3))


def check_item(item: VQAItem) -> None:
    assert item.question_type in (1, 2, 3, 4, 5)
    assert len(item.choices) == 4 and item.answer_letter in "ABCD"
    real = [c for c in item.choices if c != "NA"]
    assert len(real) == len(set(real)) >= 2
    assert item.choices[: len(real)] == tuple(real)  # "NA" only pads the end
    assert item.answer in real


def test_vqa_answers_follow_the_findings():
    items = text.vqa_items(WITH_LESIONS, rng())
    for item in items:
        check_item(item)
    by_type = {}
    for item in items:
        by_type.setdefault(item.question_type, []).append(item)
    assert sorted(by_type) == [1, 2, 3, 4, 5]
    assert by_type[1][0].answer == "coronal"
    assert {i.answer for i in by_type[2]} == {"arterial", "bone window"}
    assert {"left kidney", "liver"} <= {i.answer for i in by_type[3]}
    assert {i.answer for i in by_type[4]} == {"stone", "cyst"}
    assert {i.answer for i in by_type[5]} == {"lower pole", "right lobe"}
    stone_kind = next(i for i in by_type[4] if i.answer == "stone")
    assert "left kidney" in stone_kind.question and "calcification" not in stone_kind.choices
    phase_item = next(i for i in by_type[2] if i.answer == "arterial")
    assert set(phase_item.choices) == set(PHASES)
    assert set(by_type[1][0].choices) == {*PLANES, "NA"}


def test_vqa_without_lesions_asks_types_1_to_4_with_no_abnormality():
    items = text.vqa_items(NORMAL, rng())
    for item in items:
        check_item(item)
    assert sorted({i.question_type for i in items}) == [1, 2, 3, 4]
    abnormality = [i for i in items if i.question_type == 4]
    assert len(abnormality) == 1 and abnormality[0].answer == text.NO_ABNORMALITY
    organ = next(i for i in items if i.question_type == 3)
    assert organ.answer in NORMAL.organs


def test_vqa_answer_letters_are_shuffled():
    letters = {text.vqa_items(WITH_LESIONS, rng(s))[1].answer_letter for s in range(30)}
    assert letters == set("ABCD")


def test_vqa_on_generated_cases():
    ci = DataConfig.from_scale("ci")
    for s in range(8):
        findings = make_case("x", s, ci.raw_shape, ci.raw_spacing).findings
        items = text.vqa_items(findings, rng(s))
        for item in items:
            check_item(item)
        assert sum(i.question_type == 5 for i in items) == len(findings.lesions)


def test_closed_and_open_vqa_formats_are_m3ds():
    item = VQAItem(2, "Which phase?", ("arterial", "delayed", "non-contrast", "NA"), "B")
    assert (
        text.closed_vqa_question(item) == "Which phase? Choices: A. arterial B. delayed C. non-contrast D. NA"
    )
    assert text.closed_vqa_answer(item) == "B. delayed"
    assert text.open_vqa_question(item) == "Which phase?" and text.open_vqa_answer(item) == "delayed"


def test_seg_answers_hold_exactly_one_seg_token_and_negatives_none():
    for s in range(30):
        assert text.seg_answer("liver", rng(s)).count("[SEG]") == 1
        described = text.seg_answer("liver", rng(s), description=True)
        assert described.count("[SEG]") == 1 and "liver" in described
        assert "[SEG]" not in text.negative_answer("gallbladder", rng(s))
        assert "gallbladder" in text.negative_answer("gallbladder", rng(s))
    for template in (*text.SEG_ANSWERS, *text.SEG_DESCRIPTION_ANSWERS):
        assert template.count("[SEG]") == 1
    assert "spleen" in text.seg_question("spleen", rng())
    definition = text.TERM_DICTIONARY["spleen"][0]
    assert definition in text.seg_question(definition, rng(), description=True)


def test_rec_and_reg_texts_carry_the_box_and_the_name():
    box = "<bx_start>[0.125, 0.25, 0.25, 0.625, 0.562, 0.719]<bx_end>"
    for s in range(10):
        assert "aorta" in text.rec_question("aorta", rng(s))
        assert box in text.rec_answer(box, "aorta", rng(s))
        described = text.rec_answer(box, "aorta", rng(s), description=True)
        assert box in described and "aorta" in described
        assert box in text.reg_question(box, rng(s))
        assert "aorta" in text.reg_answer("aorta", rng(s))
        definition = text.TERM_DICTIONARY["aorta"][1]
        assert definition in text.reg_answer("aorta", rng(s), definition=definition)
    definition = text.TERM_DICTIONARY["aorta"][0]
    assert definition in text.rec_question(definition, rng(), description=True)
    assert text.caption_prompt(rng()) in text.CAPTION_PROMPTS


def test_refseg_qas_describe_and_reason_with_one_seg_token():
    rows = text.refseg_qas(STONE, WITH_LESIONS, rng())
    assert [qtype for qtype, _, _ in rows] == [0, 0, 0, 1, 1, 1]
    for _, _, answer in rows:
        assert answer.count("[SEG]") == 1 and "left kidney" in answer
    reasoning = " ".join(q for qtype, q, _ in rows if qtype == 1)
    assert "flank pain" in reasoning
    for lesion in (CYST, Lesion(1, "solid mass", "pancreas", "head", 25, "hypoenhancing soft tissue", 60)):
        assert len(text.refseg_qas(lesion, WITH_LESIONS, rng())) == 6


@pytest.mark.parametrize("name", [*ALL_ORGANS, *LESION_KINDS])
def test_term_dictionary_defines_every_class_and_kind(name):
    definitions = text.TERM_DICTIONARY[name]
    assert 2 <= len(definitions) <= 3 and all(d.endswith(".") and len(d) > 30 for d in definitions)
