"""Evaluation of the generative M3D-Bench tasks: rows and summaries of a tiny random model, and full marks
when the model is replaced by one that answers what the data says (the scoring path end to end)."""

import csv
import shutil

import numpy as np
import pytest
import torch

from m3d_lite.data.datasets import CaptionDataset, VQADataset, read_report
from m3d_lite.data.formats import NEGATIVE_MASK_SHAPE, QUESTION_TYPES
from m3d_lite.data.position import RECDataset
from m3d_lite.eval import tasks
from m3d_lite.eval.metrics import meteor
from m3d_lite.eval.tasks import (
    TEXT_SCORES,
    evaluate_closed_vqa,
    evaluate_open_vqa,
    evaluate_rec,
    evaluate_reports,
    write_rows_csv,
)
from m3d_lite.models import build_lamed

FAST = {"batch_size": 3, "max_new_tokens": 4, "progress": False}


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        torch.manual_seed(0)
        model, tokenizer = build_lamed("ci", llm="tiny-llama")
    return model.eval(), tokenizer


def answer_in_order(monkeypatch, answers: list[str]) -> None:
    """Replace the model's decoding by ``answers``, handed out in order."""
    queue = iter(answers)
    monkeypatch.setattr(
        tasks, "generate_answers", lambda m, t, images, questions, n: [next(queue) for _ in questions]
    )


def test_closed_vqa_rows_and_accuracies(phantom8, model_and_tokenizer, tmp_path):
    result = evaluate_closed_vqa(*model_and_tokenizer, phantom8, limit=4, **FAST)
    assert result.task == "closed_vqa" and len(result.rows) == 4  # a full and a partial batch
    keys = ["image", "question_type", "question", "prediction", "answer", "correct_m3d", "correct_exact"]
    assert all(list(row) == keys for row in result.rows)
    assert all(" Choices: A. " in row["question"] for row in result.rows)
    for form in ("m3d", "exact"):
        flags = [row[f"correct_{form}"] for row in result.rows]
        assert result.summary[f"accuracy_{form}"] == pytest.approx(np.mean(flags))
        for name in {row["question_type"] for row in result.rows}:
            of_type = [row[f"correct_{form}"] for row in result.rows if row["question_type"] == name]
            assert result.summary[f"accuracy_{form}/{name}"] == pytest.approx(np.mean(of_type))
    assert all(0 <= value <= 1 for value in result.summary.values())
    assert {row["question_type"] for row in result.rows} <= set(QUESTION_TYPES.values())
    path = write_rows_csv(result, tmp_path / "closed.csv")
    with open(path, newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [row["prediction"] for row in written] == [row["prediction"] for row in result.rows]


def test_rec_skips_absent_classes_and_scores_boxes(phantom8, model_and_tokenizer, tmp_path):
    root = shutil.copytree(phantom8, tmp_path / "phantom")
    model, tokenizer = model_and_tokenizer
    dataset = RECDataset(root, "test", tokenizer, model.config.proj_out_num, model.config.model_max_length)
    np.save(dataset.pairs[0].mask, np.zeros(NEGATIVE_MASK_SHAPE, dtype=np.uint8))  # class 0 now absent
    result = evaluate_rec(model, tokenizer, root, limit=2, **FAST)
    assert [row["image"] for row in result.rows] == [str(pair.image) for pair in dataset.pairs[1:3]]
    for row in result.rows:  # a random model writes no box
        assert row["box"] is None and row["iou"] == 0.0 and row["iou_m3d"] == -1.0
    assert result.summary == {"iou": 0.0, "acc@0.5": 0.0, "iou_m3d": 0.0, "box_found": 0.0}


def test_perfect_answers_score_full_marks(phantom8, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    sizes = (model.config.proj_out_num, model.config.model_max_length)

    closed = VQADataset(phantom8, "test", tokenizer, *sizes, closed=True)
    answer_in_order(monkeypatch, [closed.example(i)[2] for i in range(3)])
    summary = evaluate_closed_vqa(model, tokenizer, phantom8, limit=3, **FAST).summary
    assert summary["accuracy_m3d"] == summary["accuracy_exact"] == 1.0

    opened = VQADataset(phantom8, "test", tokenizer, *sizes, closed=False)
    answers = [opened.example(i)[2] for i in range(3)]
    answer_in_order(monkeypatch, answers)
    summary = evaluate_open_vqa(model, tokenizer, phantom8, limit=3, **FAST).summary
    assert {key.split("/")[0] for key in summary} == set(TEXT_SCORES)
    exact = {key: value for key, value in summary.items() if not key.startswith("meteor")}
    assert exact == pytest.approx(dict.fromkeys(exact, 1.0), abs=1e-5)  # BERTScore: float rounding
    # METEOR's fragmentation penalty keeps even a perfect answer below 1 (0.5 for a one-word answer)
    assert summary["meteor"] == pytest.approx(sum(meteor(a, a) for a in answers) / len(answers))

    captions = CaptionDataset(phantom8, "test", tokenizer, *sizes)
    answer_in_order(monkeypatch, [read_report(captions.folder / captions.items[0].text)])
    result = evaluate_reports(model, tokenizer, phantom8, **FAST)
    assert len(result.rows) == len(captions) == 1
    assert result.summary == pytest.approx(
        {**dict.fromkeys(TEXT_SCORES, 1.0), "corpus_bleu4": 1.0, "meteor": result.summary["meteor"]}, abs=1e-5
    )
    assert result.summary["meteor"] > 0.99

    rec = RECDataset(phantom8, "test", tokenizer, *sizes)
    answer_in_order(monkeypatch, [rec[i]["answer"] for i in range(2)])
    result = evaluate_rec(model, tokenizer, phantom8, limit=2, **FAST)
    assert all(row["box"] == pytest.approx(row["target_box"]) for row in result.rows)
    assert result.summary == pytest.approx({"iou": 1.0, "acc@0.5": 1.0, "iou_m3d": 1.0, "box_found": 1.0})
