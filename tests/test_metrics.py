"""Text and choice metrics: equal to the libraries' own values, and M3D's forms worked out by hand."""

import math

import pytest
from nltk.translate.bleu_score import sentence_bleu
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU

from m3d_lite.eval.metrics import (
    bleu1_m3d,
    closed_vqa_correct_exact,
    closed_vqa_correct_m3d,
    corpus_bleu4,
    rouge1,
    rouge_l,
)

REFERENCE = "the cat sat on the mat"
PREDICTION = "the cat sat down"  # 4 words, 3 of them in the reference


def test_bleu1_by_hand_and_by_nltk():
    # unigram precision 3/4, brevity penalty exp(1 - 6/4) as the prediction is shorter
    assert bleu1_m3d(PREDICTION, REFERENCE) == pytest.approx(0.75 * math.exp(-0.5))
    assert bleu1_m3d(PREDICTION, REFERENCE) == pytest.approx(
        sentence_bleu([REFERENCE.split()], PREDICTION.split(), weights=(1,))
    )
    # longer than the reference: no penalty; "the" counted at most twice (clipped): 6 of 7 tokens match
    assert bleu1_m3d("the the the cat sat on mat", REFERENCE) == pytest.approx(6 / 7)
    assert bleu1_m3d(REFERENCE, REFERENCE) == pytest.approx(1.0)
    assert bleu1_m3d("", REFERENCE) == 0.0 and bleu1_m3d("dog", REFERENCE) == 0.0
    assert bleu1_m3d("The cat", "the cat") == pytest.approx(0.5)  # case is kept, as in evaluate's bleu


def test_corpus_bleu4_is_sacrebleus_in_unit_range():
    predictions = ["the cat sat on a mat today", "a liver lesion in segment four", "no abnormality"]
    references = ["the cat sat on the mat", "a liver lesion in segment 4", "no abnormality seen"]
    expected = BLEU().corpus_score(predictions, [references]).score / 100
    assert corpus_bleu4(predictions, references) == pytest.approx(expected)
    assert 0 < expected < 1
    assert corpus_bleu4(references, references) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="got 1 predictions and 2 references"):
        corpus_bleu4(["a"], ["a", "b"])


def test_rouge_by_hand_and_by_rouge_score():
    # ROUGE-1: precision 3/4, recall 3/6 -> F = 2 * 0.75 * 0.5 / 1.25 = 0.6 (lowercased tokens)
    assert rouge1(PREDICTION.upper(), REFERENCE) == pytest.approx(0.6)
    # ROUGE-L: longest common subsequence "cat on mat" = 3: precision 3/5, recall 3/6
    prediction = "cat is on a mat"
    assert rouge_l(prediction, REFERENCE) == pytest.approx(2 * 0.6 * 0.5 / 1.1)
    scorer = RougeScorer(["rouge1", "rougeL"])
    scores = scorer.score(REFERENCE, prediction)
    assert rouge1(prediction, REFERENCE) == pytest.approx(scores["rouge1"].fmeasure)
    assert rouge_l(prediction, REFERENCE) == pytest.approx(scores["rougeL"].fmeasure)


@pytest.mark.parametrize(
    ("prediction", "m3d", "exact"),
    [
        ("A. liver", True, True),
        ("A.", True, True),
        ("  a. LIVER. ", False, False),  # M3D's letter is upper case; so is the exact rule's
        ("A.  Liver.", True, True),
        ("A. spleen", True, False),  # the right letter with the wrong text
        ("B. spleen A.", True, False),  # "A." anywhere counts for M3D
        ("The answer is A. liver", True, False),
        ("A liver", False, False),
        ("B. liver", False, False),
    ],
)
def test_closed_vqa_rules(prediction, m3d, exact):
    assert closed_vqa_correct_m3d(prediction, "A", "liver") is m3d
    assert closed_vqa_correct_exact(prediction, "A", "liver") is exact
