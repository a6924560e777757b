"""The LLM report judge: scores parsed from its answers (integers too, unlike M3D), a tiny random judge run
end to end, and a scripted judge that shows which prompt it gets and that scores keep the pairs' order."""

import math

import pytest
import torch

from m3d_lite.eval import judge
from m3d_lite.eval.judge import judge_reports, judge_summary, parse_score


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """The tokenizer converted for the tiny judge goes to a fresh cache folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("85", 85.0),  # M3D's regex needs a decimal point and records this as 'NA'
        ("Score: 85.", 85.0),
        ("Score: 72.5", 72.5),
        ("I would give it a score of 7/10.", 70.0),
        ("85 / 100", 85.0),
        ("Aspects: 3 cm lesion, no ascites. Score: 50", 50.0),
        ("0", 0.0),
        ("Score: 100", 100.0),
        ("Score: xx.", None),
        ("The prediction is good.", None),
        ("Score: 150", None),
        ("Score: -5", None),
        ("Score: 3/0", None),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_tiny_judge_runs_end_to_end():
    torch.manual_seed(0)
    predictions = ["Liver cyst.", "Normal brain.", "Kidney stone."]
    scores = judge_reports(predictions, ["Liver cyst."] * 3, "tiny-llama")
    assert len(scores) == 3
    assert all(score is None or (isinstance(score, float) and 0 <= score <= 100) for score in scores)


def test_scripted_judge_scores_in_order(monkeypatch):
    answers = iter(["Score: 90.", "no idea", "Score: 12.5"])
    seen = []

    def scripted(model, tokenizer, prompts, max_new_tokens):
        seen.extend(prompts)
        return [next(answers) for _ in prompts]

    monkeypatch.setattr(judge, "generate_judgements", scripted)
    predictions = ["A 3 cm liver cyst.", "Normal brain.", "Small kidney stone."]
    references = ["Hepatic cyst of 3 cm.", "Liver metastases.", "Left renal calculus."]
    scores = judge_reports(predictions, references, "tiny-llama", batch_size=2, progress=False)
    assert scores == [90.0, None, 12.5]
    pairs = zip(predictions, references, seen, strict=True)
    assert all(prediction in prompt and reference in prompt for prediction, reference, prompt in pairs)
    assert "<|im_start|>assistant" in seen[0]  # the judge's chat template is used
    assert judge_summary(scores) == {"judge_score": 51.25, "judge_parsed": 2 / 3}
    assert math.isnan(judge_summary([None])["judge_score"])
    with pytest.raises(ValueError, match="one reference per prediction"):
        judge_reports(predictions, references[:2], "tiny-llama")
