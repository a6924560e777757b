"""M3D-Seg (25 public CT segmentation sets) -> OUT/M3D_Seg/<code>/<case>/image.npy + masks/mask_<k>.npy.

Input (--src): the released M3D-Seg, unzipped:
    SRC/dataset_info.json            {"0000": ["liver", "right kidney", ...], ...}  class names per code
    SRC/term_dictionary.json         class name -> definitions (copied)
    SRC/<code>/<code>.json           {"labels": ..., "train": [{"image": ..., "label": ...}], "test": [...]}
    SRC/<code>/<case>/image.npy      1 x X x Y x Z            (or <code>/ct/<case>.npy)
    SRC/<code>/<case>/mask_(C, X, Y, Z).npz   scipy.sparse CSR, C x (X*Y*Z)
                                     (or <code>/gt/<case>.(C, X, Y, Z).npz)
The json's paths decide which files are read (relative to SRC, to SRC/<code>, or absolute paths of the
authors' disk, re-rooted at <code>). Per case, as M3D's m3d_seg_data_prepare.py: axes to (Z, Y, X),
min-max, crop to the image foreground, resize (trilinear image, nearest masks); a class absent after the
resize is saved as a 1x1x1x1 zero array (M3D's negative sample). The rewritten <code>.json lists one
item per (image, class). No orientation or spacing is restored: the release keeps none (M3D issue #51).

Examples:
    python data_scripts/prepare_m3d_seg.py --hub-repo --codes 0000 0007 --out data/m3d --scale small
    python data_scripts/prepare_m3d_seg.py --src /data/M3D_Seg --out data/m3d --workers 8
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m3d_lite.data.m3d_release import (
    add_shape_args,
    finish,
    prepare_m3d_seg,
    run_script,
    script_parser,
    shape_from_args,
    source_from_args,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser(__doc__, "seg")
    add_shape_args(parser)
    parser.add_argument(
        "--codes", nargs="+", metavar="CODE", help="sub-datasets to prepare (default: all found)"
    )
    parser.add_argument("--limit", type=int, help="only the first N cases of each split")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    parser.add_argument("--overwrite", action="store_true", help="redo cases that were already written")
    args = parser.parse_args(argv)
    patterns = ["dataset_info.*", "term_dictionary.json"]
    patterns += [f"{code}*" for code in args.codes] if args.codes else ["*"]
    src = source_from_args(args, patterns)
    report = prepare_m3d_seg(
        src, args.out, shape_from_args(args), args.codes, args.limit, args.workers, args.overwrite
    )
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
