"""Write the synthetic M3D-Phantom dataset (raw NIfTI + M3D-Cap, -VQA, -Seg, -RefSeg layouts) to --out.

The phantom is an abdominal CT with known organs, lesions and findings, written in exactly the M3D
file formats, so everything that reads the real M3D data reads it too. Deterministic from --seed.

Examples:
    python data_scripts/make_phantom.py --out data/phantom                       # ci scale
    python data_scripts/make_phantom.py --out data/phantom_small --scale small --num-volumes 1000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from m3d_lite.config import SCALES, DataConfig


def main(argv: Sequence[str] | None = None) -> int:
    first, _, rest = __doc__.strip().partition("\n")
    parser = argparse.ArgumentParser(
        description=first, epilog=rest.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--scale", choices=SCALES, default="ci", help="size preset (default ci)")
    parser.add_argument("--num-volumes", type=int, help="default: the scale's preset")
    parser.add_argument("--seed", type=int, help="default: the scale's preset")
    args = parser.parse_args(argv)
    from m3d_lite.data.phantom_dataset import write_phantom_dataset

    cfg = DataConfig.from_scale(args.scale, num_volumes=args.num_volumes, seed=args.seed)
    print(write_phantom_dataset(args.out, cfg.num_volumes, args.scale, cfg.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
