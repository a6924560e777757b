"""Bench runner: task names, retrieval on a saved CLIP, all 8 tasks of a tiny LaMed with the report, resuming,
skipping what a model lacks, and REG's scores."""

from __future__ import annotations

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from m3d_lite.data.phantom_dataset import write_phantom_dataset
from m3d_lite.data.position import REGDataset
from m3d_lite.eval import bench as bench_module
from m3d_lite.eval import tasks
from m3d_lite.eval.bench import TASKS, TaskUnavailable, clip_folder, resolve_tasks, run_bench
from m3d_lite.eval.tasks import TEXT_SCORES, TaskResult, evaluate_reg
from m3d_lite.models import build_clip, build_lamed, save_lamed

LIMIT = {"limit": 2, "batch_size": 2, "progress": False}
TRAIN = {"split": "train", **LIMIT}  # the 8-volume phantom has no M3D-RefSeg row in its test split


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LaMed with a seg module, one without, and a CLIP run, saved (built once per module)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        for name, segmentation in (("seg", True), ("plain", False)):
            torch.manual_seed(0)
            save_lamed(*build_lamed("ci", llm="tiny-llama", segmentation=segmentation), root / name)
        model, tokenizer = build_clip("ci")
    model.save_pretrained(root / "clip" / "model")  # the layout train_clip writes
    tokenizer.save_pretrained(root / "clip" / "model")
    return root


def fake_evaluator(calls: list[str]):
    """An evaluator that records its task and returns one row, without a model."""

    def evaluate(model, tokenizer, data_dir, **kwargs) -> TaskResult:
        calls.append(model.__class__.__name__)
        return TaskResult("fake", [{"prediction": "p", "answer": "a"}], {"bleu1": 0.25, "dice": 0.5})

    return evaluate


def test_task_names():
    assert len(TASKS) == 8 and TASKS[0] == "retrieval"
    assert resolve_tasks("all") == TASKS
    assert resolve_tasks(["vqa_open", "retrieval"]) == ("retrieval", "vqa_open")
    with pytest.raises(ValueError, match=r"unknown bench task\(s\) \['vqa'\].*'referring_segmentation'"):
        resolve_tasks(("retrieval", "vqa"))


def test_clip_folder_prefers_the_model_subfolder(tmp_path):
    assert clip_folder(tmp_path) == tmp_path
    (tmp_path / "model").mkdir()
    assert clip_folder(tmp_path) == tmp_path / "model"


