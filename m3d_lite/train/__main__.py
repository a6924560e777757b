"""Train a stage from the shell; the same module runs in one process and under ``accelerate launch``.

On a laptop (one CPU process; ``--set`` overrides any preset value of the stage or its model):

    python -m m3d_lite.train clip --scale ci --data /tmp/phantom_ci --out runs/clip_ci
    python -m m3d_lite.train clip --scale ci --data /tmp/phantom_ci --out runs/clip_ci --resume
    python -m m3d_lite.train clip --scale small --data DATA --out OUT --max-steps 200 --set learning_rate=5e-4
    python -m m3d_lite.train align --scale ci --data /tmp/phantom_ci --vision runs/clip_ci --out runs/align_ci
    python -m m3d_lite.train instruct --scale ci --data /tmp/phantom_ci --model runs/align_ci \\
        --out runs/instruct_ci

On 8 GPUs (DeepSpeed ZeRO-2, bf16; ``batch_size`` of the preset is per GPU):

    accelerate launch --config_file m3d_lite/configs/accelerate/8gpu_zero2.yaml \\
        -m m3d_lite.train clip --scale paper --data /data/M3D --out runs/clip_paper
    accelerate launch --config_file m3d_lite/configs/accelerate/8gpu_zero2.yaml \\
        -m m3d_lite.train align --scale paper --data /data/M3D --vision runs/clip_paper --out runs/align_paper
    accelerate launch --config_file m3d_lite/configs/accelerate/8gpu_zero2.yaml \\
        -m m3d_lite.train instruct --scale paper --data /data/M3D --model runs/align_paper \\
        --out runs/instruct_paper

The paper presets keep M3D's global batch on any number of GPUs (one GPU accumulates 8 micro-batches);
``1gpu.yaml``, ``8gpu_ddp.yaml``, ``8gpu_zero3.yaml`` and ``8gpu_fsdp.yaml`` are the other launch configs,
and ``--set gradient_checkpointing=true`` trades compute for memory (README: "Training at the paper scale").

A stage-2 run saves its model as LaMed weights + LoRA adapter; `m3d-lite export --model runs/instruct_ci
--out DIR` merges them into one plain checkpoint.

Exit status 0 on success, 2 on a usage or data error (the message says what and where).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from m3d_lite.config import SCALES


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML (``3``, ``true``, ``null``, ``[32, 64, 64]``); ``1e-4`` is a float too."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: value}``; a pair without ``=`` is an error naming it."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = parse_value(value)
    return overrides


def cmd_clip(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from m3d_lite.train.clip import train_clip

    overrides = parse_overrides(args.set)
    result = train_clip(
        args.scale, args.data, args.out, max_steps=args.max_steps, resume=args.resume, **overrides
    )
    if PartialState().is_main_process:
        print_result(result)
        print(f"model: {args.out / 'model'}  vision encoder: {args.out / 'vision_encoder'}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from m3d_lite.train.align import train_align

    overrides = parse_overrides(args.set)
    result = train_align(
        args.scale,
        args.data,
        args.vision,
        args.out,
        llm=args.llm,
        max_steps=args.max_steps,
        resume=args.resume,
        **overrides,
    )
    if PartialState().is_main_process:
        print_result(result)
        print(f"model: {args.out / 'model'}")
    return 0


def cmd_instruct(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from m3d_lite.train.instruct import train_instruct

    overrides = parse_overrides(args.set)
    result = train_instruct(
        args.scale,
        args.data,
        args.model,
        args.out,
        segmentation=not args.no_segmentation,
        seg_encoder_from_vision=not args.random_seg_encoder,
        seg_state_norm=not args.raw_seg_states,
        max_steps=args.max_steps,
        resume=args.resume,
        **overrides,
    )
    if PartialState().is_main_process:
        print_result(result)
        print(f"model: {args.out / 'model'} (base/ + adapter/; merge it with `m3d-lite export`)")
    return 0


def print_result(result: Any) -> None:
    """One line on the run (steps, time, final loss) and where its metrics are."""
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"{result.steps} steps in {result.seconds:.1f} s, final loss {loss}")
    print(f"metrics: {result.metrics_path}")


def add_stage(stages: Any, name: str, help: str, data_help: str) -> argparse.ArgumentParser:
    """A stage sub-command with the options every stage has: scale, data, out, steps, resume, --set."""
    p = stages.add_parser(name, help=help)
    p.add_argument("--scale", choices=SCALES, default="ci")
    p.add_argument("--data", required=True, type=Path, help=data_help)
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value, e.g. learning_rate=5e-4 or hidden_size=32 (repeatable)",
    )
    return p


def build_parser(prog: str = "python -m m3d_lite.train") -> argparse.ArgumentParser:
    """The parser of the training entry point, one sub-command per stage (reused by ``m3d-lite train``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stages = parser.add_subparsers(dest="stage", required=True)
    p = add_stage(
        stages,
        "clip",
        "stage 0: pretrain M3D-CLIP on M3D-Cap image-report pairs",
        "dataset root holding M3D_Cap/",
    )
    p.set_defaults(func=cmd_clip)
    p = add_stage(
        stages,
        "align",
        "stage 1: align the projector (LLM and vision encoder frozen) on captions + VQA",
        "dataset root holding M3D_Cap/ and M3D_VQA/",
    )
    p.add_argument(
        "--vision",
        required=True,
        type=Path,
        help="stage-0 vision encoder: a run folder of `clip` (holding vision_encoder/) or that folder",
    )
    p.add_argument("--llm", default=None, help="LLM name, Hub id or folder (default: the preset's)")
    p.set_defaults(func=cmd_align)
    p = add_stage(
        stages,
        "instruct",
        "stage 2: LoRA instruction tuning on captions, VQA, REC, REG and segmentation (LLM under LoRA)",
        "dataset root holding M3D_Cap/, M3D_VQA/ and M3D_Seg/",
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="stage-1 model: a run folder of `align` (holding model/) or that model/ folder",
    )
    p.add_argument(
        "--no-segmentation", action="store_true", help="no seg module and no seg tasks (M3D's HEAD default)"
    )
    p.add_argument(
        "--random-seg-encoder",
        action="store_true",
        help="start the seg image encoder from random weights, not from the vision tower",
    )
    p.add_argument(
        "--raw-seg-states",
        action="store_true",
        help="feed the [SEG] states to the seg projector as they are (M3D), not standardised",
    )
    p.set_defaults(func=cmd_instruct)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m m3d_lite.train") -> int:
    """Parse ``argv`` and run the stage; errors a user can fix print one line and return 2."""
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"m3d_lite.train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
