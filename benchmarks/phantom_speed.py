"""How fast is the M3D-Phantom? Prints volumes per minute for generating and for writing whole datasets.

    .venv/bin/python benchmarks/phantom_speed.py                      # ci and small, 50 volumes each
    .venv/bin/python benchmarks/phantom_speed.py --scale ci --num-volumes 200

"generate" is ``make_case`` alone; "write" is ``write_phantom_dataset`` (generation, raw NIfTI,
M3D-Cap/VQA/Seg/RefSeg files, one process) into a temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from m3d_lite.config import DataConfig
from m3d_lite.data.phantom import make_case
from m3d_lite.data.phantom_dataset import case_seed, write_phantom_dataset


def folder_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", nargs="+", default=["ci", "small"], help="one or more of ci, small, paper")
    parser.add_argument("--num-volumes", type=int, default=50)
    args = parser.parse_args()
    print(f"{'scale':6s} {'volumes':>7s} {'generate/min':>12s} {'write/min':>10s} {'MB/volume':>10s}")
    for scale in args.scale:
        config = DataConfig.from_scale(scale)
        start = time.perf_counter()
        for index in range(args.num_volumes):
            make_case(f"bench_{index}", case_seed(0, index), config.raw_shape, config.raw_spacing)
        generate = 60 * args.num_volumes / (time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            summary = write_phantom_dataset(Path(tmp) / "root", args.num_volumes, scale=scale, progress=False)
            size = folder_size_mb(summary.path) / args.num_volumes
        write = summary.volumes_per_minute
        print(f"{scale:6s} {args.num_volumes:7d} {generate:12.0f} {write:10.0f} {size:10.1f}")


if __name__ == "__main__":
    main()
