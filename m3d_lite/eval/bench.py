"""M3D-Bench runner: evaluate a trained LaMed model (and a CLIP run) on the 8 M3D-Bench tasks, resumably.

The LaMed model is loaded once (:func:`m3d_lite.infer.load_model`: LoRA runs, exports) and shared by the
seven generative tasks of :mod:`m3d_lite.eval.tasks`; retrieval needs a CLIP run instead. Outputs in
``out_dir``: ``<task>.csv`` (per-sample rows; retrieval: ``retrieval_pairs.csv`` and
``retrieval_similarity.png``), ``bench.json`` (the settings, each finished task's summary and the reason
each skipped task was skipped), and ``report.md`` / ``report.html`` (:mod:`m3d_lite.eval.report`).

M3D runs one script per task and leaves the means to be computed offline; here one call runs them all,
and a task whose CSV and summary exist is not run again (pass ``force`` to redo it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from m3d_lite import viz
from m3d_lite.eval import tasks as evaluators
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
EVALUATORS: dict[str, Callable[..., evaluators.TaskResult]] = {
    "report_generation": evaluators.evaluate_reports,
    "vqa_closed": evaluators.evaluate_closed_vqa,
    "vqa_open": evaluators.evaluate_open_vqa,
    "rec": evaluators.evaluate_rec,
    "reg": evaluators.evaluate_reg,
    "segmentation": evaluators.evaluate_segmentation,
    "referring_segmentation": evaluators.evaluate_referring_segmentation,
}
SEG_TASKS = ("segmentation", "referring_segmentation")
DIRECTION_NOTE = (
    "Rows are images, columns texts. image_to_text: each image ranks all texts (M3D's eval_itr.py calls this "
    "'IR'); text_to_image: each text ranks all images (M3D's 'TR'). R@k in percent; ties count against the "
    "true pair. Ranks in retrieval_pairs.csv are 1-based, over the full split."
)


class TaskUnavailable(ValueError):
    """The model (or the missing CLIP run) cannot do a task; the message names it and what to pass."""


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


def holds_clip(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (a run or model folder) holds a saved M3D-CLIP rather than a LaMed model."""
    config = clip_folder(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "m3d_clip"


def csv_path(out_dir: Path, task: str) -> Path:
    """Where the per-sample rows of ``task`` go."""
    return out_dir / ("retrieval_pairs.csv" if task == "retrieval" else f"{task}.csv")


def bench_retrieval(
    clip_dir: str | os.PathLike,
    data_dir,
    out_dir: Path,
    split: str,
    pool_size: int,
    seed: int,
    progress: bool,
) -> dict:
    """Retrieval on a seeded pool of ``pool_size`` pairs of ``split`` and on all of it, embedded once."""
    from m3d_lite.models.clip import load_clip

    model, tokenizer = load_clip(clip_folder(clip_dir))
    if torch.cuda.is_available():
        model.to("cuda")
    full = evaluate_retrieval(model, tokenizer, data_dir, split, pool_size=None, seed=seed, progress=progress)
    pool = sample_pool(full.pool_size, pool_size, seed)
    pool_similarity = full.similarity[pool][:, pool]
    text_ranks, image_ranks = retrieval_ranks(full.similarity)
    pool_metrics = recall_at_k(pool_similarity)
    save_csv(
        csv_path(out_dir, "retrieval"),
        [
            {"index": i, "image": path, "rank_of_true_text": int(t), "rank_of_true_image": int(r)}
            for i, path, t, r in zip(full.indices, full.image_paths, text_ranks, image_ranks, strict=True)
        ],
        ["index", "image", "rank_of_true_text", "rank_of_true_image"],
    )
    r1 = {direction: metrics["R@1"] for direction, metrics in pool_metrics.items()}
    title = (
        f"{split} pool of {len(pool)}: R@1 image->text {r1['image_to_text']:.0f}%, "
        f"text->image {r1['text_to_image']:.0f}%"
    )
    viz.save_figure(viz.retrieval_matrix(pool_similarity, title), out_dir / "retrieval_similarity.png")
    return {
        f"pool_{pool_size}": {"pool_size": len(pool), **pool_metrics},
        "pool_full": {"pool_size": full.pool_size, **full.metrics},
        "direction_note": DIRECTION_NOTE,
    }


def unavailable(task: str, model_dir: Path, clip_dir: Path | None, model: Any) -> str | None:
    """Why ``task`` cannot run with the LaMed ``model`` (None: ``model_dir`` holds a CLIP) and the CLIP run
    ``clip_dir``, as a message naming the task and what to pass; None when it can."""
    if task == "retrieval":
        if clip_dir is None:
            return "retrieval needs a CLIP run: pass clip_dir (--clip DIR), the folder `train clip` wrote"
        return None
    if model is None:
        return (
            f"{task} needs a LaMed model: {model_dir} holds a CLIP model; pass a stage-1/2 run or an export"
        )
    if task in SEG_TASKS and model.seg_module is None:
        return (
            f"{task} needs a model with a seg module: {model_dir} has none; pass a stage-2 run trained "
            "with segmentation, or leave the task out"
        )
    return None


def load_results(path: Path, settings: dict[str, Any], force: bool) -> dict[str, Any]:
    """The bench.json at ``path`` to resume (a fresh one when absent); when it holds results of other
    ``settings``, an error, or with ``force`` a fresh one (results of two settings never mix)."""
    fresh = {**settings, "tasks": {}, "skipped": {}}
    if not path.is_file():
        return fresh
    bench = json.loads(path.read_text(encoding="utf-8"))
    differs = {key: (bench.get(key), value) for key, value in settings.items() if bench.get(key) != value}
    if not differs:
        return {**fresh, **bench}
    if not force:
        raise ValueError(
            f"{path} holds results of other settings {differs} (old, new); "
            "pass force=True (--force) to start over there, or choose another out_dir"
        )
    return fresh


def run_bench(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tasks: str | Iterable[str] = ("all",),
    clip_dir: str | os.PathLike | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    force: bool = False,
    pool_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``tasks`` (names from :data:`TASKS`, or "all") on ``split`` of ``data_dir`` and write the
    results and the report to ``out_dir``; returns the bench.json dict.

    ``model_dir``: a LaMed run, model folder or export. ``clip_dir``: the CLIP run for retrieval; when
    ``model_dir`` itself holds a CLIP (the course's stage-0 bench), it is used and the LaMed tasks cannot
    run. ``limit``: the first N samples of each generative task (retrieval always uses the whole split
    and a seeded pool of ``pool_size``). A task the model cannot do is an error when named, skipped with a
    printed reason (kept in bench.json's ``skipped``) under "all". Finished tasks are skipped unless
    ``force``. bench.json is rewritten atomically after every task, so an interrupted run resumes.
    """
    from m3d_lite.eval.report import write_report
    from m3d_lite.infer import load_model

    names = resolve_tasks(tasks)
    named = "all" not in ({tasks} if isinstance(tasks, str) else set(tasks))
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if clip_dir is None and holds_clip(model_dir):
        clip_dir = model_dir
    clip_dir = None if clip_dir is None else Path(clip_dir)
    settings = {
        "model": str(model_dir),
        "clip": None if clip_dir is None else str(clip_dir),
        "data": str(data_dir),
        "split": split,
        "limit": limit,
        "seed": seed,
        "pool_size": pool_size,
    }
    bench = load_results(out_dir / "bench.json", settings, force)
    todo = [t for t in names if force or t not in bench["tasks"] or not csv_path(out_dir, t).is_file()]
    for task in (task for task in names if task not in todo):
        print(f"{task}: done already ({csv_path(out_dir, task).name}), skipped; pass force to redo it")
    model = tokenizer = None
    if any(task != "retrieval" for task in todo) and clip_dir != model_dir:
        model, tokenizer = load_model(model_dir)
        if torch.cuda.is_available():
            model.to("cuda")
    reasons = {task: why for task in todo if (why := unavailable(task, model_dir, clip_dir, model))}
    if named and reasons:
        raise TaskUnavailable(next(iter(reasons.values())))
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in todo:
        if task in reasons:
            print(f"{task}: skipped: {reasons[task]}")
            bench["tasks"].pop(task, None)
            bench["skipped"][task] = reasons[task]
        else:
            bench["skipped"].pop(task, None)
            if task == "retrieval":
                summary = bench_retrieval(clip_dir, data_dir, out_dir, split, pool_size, seed, progress)
            else:
                result = EVALUATORS[task](
                    model,
                    tokenizer,
                    data_dir,
                    split=split,
                    limit=limit,
                    batch_size=batch_size,
                    progress=progress,
                )
                evaluators.write_rows_csv(result, csv_path(out_dir, task))
                summary = result.summary
            bench["tasks"][task] = summary
        save_json(out_dir / "bench.json", bench)
    save_json(out_dir / "bench.json", bench)  # also when every task was done already: the new settings
    write_report(bench, out_dir)
    return bench


def merge_benches(
    runs: Sequence[tuple[dict[str, Any], str | os.PathLike]], out_dir: str | os.PathLike
) -> dict[str, Any]:
    """One benchmark of several (bench.json dict, its folder) runs, e.g. the language tasks of one model and
    the segmentation tasks of another: tasks merged (a later run wins), the per-sample CSVs copied to
    ``out_dir``, a task skipped in one run but done in another no longer skipped, and the settings of
    each run kept under ``runs``. Written to ``out_dir/bench.json``; :func:`write_report` reads it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: dict[str, Any] = {"runs": [], "tasks": {}, "skipped": {}}
    for bench, folder in runs:
        merged["runs"].append({k: v for k, v in bench.items() if k not in ("tasks", "skipped")})
        merged["skipped"].update(bench.get("skipped", {}))
        for task, result in bench["tasks"].items():
            merged["tasks"][task] = result
            shutil.copyfile(csv_path(Path(folder), task), csv_path(out_dir, task))
    merged["skipped"] = {k: v for k, v in merged["skipped"].items() if k not in merged["tasks"]}
    save_json(out_dir / "bench.json", merged)
    return merged
