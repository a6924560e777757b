"""Your own NIfTI/DICOM scans -> the M3D-Cap layout (OUT/M3D_Cap/ct_case/<name>/<series>.npy) + previews.

Input (--src): a folder holding scan files (.nii, .nii.gz, .nrrd, .mha, .npy, multi-frame .dcm) and/or
DICOM series (a sub-folder per series, or the slices loose in SRC). Each scan is read with SimpleITK,
re-oriented to LPS (so its slices are axial), windowed (CT: --window NAME or LO HI in HU; MRI: leave
--window out for min-max, or --percentiles 0.5 99.5), cropped to the foreground and resized. A text
file SRC/<name>.txt next to a scan becomes its report (ct_case/<name>/text.txt). Writes a preview
montage OUT/previews/<name>.png per scan, OUT/M3D_Cap/M3D_Cap.json (all scans in --split) and
OUT/own_scans.json (source, original size, spacing, window of each scan).

Examples:
    python data_scripts/prepare_own_scans.py --src ~/scans --out data/mine --window "soft tissue" --scale ci
    python data_scripts/prepare_own_scans.py --src ~/mri --out data/mri --percentiles 0.5 99.5
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m3d_lite.data.m3d_release import (
    add_shape_args,
    finish,
    prepare_own_scans,
    run_script,
    script_parser,
    shape_from_args,
)
from m3d_lite.data.preprocess import window_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser(__doc__, None)
    add_shape_args(parser)
    intensity = parser.add_mutually_exclusive_group()
    intensity.add_argument(
        "--window",
        nargs="+",
        metavar="NAME | LO HI",
        help='CT window: "soft tissue", bone, lung, or two numbers in HU',
    )
    intensity.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="scale between these intensity percentiles (MRI), e.g. 0.5 99.5",
    )
    parser.add_argument(
        "--split",
        choices=("train", "validation", "test"),
        default="test",
        help="the M3D_Cap.json split that lists the scans (default test)",
    )
    parser.add_argument("--no-previews", action="store_true", help="do not draw the preview PNGs")
    args = parser.parse_args(argv)
    report = prepare_own_scans(
        args.src,
        args.out,
        shape_from_args(args),
        window_from_args(args.window),
        tuple(args.percentiles) if args.percentiles else None,
        args.split,
        previews=not args.no_previews,
    )
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