def test_retrieval_bench_on_a_saved_clip(runs, tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, num_volumes=30, scale="ci", seed=0, progress=False)  # 3 test pairs

    bench = run_bench(runs / "clip", data, tmp_path / "bench", pool_size=2, seed=0, progress=False)

    assert json.loads((tmp_path / "bench" / "bench.json").read_text()) == bench
    retrieval = bench["tasks"]["retrieval"]
    assert retrieval["pool_2"]["pool_size"] == 2 and retrieval["pool_full"]["pool_size"] == 3
    for pool in ("pool_2", "pool_full"):
        for direction in ("image_to_text", "text_to_image"):
            assert set(retrieval[pool][direction]) == {"R@1", "R@5", "R@10"}
            assert all(0.0 <= v <= 100.0 for v in retrieval[pool][direction].values())
    assert "IR" in retrieval["direction_note"]
    assert (tmp_path / "bench" / "retrieval_similarity.png").stat().st_size > 1000
    with open(tmp_path / "bench" / "retrieval_pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["index"] for row in rows] == ["0", "1", "2"]
    assert all(1 <= int(row[c]) <= 3 for row in rows for c in ("rank_of_true_text", "rank_of_true_image"))
    # a CLIP run as the model: the LaMed tasks are skipped under "all", with the reason
    assert set(bench["skipped"]) == set(TASKS[1:]) and "needs a LaMed model" in bench["skipped"]["rec"]


def test_all_tasks_report_resume_and_force(phantom8, runs, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    bench = run_bench(runs / "seg", phantom8, out, clip_dir=runs / "clip", **TRAIN)

    assert list(bench["tasks"]) == list(TASKS) and bench["skipped"] == {}
    assert json.loads((out / "bench.json").read_text()) == bench
    for task in TASKS[1:]:
        with open(out / f"{task}.csv", newline="", encoding="utf-8") as f:
            assert 1 <= len(list(csv.DictReader(f))) <= 2, task
    assert {"accuracy_m3d", "accuracy_exact"} <= set(bench["tasks"]["vqa_closed"])
    assert {"bleu1", "class_named"} <= set(bench["tasks"]["reg"])
    report = (out / "report.md").read_text()
    assert (
        "| task | M3D's form (%) | standard / added (%) |" in report and "| vqa_closed | accuracy " in report
    )
    assert "exact accuracy" in report and "Dice teacher-forced" in report and "enclosing-box IoU" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "report_rec_0.png").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished task ran again")

    monkeypatch.setattr(bench_module, "bench_retrieval", refuse)
    for task in TASKS[1:]:
        monkeypatch.setitem(bench_module.EVALUATORS, task, refuse)
    assert run_bench(runs / "seg", phantom8, out, clip_dir=runs / "clip", **TRAIN) == bench

    with pytest.raises(ValueError, match=r"other settings \{'limit': \(2, 1\)\}"):
        run_bench(runs / "seg", phantom8, out, clip_dir=runs / "clip", **{**TRAIN, "limit": 1})

    calls: list[str] = []
    monkeypatch.setitem(bench_module.EVALUATORS, "reg", fake_evaluator(calls))
    forced = run_bench(runs / "seg", phantom8, out, ["reg"], clip_dir=runs / "clip", force=True, **TRAIN)
    assert calls == ["LaMedForCausalLM"] and forced["tasks"]["reg"] == {"bleu1": 0.25, "dice": 0.5}
    assert forced["tasks"]["rec"] == bench["tasks"]["rec"]  # the others are kept


def test_model_without_seg_module_skips_or_refuses(phantom8, runs, tmp_path):
    with pytest.raises(TaskUnavailable, match="segmentation needs a model with a seg module"):
        run_bench(runs / "plain", phantom8, tmp_path / "named", ["rec", "segmentation"], **LIMIT)
    with pytest.raises(TaskUnavailable, match=r"retrieval needs a CLIP run: pass clip_dir \(--clip DIR\)"):
        run_bench(runs / "plain", phantom8, tmp_path / "named", ["retrieval"], **LIMIT)
    assert not (tmp_path / "named").exists()  # refused before any work

    bench = run_bench(runs / "plain", phantom8, tmp_path / "all", **LIMIT)
    assert set(bench["skipped"]) == {"retrieval", "segmentation", "referring_segmentation"}
    assert "seg module" in bench["skipped"]["segmentation"] and "--clip" in bench["skipped"]["retrieval"]
    assert list(bench["tasks"]) == ["report_generation", "vqa_closed", "vqa_open", "rec", "reg"]
    assert "| segmentation | skipped: segmentation needs" in (tmp_path / "all" / "report.md").read_text()


def test_reg_scores_the_true_answers_fully(phantom8, runs, monkeypatch):
    from m3d_lite.infer import load_model

    model, tokenizer = load_model(runs / "plain")
    config = model.config
    dataset = REGDataset(phantom8, "test", tokenizer, config.proj_out_num, config.model_max_length)
    truth = iter(dataset[i]["answer"] for i in tasks.first_positives(dataset.pairs, 3))
    monkeypatch.setattr(
        tasks, "generate_answers", lambda m, t, images, questions, n: [next(truth) for _ in questions]
    )

    result = evaluate_reg(model, tokenizer, phantom8, limit=3, batch_size=2, progress=False)

    assert result.task == "reg" and len(result.rows) == 3
    assert list(result.rows[0]) == [
        "image", "class_name", "question", "prediction", "answer", *TEXT_SCORES, "class_named"
    ]  # fmt: skip
    assert result.summary["bleu1"] == pytest.approx(1.0) and result.summary["class_named"] == 1.0
    assert result.summary["rouge_l"] == pytest.approx(1.0)


def test_merge_benches_and_print_the_headline(tmp_path, capsys):
    from m3d_lite.eval.bench import merge_benches
    from m3d_lite.eval.report import main as report_main

    language, seg = tmp_path / "language", tmp_path / "seg"
    for folder, task in ((language, "reg"), (seg, "segmentation")):
        folder.mkdir()
        (folder / f"{task}.csv").write_text("question,prediction\nq,p\n")
    benches = [
        (
            {"model": "m1", "tasks": {"reg": {"bleu1": 0.5}}, "skipped": {"segmentation": "no seg module"}},
            language,
        ),
        ({"model": "m2", "tasks": {"segmentation": {"dice": 0.25}}, "skipped": {}}, seg),
    ]
    merged = merge_benches(benches, tmp_path / "all")
    assert set(merged["tasks"]) == {"reg", "segmentation"} and merged["skipped"] == {}
    assert [run["model"] for run in merged["runs"]] == ["m1", "m2"]
    assert (tmp_path / "all" / "reg.csv").is_file() and (tmp_path / "all" / "segmentation.csv").is_file()
    assert report_main([str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "| segmentation | Dice generated 25.0" in printed
    assert report_main([str(tmp_path / "nothing")]) == 1
