"""Text and multiple-choice metrics of M3D-Bench, computed by maintained libraries, M3D's forms labelled.

M3D scores every answer on its own with HF ``evaluate`` (M3D_FACTS 4): ``bleu`` with ``max_order=1`` and
``rouge`` with ``rouge_types=["rouge1"]``, then averages the per-sample values offline. Here:

- :func:`bleu1_m3d`: that BLEU-1 (unigram precision x brevity penalty), by ``sacrebleu`` with the same
  ``13a`` tokenizer ``evaluate``'s bleu uses; an empty answer scores 0 (``evaluate`` divides by zero).
- :func:`corpus_bleu4`: the standard corpus BLEU-4 of ``sacrebleu`` (13a, exp smoothing), what MT and most
  report-generation papers mean by "BLEU"; M3D does not report it.
- :func:`rouge1` (what M3D reports) and :func:`rouge_l` (the usual report metric): F-measures of
  ``rouge_score``, the library ``evaluate``'s rouge wraps, with its defaults (lowercase, no stemming).
- :func:`closed_vqa_correct_m3d`: M3D's closed-VQA rule, "the answer contains '{letter}.' anywhere";
  :func:`closed_vqa_correct_exact`: the answer IS the right choice. M3D's rule also accepts "B. liver A."
  or a choice letter quoted inside other text, so it can only over-count.

Every score is in [0, 1]: ``sacrebleu``'s 0-100 is divided by 100 (and capped at 1: its exp(log p) of
a perfect match can come out as 100.00000000000004).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU


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
