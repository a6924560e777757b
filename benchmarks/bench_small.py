"""M3D-Bench at the small scale: all 8 tasks on a stage-2 model and a CLIP run, then the report.

    .venv/bin/python benchmarks/bench_small.py --model runs/instruct_small --clip runs/clip_small \\
        --data ~/.cache/m3d_lite/phantom_small --out runs/bench_small --limit 50

The model comes from ``benchmarks/instruct_small.py`` (or ``m3d-lite train instruct --scale small``), the
CLIP run from ``benchmarks/clip_small.py``. Prints the time per task, the peak memory (max RSS of this
process), where ``report.md`` / ``report.html`` are, and the headline table. Resumable: a rerun skips the
tasks already in ``--out`` (``--force`` reruns them).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from m3d_lite.eval.bench import TASKS, run_bench
from m3d_lite.eval.report import headline_table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="stage-2 run folder (or an export)")
    parser.add_argument("--clip", type=Path, required=True, help="CLIP run folder, for retrieval")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=50, help="test samples per generative task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    seconds = {}
    for task in TASKS:  # one task at a time, to time each (the model is loaded for each: ~10 s)
        start = time.perf_counter()
        bench = run_bench(
            args.model,
            args.data,
            args.out,
            tasks=(task,),
            clip_dir=args.clip,
            limit=args.limit,
            batch_size=args.batch_size,
            force=args.force and task == TASKS[0],  # a forced run starts afresh once
        )
        seconds[task] = round(time.perf_counter() - start, 1)
    print(f"seconds per task: {seconds}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    print(f"report: {args.out / 'report.html'} (and report.md)\n")
    print(headline_table(bench))


if __name__ == "__main__":
    main()
