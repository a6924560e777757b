"""M3D-Bench runner: evaluate a trained model folder on the 8 M3D-Bench tasks and write the results.

Only retrieval exists at this stage of the course; the other tasks arrive with the stages that train the
models they need. Outputs in ``out_dir``: ``bench.json`` (all metrics), and per task its pictures and
per-sample CSV (retrieval: ``retrieval_similarity.png``, ``retrieval_pairs.csv``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from m3d_lite import viz
from m3d_lite.eval.retrieval import evaluate_retrieval, recall_at_k, retrieval_ranks, sample_pool
from m3d_lite.io import save_csv, save_json

TASKS = (
    "retrieval",
    "report_generation",
    "vqa_closed",
    "vqa_open",
    "rec",
    "reg",
    "segmentation",
    "referring_segmentation",
)
DIRECTION_NOTE = (
    "Rows are images, columns texts. image_to_text: each image ranks all texts (M3D's eval_itr.py calls this "
    "'IR'); text_to_image: each text ranks all images (M3D's 'TR'). R@k in percent; ties count against the "
    "true pair. Ranks in retrieval_pairs.csv are 1-based, over the full split."
)


def resolve_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """Task names in :data:`TASKS` order; "all" means every task; an unknown name is an error."""
    names = {tasks} if isinstance(tasks, str) else set(tasks)
    if "all" in names:
        names = (names - {"all"}) | set(TASKS)
    unknown = sorted(names - set(TASKS))
    if unknown:
        raise ValueError(f"unknown bench task(s) {unknown}; the tasks are {list(TASKS)} or 'all'")
    return tuple(task for task in TASKS if task in names)


def clip_folder(model_dir: str | os.PathLike) -> Path:
    """The saved CLIP model in ``model_dir``: its ``model/`` subfolder (what train_clip writes) or itself."""
    model_dir = Path(model_dir)
    return model_dir / "model" if (model_dir / "model").is_dir() else model_dir


def bench_retrieval(model_dir: str | os.PathLike, data_dir, out_dir: Path, pool_size: int, seed: int) -> dict:
    """Retrieval on a seeded pool of ``pool_size`` test pairs and on the whole test split, embedded once."""
    from m3d_lite.models.clip import load_clip  # imported per task: later tasks load other models

    model, tokenizer = load_clip(clip_folder(model_dir))
    if torch.cuda.is_available():
        model.to("cuda")
    full = evaluate_retrieval(model, tokenizer, data_dir, "test", pool_size=None, seed=seed)
    pool = sample_pool(full.pool_size, pool_size, seed)
    pool_similarity = full.similarity[pool][:, pool]
    text_ranks, image_ranks = retrieval_ranks(full.similarity)
    pool_metrics = recall_at_k(pool_similarity)
    save_csv(
        out_dir / "retrieval_pairs.csv",
        [
            {"index": i, "image": path, "rank_of_true_text": int(t), "rank_of_true_image": int(r)}
            for i, path, t, r in zip(full.indices, full.image_paths, text_ranks, image_ranks, strict=True)
        ],
        ["index", "image", "rank_of_true_text", "rank_of_true_image"],
    )
    r1 = {direction: metrics["R@1"] for direction, metrics in pool_metrics.items()}
    title = (
        f"test pool of {len(pool)}: R@1 image->text {r1['image_to_text']:.0f}%, "
        f"text->image {r1['text_to_image']:.0f}%"
    )
    viz.save_figure(viz.retrieval_matrix(pool_similarity, title), out_dir / "retrieval_similarity.png")
    return {
        f"pool_{pool_size}": {"pool_size": len(pool), **pool_metrics},
        "pool_full": {"pool_size": full.pool_size, **full.metrics},
        "direction_note": DIRECTION_NOTE,
    }


def run_bench(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tasks: str | Iterable[str] = ("retrieval",),
    pool_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``tasks`` (names from :data:`TASKS`, or "all") of the model in ``model_dir`` on ``data_dir``.

    Writes ``out_dir/bench.json`` = ``{"model", "data", "seed", "tasks": {task: metrics}}`` atomically and
    returns the same dict. Every task name is checked before anything runs.
    """
    tasks = resolve_tasks(tasks)
    missing = [task for task in tasks if task != "retrieval"]
    if missing:
        raise NotImplementedError(
            f"task {missing[0]!r} arrives with a later stage of the course; "
            f"available now: ['retrieval'] (asked for {list(tasks)})"
        )
    out_dir = Path(out_dir)
    results = {"retrieval": bench_retrieval(model_dir, data_dir, out_dir, pool_size, seed)}
    bench = {"model": str(model_dir), "data": str(data_dir), "seed": seed, "tasks": results}
    save_json(out_dir / "bench.json", bench)
    return bench
