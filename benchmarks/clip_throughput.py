"""How fast does M3D-CLIP train on this machine? Samples per second of forward + backward, and peak memory.

    .venv/bin/python benchmarks/clip_throughput.py                          # ci and small, preset batch sizes
    .venv/bin/python benchmarks/clip_throughput.py --scale small --batch-size 4 --steps 10

Inputs are random (volumes of the scale's shape, ``max_text_len`` random token ids), so only the model's
cost is measured, not data loading. ``--warmup`` steps run first and are not timed. Peak RSS is the
process's peak so far, so run the scales from small to large (the default order) or one at a time.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from m3d_lite.config import TrainConfig
from m3d_lite.models.clip import build_clip

ROW = "{:6} {:>10} {:>5} {:>7} {:>9} {:>13}"


def step_seconds(scale: str, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Mean seconds of one forward + backward at ``scale`` and the model's parameters in millions."""
    torch.manual_seed(0)
    model, _ = build_clip(scale)
    model.train()
    vision = model.config.vision_config
    images = torch.rand(batch_size, 1, *vision["image_size"])
    input_ids = torch.randint(
        1000, model.config.text_config["vocab_size"], (batch_size, model.config.max_text_len)
    )
    attention_mask = torch.ones_like(input_ids)
    for index in range(warmup + steps):
        if index == warmup:
            start = time.perf_counter()
        model(images, input_ids, attention_mask).loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps, sum(p.numel() for p in model.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", nargs="+", default=["ci", "small"], help="one or more of ci, small, paper")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's train_clip batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, forward + backward, fp32")
    print(ROW.format("scale", "params (M)", "batch", "s/step", "samples/s", "peak RSS (GB)"))
    for scale in args.scale:
        batch_size = args.batch_size or TrainConfig.from_scale(scale, "clip").batch_size
        seconds, params = step_seconds(scale, batch_size, args.steps, args.warmup)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(
            ROW.format(
                scale,
                f"{params:.1f}",
                batch_size,
                f"{seconds:.2f}",
                f"{batch_size / seconds:.1f}",
                f"{peak_gb:.2f}",
            )
        )


if __name__ == "__main__":
    main()
