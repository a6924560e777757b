"""Bench runner: task names, clear errors for tasks of later stages, and a retrieval run on a saved CLIP."""

from __future__ import annotations

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from m3d_lite.data.phantom_dataset import write_phantom_dataset
from m3d_lite.eval.bench import TASKS, clip_folder, resolve_tasks, run_bench


def test_task_names():
    assert len(TASKS) == 8 and TASKS[0] == "retrieval"
    assert resolve_tasks("all") == TASKS
    assert resolve_tasks(["vqa_open", "retrieval"]) == ("retrieval", "vqa_open")
    with pytest.raises(ValueError, match=r"unknown bench task\(s\) \['vqa'\].*'referring_segmentation'"):
        resolve_tasks(("retrieval", "vqa"))


def test_later_tasks_say_so_before_any_work(tmp_path):
    with pytest.raises(NotImplementedError, match="'vqa_closed' arrives with a later stage of the course"):
        run_bench(
            tmp_path / "no_model", tmp_path / "no_data", tmp_path / "out", tasks=("retrieval", "vqa_closed")
        )
    with pytest.raises(NotImplementedError, match="later stage"):
        run_bench(tmp_path / "no_model", tmp_path / "no_data", tmp_path / "out", tasks="all")
    assert not (tmp_path / "out").exists()


def test_clip_folder_prefers_the_model_subfolder(tmp_path):
    assert clip_folder(tmp_path) == tmp_path
    (tmp_path / "model").mkdir()
    assert clip_folder(tmp_path) == tmp_path / "model"


def test_retrieval_bench_on_a_saved_clip(tmp_path):
    try:
        from m3d_lite.models.clip import build_clip, load_clip  # noqa: F401  (load_clip is what bench uses)
    except ImportError as error:
        pytest.skip(f"needs m3d_lite.models.clip.build_clip and load_clip, not available yet: {error}")
    data = tmp_path / "data"
    write_phantom_dataset(data, num_volumes=30, scale="ci", seed=0, progress=False)  # 3 test pairs
    model, tokenizer = build_clip("ci")
    model.save_pretrained(tmp_path / "run" / "model")  # the layout train_clip writes
    tokenizer.save_pretrained(tmp_path / "run" / "model")

    bench = run_bench(tmp_path / "run", data, tmp_path / "bench", pool_size=2, seed=0)

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
