"""M3D-RefSeg (210 TotalSegmentator CTs with described regions) -> OUT/M3D_RefSeg: ct.npy, mask.npy, CSVs.

Input (--src): the released M3D-RefSeg:
    SRC/<case>/ct.nii.gz, SRC/<case>/mask.nii.gz (integer region labels), SRC/<case>/text.json
    SRC/*.csv   columns exactly  Image,Mask,Mask_ID,Question_Type,Question,Answer
Per case: CT clipped to its 0.5-99.5 intensity percentiles and scaled to [0, 1] (as M3D), cropped to
the foreground, resized (trilinear CT, nearest labels). Unlike M3D's script (nibabel, axes (z, x, y))
the volumes are read with SimpleITK in LPS (z, y, x) order like every other m3d-lite volume. CSV rows
get Image = <case>/ct.npy, Mask = <case>/mask.npy; rows of missing cases or with a Mask_ID that is not
a region of the prepared mask are reported and left out. Without *_train.csv / *_test.csv in SRC a
split by case is made (--test-fraction, --seed).

Examples:
    python data_scripts/prepare_m3d_refseg.py --hub-repo --out data/m3d --scale small
    python data_scripts/prepare_m3d_refseg.py --src /data/M3D_RefSeg --out data/m3d --limit 5
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m3d_lite.data.m3d_release import (
    add_shape_args,
    finish,
    prepare_m3d_refseg,
    run_script,
    script_parser,
    shape_from_args,
    source_from_args,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser(__doc__, "refseg")
    add_shape_args(parser)
    parser.add_argument("--limit", type=int, help="only the first N cases")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="when SRC has no train/test CSVs")
    parser.add_argument("--seed", type=int, default=0, help="seed of that split")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that were already written")
    args = parser.parse_args(argv)
    src = source_from_args(args, None)
    report = prepare_m3d_refseg(
        src, args.out, shape_from_args(args), args.limit, args.test_fraction, args.seed, args.overwrite
    )
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
