"""M3D-Cap (raw Radiopaedia slices + reports) -> OUT/M3D_Cap: <id>/<series>.npy, text.txt, M3D_Cap.json.

Input (--src): the released raw layout, unzipped:
    SRC/ct_case/<6-digit id>/<series name>/1.jpeg, 2.jpeg, ...   (numbered JPEG/PNG slices)
    SRC/ct_case/<6-digit id>/text.txt                             (the case text)
    SRC/ct_quizze/...                                             (same layout; optional)
    SRC/M3D_Cap.json                                              (optional: the released split)
Per series, as M3D's m3d_cap_data_prepare.py: slices in numeric order, grey / 255, only the slices of
the most common shape, min-max, crop to the foreground, resize to --shape. Text: what follows
"study_findings:", else "discussion:", else the whole file, on one line. Without SRC/M3D_Cap.json the
split is made by case with --val-fraction, --test-fraction and --seed. Re-running skips series already
written (--overwrite redoes them).

NOTE: the Hub dataset GoodBaiBai88/M3D-Cap is disabled by a DMCA takedown (Radiopaedia's terms forbid
redistribution), so --hub-repo will most likely fail; use a copy you are entitled to.

Examples:
    python data_scripts/prepare_m3d_cap.py --src /data/M3D_Cap_raw --out data/m3d --scale small --workers 8
    python data_scripts/prepare_m3d_cap.py --src /data/M3D_Cap_raw --out data/m3d --limit 20   # a quick try
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m3d_lite.data.m3d_release import (
    add_shape_args,
    finish,
    prepare_m3d_cap,
    run_script,
    script_parser,
    shape_from_args,
    source_from_args,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser(__doc__, "cap")
    add_shape_args(parser)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of cases in validation")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="share of cases in test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--limit", type=int, help="only the first N cases of each subset")
    parser.add_argument("--workers", type=int, default=1, help="processes (M3D used 32)")
    parser.add_argument("--overwrite", action="store_true", help="redo series that were already written")
    args = parser.parse_args(argv)
    src = source_from_args(args, ["M3D_Cap.json", "ct_case/*", "ct_quizze/*", "*.zip"])
    report = prepare_m3d_cap(
        src,
        args.out,
        shape_from_args(args),
        args.val_fraction,
        args.test_fraction,
        args.seed,
        args.limit,
        args.workers,
        args.overwrite,
    )
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
