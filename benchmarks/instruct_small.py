"""Stage 2 at the small scale on the phantom: instruction-tune the stage-1 model, then evaluate it.

    .venv/bin/python benchmarks/instruct_small.py --data ~/.cache/m3d_lite/phantom_small \\
        --align runs/align_small --out runs/instruct_small

Trains with the ``small`` preset (``--max-steps`` to shorten it; ``--scale ci`` for a quick dry run on a
ci phantom), saves the loss curve as ``OUT/loss.png``, reloads the trained model as inference does
(:func:`m3d_lite.infer.load_model`: LoRA merged) and evaluates the first ``--limit`` test samples of
closed VQA (per question type), open VQA, report generation and REC, and for a model with a seg module
semantic and referring segmentation (:mod:`m3d_lite.eval.tasks`). Writes
each task's per-sample rows as ``OUT/eval_<task>.csv`` and everything printed as ``OUT/summary.json``:
training steps, time, time per step, first and final logged loss, peak memory (max RSS of this process),
evaluation time and the task summaries.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from m3d_lite.eval.tasks import (
    evaluate_closed_vqa,
    evaluate_open_vqa,
    evaluate_rec,
    evaluate_referring_segmentation,
    evaluate_reports,
    evaluate_segmentation,
    write_rows_csv,
)
from m3d_lite.infer import load_model
from m3d_lite.io import save_json
from m3d_lite.train.instruct import train_instruct
from m3d_lite.viz import save_figure, training_curves

TASKS = (evaluate_closed_vqa, evaluate_open_vqa, evaluate_reports, evaluate_rec)
SEG_TASKS = (evaluate_segmentation, evaluate_referring_segmentation)  # for a model with a seg module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="phantom root (the one stage 1 used)")
    parser.add_argument("--align", type=Path, required=True, help="stage-1 run folder or its model/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", default="small", help="preset of training (ci: a quick dry run)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--task-weights",
        type=lambda text: [float(w) for w in text.split(",")],
        default=None,
        help="shares of the 10 tasks, INSTRUCTION_TASKS + SEGMENTATION_TASKS order (default: by size)",
    )
    parser.add_argument(
        "--raw-seg-states", action="store_true", help="no seg_state_norm: M3D's [SEG] states as they are"
    )
    parser.add_argument("--limit", type=int, default=100, help="test samples per task for evaluation")
    parser.add_argument(
        "--tasks",
        type=lambda text: text.split(","),
        default=None,
        help="evaluate only these tasks, e.g. segmentation,referring_segmentation (default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the evaluation's decoding")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue (or just evaluate) the run in --out, e.g. one trained by "
        "`m3d-lite train instruct` with the same settings",
    )
    args = parser.parse_args()

    result = train_instruct(
        args.scale,
        args.data,
        args.align,
        args.out,
        task_weights=args.task_weights,
        seg_state_norm=not args.raw_seg_states,
        max_steps=args.max_steps,
        resume=args.resume,
    )
    title = f"stage 2 ({args.scale})"
    curve = save_figure(training_curves(result.metrics_path, title=title), args.out / "loss.png")
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    summary = {
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / result.steps, 2),
        "first_logged_loss": records[0]["loss"],
        "final_loss": result.final_loss,
    }
    del result  # frees the trained model: it is evaluated as inference loads it

    start = time.perf_counter()
    model, tokenizer = load_model(args.out)
    if torch.cuda.is_available():
        model.to("cuda")
    evaluations = {}
    for evaluate in TASKS + (SEG_TASKS if model.seg_module is not None else ()):
        if args.tasks is not None and evaluate.__name__.removeprefix("evaluate_") not in args.tasks:
            continue
        task = evaluate(model, tokenizer, args.data, "test", limit=args.limit, batch_size=args.batch_size)
        write_rows_csv(task, args.out / f"eval_{task.task}.csv")
        evaluations[task.task] = {name: round(value, 4) for name, value in task.summary.items()}
    summary |= {
        "eval_seconds": round(time.perf_counter() - start, 1),
        "eval_samples_per_task": args.limit,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loss_curve": str(curve),
        "tasks": evaluations,
    }
    save_json(args.out / "summary.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
