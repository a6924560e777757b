"""Check ``m3d-lite plan`` against measurements: peak memory and time per step of each stage on this CPU.

    .venv/bin/python benchmarks/plan_check.py                          # ci, ~/.cache/m3d_lite/phantom_ci
    .venv/bin/python benchmarks/plan_check.py --scale small --data /tmp/phantom_small --steps 3

Runs a few steps of stage 0, 1 and 2 with the preset's batch, each as its own process through the real
entry point (``python -m m3d_lite.train clip|align|instruct``, i.e. ``train_clip``, ``train_align``,
``train_instruct``; stage 1 on stage 0's ViT, stage 2 on stage 1's model) into a temporary folder, and
prints, next to :func:`m3d_lite.plan.plan` for one CPU process: the peak RSS of that process (``os.wait4``),
and its time per step (``metrics.jsonl``, one record per step, the first left out). Writes the phantom
unless it is there (``--num-volumes``; ~13 GB at small). A few steps may not meet the longest batch;
:data:`MEASURED_SMALL` holds the peaks of full runs at small, printed beside the plan for that scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from m3d_lite.config import SCALES, DataConfig, default_data_dir
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.plan import GIB, STAGES, Setup, describe, plan

# Full runs at small on a 2-core CPU, fp32: (peak RSS in GiB, seconds per step), measured by the benchmarks
# (ru_maxrss over training and their evaluation): clip_small.py 300 steps x 16, align_small.py 250 steps x 4
# (captions, closed and open VQA 1:1:1), instruct_small.py 500 steps x 4 (LoRA r 16, seg module).
MEASURED_SMALL = {"clip": (2.5, 3.76), "align": (3.8, 4.94), "instruct": (6.0, 6.83)}


def run_stage(stage: str, scale: str, data: Path, out: Path, steps: int, previous: Path | None) -> dict:
    """Train ``stage`` for ``steps`` in a fresh process; its peak RSS (bytes) and median seconds per step."""
    command = [sys.executable, "-m", "m3d_lite.train", stage, "--scale", scale, "--data", str(data)]
    command += ["--out", str(out), "--max-steps", str(steps), "--set", "log_every=1", "--set", "save_every=0"]
    if stage == "align":
        command += ["--vision", str(previous)]
    if stage == "instruct":
        command += ["--model", str(previous)]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **os.environ}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batch = json.loads((out / "run.json").read_text())["batch_size"]
    step_seconds = [batch / r["samples_per_s"] for r in records[1:]] or [batch / records[0]["samples_per_s"]]
    return {"peak": usage.ru_maxrss * 1024, "seconds_per_step": statistics.median(step_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=SCALES[:2], default="ci")
    parser.add_argument("--data", type=Path, default=None, help="phantom root (default: the scale's cache)")
    parser.add_argument("--num-volumes", type=int, default=None, help="default: the scale's preset")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    data = args.data or default_data_dir(args.scale)
    ensure_phantom_dataset(
        data, args.num_volumes or DataConfig.from_scale(args.scale).num_volumes, args.scale
    )
    setup = Setup(gpus=0, zero=0, gpu_mem_gib=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB)
    plans = {p.stage: p for p in plan(args.scale, setup)}
    print(describe(args.scale, setup))
    header = f"{'stage':<9}{'batch':>6}{'peak RSS':>10}{'plan':>8}{'error':>8}{'s/step':>8}{'plan':>8}"
    if args.scale == "small":
        header += f"{'full run':>10}{'error':>8}{'s/step':>8}"
    print(header + "\n" + "-" * len(header))
    previous = None
    with tempfile.TemporaryDirectory(prefix="plan_check_") as tmp:
        for stage in STAGES:
            out = Path(tmp) / stage
            measured = run_stage(stage, args.scale, data, out, args.steps, previous)
            previous = out
            p = plans[stage]
            line = (
                f"{stage:<9}{p.batch_size:>6}{measured['peak'] / GIB:>10.2f}{p.total / GIB:>8.2f}"
                f"{p.total / measured['peak'] - 1:>+8.0%}{measured['seconds_per_step']:>8.2f}"
                f"{p.seconds_per_step:>8.2f}"
            )
            if args.scale == "small":
                peak, seconds = MEASURED_SMALL[stage]
                line += f"{peak:>10.2f}{p.total / GIB / peak - 1:>+8.0%}{seconds:>8.2f}"
            print(line, flush=True)
    print("memory in GiB; error = plan / measured - 1; s/step at the plan's CPU TFLOP/s")


if __name__ == "__main__":
    main()
