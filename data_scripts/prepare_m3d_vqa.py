"""M3D-VQA CSVs -> OUT/M3D_VQA, checked: exact columns, and whether each row's image exists.

Input (--src): a folder with M3D_VQA_train.csv, M3D_VQA_val.csv, M3D_VQA_test.csv (and any other
M3D_VQA_*.csv). Columns must be exactly
    Image Path,Text,Question Type,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer Choice
(a file with other columns, such as the yes/no set M3D_VQA_yn_train.csv, is reported and not copied).
"Image Path" is relative to the prepared M3D-Cap folder (--cap-root, default OUT/M3D_Cap): rows whose
image is missing there are counted and, with --drop-missing, left out. Since M3D-Cap itself was taken
down, expect many missing images unless you have a copy of it.

Examples:
    python data_scripts/prepare_m3d_vqa.py --hub-repo --out data/m3d            # GoodBaiBai88/M3D-VQA
    python data_scripts/prepare_m3d_vqa.py --src /data/M3D-VQA --out data/m3d --limit 1000 --drop-missing
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from m3d_lite.data.m3d_release import finish, prepare_m3d_vqa, run_script, script_parser, source_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser(__doc__, "vqa")
    parser.add_argument("--cap-root", type=Path, help="prepared M3D_Cap folder (default OUT/M3D_Cap)")
    parser.add_argument("--limit", type=int, help="only the first N rows of each file")
    parser.add_argument("--drop-missing", action="store_true", help="leave out rows whose image is missing")
    args = parser.parse_args(argv)
    src = source_from_args(args, ["*.csv"])
    report = prepare_m3d_vqa(src, args.out, args.cap_root, args.limit, args.drop_missing)
    return finish(report, args.out)


if __name__ == "__main__":
    sys.exit(run_script(main))
