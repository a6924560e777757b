"""Stage 0 at the small scale on the phantom: train M3D-CLIP, then image<->text retrieval on a 100-pair pool.

    .venv/bin/python benchmarks/clip_small.py --data ~/.cache/m3d_lite/phantom_small --out runs/clip_small

Writes the phantom (1000 volumes, ~13 GB, a few minutes) unless it is already there, trains with the
``small`` preset (override the steps with --max-steps), and prints training time, peak memory (max RSS of
this process) and Recall@1/5/10 in both directions on the test pool and, for contrast, on a training pool.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from m3d_lite.config import DataConfig
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.eval.retrieval import evaluate_retrieval
from m3d_lite.models.clip import load_clip
from m3d_lite.train.clip import train_clip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-volumes", type=int, default=DataConfig.from_scale("small").num_volumes)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--pool-size", type=int, default=100)
    args = parser.parse_args()

    start = time.perf_counter()
    ensure_phantom_dataset(args.data, args.num_volumes, scale="small", seed=0)
    data_seconds = time.perf_counter() - start

    result = train_clip("small", args.data, args.out, max_steps=args.max_steps)
    model, tokenizer = load_clip(args.out / "model")
    rows = {}
    for split in ("test", "train"):
        res = evaluate_retrieval(model, tokenizer, args.data, split=split, pool_size=args.pool_size, seed=0)
        rows[split] = {"pool_size": res.pool_size, **res.metrics}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    summary = {
        "phantom_seconds": round(data_seconds, 1),
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "peak_rss_gb": round(peak_gb, 2),
        "retrieval": rows,
    }
    print(json.dumps(summary, indent=2))
    print(f"\n{'pool':<12}{'direction':<15}{'R@1':>7}{'R@5':>7}{'R@10':>7}")
    for split, row in rows.items():
        for direction in ("image_to_text", "text_to_image"):
            r = row[direction]
            print(
                f"{split + ' ' + str(row['pool_size']):<12}{direction:<15}"
                f"{r['R@1']:>7.1f}{r['R@5']:>7.1f}{r['R@10']:>7.1f}"
            )


if __name__ == "__main__":
    main()
