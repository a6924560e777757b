"""Segmentation metrics of M3D-Bench with a tiny ci model that has a seg module: rows and summaries, full
marks when the generation returns the true answers and masks, and a clear error without a seg module."""

import numpy as np
import pytest
import torch

from m3d_lite.data.seg_data import RefSegDataset, SegTaskDataset
from m3d_lite.eval import tasks
from m3d_lite.eval.tasks import (
    SEG_SCORES,
    evaluate_referring_segmentation,
    evaluate_segmentation,
    prompt_cosine,
)
from m3d_lite.models import build_lamed

FAST = {"batch_size": 2, "max_new_tokens": 3, "progress": False}
ROW_SCORES = ["prediction", "generated_seg", "dice", "dice_forced", "soft_dice_forced"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        torch.manual_seed(0)
        model, tokenizer = build_lamed("ci", llm="tiny-llama", segmentation=True)
    return model.eval(), tokenizer


def assert_means_of_rows(summary: dict[str, float], rows: list[dict], group: str) -> None:
    summary = dict(summary)
    if len({row[group] for row in rows}) < 2:
        assert "prompt_cosine" not in summary
    else:
        assert -1 <= summary.pop("prompt_cosine") <= 1
    for key in SEG_SCORES:
        assert summary[key] == pytest.approx(np.mean([float(row[key]) for row in rows]))
        for name in {row[group] for row in rows}:
            of_name = [float(row[key]) for row in rows if row[group] == name]
            assert summary[f"{key}/{name}"] == pytest.approx(np.mean(of_name))
    assert len(summary) == len(SEG_SCORES) * (1 + len({row[group] for row in rows}))
    assert all(0 <= value <= 1 for value in summary.values())


def test_rows_and_means(phantom8, model_and_tokenizer):
    result = evaluate_segmentation(*model_and_tokenizer, phantom8, limit=3, **FAST)
    assert result.task == "segmentation" and len(result.rows) == 3  # a full and a partial batch
    assert all(list(row) == ["image", "class_name", "question", *ROW_SCORES] for row in result.rows)
    assert_means_of_rows(result.summary, result.rows, "class_name")
    assert any(row["soft_dice_forced"] > 0 for row in result.rows)  # the decoder did see the [SEG] state

    # the 8-volume phantom puts no M3D-RefSeg row in its test split
    result = evaluate_referring_segmentation(*model_and_tokenizer, phantom8, "train", limit=2, **FAST)
    assert result.task == "referring_segmentation" and len(result.rows) == 2
    keys = ["image", "mask_id", "question_type", "question", *ROW_SCORES]
    assert all(list(row) == keys for row in result.rows)
    assert {row["question_type"] for row in result.rows} <= {"description", "reasoning"}
    assert_means_of_rows(result.summary, result.rows, "question_type")


@pytest.mark.parametrize("dataset_class", [SegTaskDataset, RefSegDataset])
def test_true_answers_and_masks_score_full_marks(phantom8, model_and_tokenizer, monkeypatch, dataset_class):
    model, tokenizer = model_and_tokenizer
    split = "test" if dataset_class is SegTaskDataset else "train"  # (no RefSeg test row)
    dataset = dataset_class(phantom8, split, tokenizer, model.config.proj_out_num, 256)
    indices = range(len(dataset))
    if dataset_class is SegTaskDataset:  # the evaluation asks about the positive pairs only
        indices = [i for i in indices if tasks.is_positive(dataset.pairs[i])]
    truths = iter([(dataset[i]["answer"], dataset[i]["seg_mask"] > 0.5) for i in indices[:2]])

    def generate(m, t, images, questions, n):
        answers, masks = zip(*(next(truths) for _ in questions), strict=True)
        return list(answers), list(masks)

    monkeypatch.setattr(tasks, "generate_with_masks", generate)
    evaluate = evaluate_segmentation if dataset_class is SegTaskDataset else evaluate_referring_segmentation
    result = evaluate(model, tokenizer, phantom8, split, limit=2, **FAST)
    assert all(row["prediction"].count("[SEG]") == 1 for row in result.rows)
    assert result.summary["dice"] == result.summary["generated_seg"] == 1.0


def test_a_model_without_seg_module_is_refused(phantom8, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(model, "seg_module", None)  # as built without segmentation
    with pytest.raises(ValueError, match="^segmentation: this model has no seg module"):
        evaluate_segmentation(model, tokenizer, phantom8, limit=1, **FAST)
    with pytest.raises(ValueError, match="^referring segmentation: this model has no seg module"):
        evaluate_referring_segmentation(model, tokenizer, phantom8, "train", limit=1, **FAST)


def test_prompt_cosine_compares_prompts_of_different_targets_only():
    same, other = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    rows = [
        {"class_name": "liver", "prompt": same},
        {"class_name": "liver", "prompt": -same},  # same class: not compared
        {"class_name": "spleen", "prompt": other},
        {"class_name": "kidney", "prompt": None},  # no [SEG] forced: left out
    ]
    # liver-spleen pairs: cos(same, other) = 0.71 and cos(-same, other) = -0.71, each counted both ways
    assert prompt_cosine(rows, lambda row: row["class_name"]) == pytest.approx(0.0, abs=1e-6)
    assert all("prompt" not in row for row in rows)
    rows = [{"class_name": name, "prompt": same * scale} for name, scale in (("liver", 1), ("spleen", 3))]
    assert prompt_cosine(rows, lambda row: row["class_name"]) == pytest.approx(1.0)  # one prompt for all
    assert prompt_cosine([{"class_name": "liver", "prompt": same}], lambda row: row["class_name"]) is None
