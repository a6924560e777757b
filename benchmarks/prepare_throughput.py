"""How long do the data scripts take on real-sized scans? Prints seconds per volume for each converter.

    .venv/bin/python benchmarks/prepare_throughput.py           # 128 x 512 x 512 CTs, 3 per converter
    .venv/bin/python benchmarks/prepare_throughput.py --raw-shape 300 512 512 --cases 2 --workers 1 2

One M3D-Phantom CT is generated at --raw-shape (z, y, x) and written --cases times in the layout each
converter of ``m3d_lite.data.m3d_release`` reads: NIfTI for your own scans and for M3D-RefSeg (its organ
label map as the mask), numbered JPEG slices for M3D-Cap, an (X, Y, Z) npy plus a scipy-sparse npz of
--seg-masks channels (the organs, repeated) for M3D-Seg. Each converter then prepares them to --shape
(default M3D's 32 x 256 x 256) in a temporary folder; only the conversion is timed, after a warm-up case
(imports). Last, M3D-VQA's check and copy of a CSV as long as the release's. A pool of --workers > 1
processes starts anew (imports included) per run, so it needs many --cases to show its speed-up.
``docs/REAL_DATA.md`` extrapolates these figures to the full releases.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from PIL import Image
from scipy import sparse

from m3d_lite.data.formats import REFSEG_COLUMNS, VQA_COLUMNS
from m3d_lite.data.m3d_release import (
    prepare_m3d_cap,
    prepare_m3d_refseg,
    prepare_m3d_seg,
    prepare_m3d_vqa,
    prepare_own_scans,
)
from m3d_lite.data.phantom import ORGANS, PhantomCase, make_case
from m3d_lite.data.preprocess import WINDOWS, window_hu


def save_nifti(path: Path, array: np.ndarray, spacing_zyx) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(image, str(path), useCompression=True)


def write_own_scans(case: PhantomCase, folder: Path, names: list[str]) -> None:
    for name in names:
        save_nifti(folder / f"{name}.nii.gz", case.hu.astype(np.int16), case.spacing)


def write_cap(case: PhantomCase, folder: Path, names: list[str]) -> None:
    """Numbered grey JPEG slices per series, as Radiopaedia exports them, and a text.txt per case."""
    grey = (window_hu(case.hu, *WINDOWS["soft tissue"]) * 255).astype(np.uint8)
    for name in names:
        series = folder / "ct_case" / name / "Axial_C__portal_venous_phase"
        series.mkdir(parents=True)
        for index, plane in enumerate(grey, start=1):
            Image.fromarray(plane).save(series / f"{index}.jpeg", quality=90)
        (series.parent / "text.txt").write_text("study_findings: A phantom abdomen for timing.")


def write_seg(case: PhantomCase, folder: Path, names: list[str], channels: int) -> None:
    """M3D-Seg's release layout: ct/<case>.npy (1, X, Y, Z) + gt/<case>.(C, X, Y, Z).npz, one code;
    ``channels`` masks per case, the phantom's organs over and over."""
    code = folder / "0000"
    (code / "ct").mkdir(parents=True)
    (code / "gt").mkdir()
    image_xyz = np.swapaxes(case.hu, 0, 2)[None]
    labels = [list(ORGANS)[k % len(ORGANS)] for k in range(channels)]
    masks = np.stack([case.organ_labels == label for label in labels]).astype(np.uint8)
    masks_xyz = np.swapaxes(masks, 1, 3)
    shape = (channels, *image_xyz.shape[1:])
    items = []
    for name in names:
        np.save(code / "ct" / f"{name}.npy", image_xyz)
        label = f"gt/{name}.{shape}.npz"
        sparse.save_npz(code / label, sparse.csr_matrix(masks_xyz.reshape(shape[0], -1)))
        items.append({"image": f"0000/ct/{name}.npy", "label": f"0000/{label}"})
    (code / "0000.json").write_text(json.dumps({"labels": {}, "train": items, "test": []}))
    (folder / "dataset_info.json").write_text(json.dumps({"0000": [f"class {k}" for k in range(channels)]}))
    (folder / "term_dictionary.json").write_text(json.dumps({}))


def write_refseg(case: PhantomCase, folder: Path, names: list[str]) -> None:
    """M3D-RefSeg's layout: <case>/ct.nii.gz + mask.nii.gz (region labels) and a CSV of questions."""
    rows = []
    for name in names:
        save_nifti(folder / name / "ct.nii.gz", case.hu.astype(np.int16), case.spacing)
        save_nifti(folder / name / "mask.nii.gz", case.organ_labels, case.spacing)
        row = (f"{name}/ct.nii.gz", f"{name}/mask.nii.gz", "1", "0", "Segment the liver.", "It is [SEG].")
        rows.append(dict(zip(REFSEG_COLUMNS, row, strict=True)))
    pd.DataFrame(rows).to_csv(folder / "M3D_RefSeg.csv", index=False)


def time_vqa(rows: int, images: int, tmp: Path) -> float:
    """Seconds of ``prepare_m3d_vqa`` on a train CSV of ``rows`` rows over ``images`` image paths."""
    src = tmp / "vqa"
    src.mkdir()
    report = (
        "The liver is normal in size with a smooth outline. " * 10
    )  # rows of ~600 bytes, as the release's
    row = [report, "1", "Which plane is this image in?", "Axial", "Coronal", "Sagittal", "NA", "Axial", "A"]
    frame = pd.DataFrame(
        [[f"ct_case/{i % images:06d}/Axial.npy", *row] for i in range(rows)], columns=list(VQA_COLUMNS)
    )
    frame.to_csv(src / "M3D_VQA_train.csv", index=False)
    start = time.perf_counter()
    prepare_m3d_vqa(src, tmp / "out")
    return time.perf_counter() - start


def time_converter(
    write: Callable[[PhantomCase, Path, list[str]], None],
    convert: Callable[[Path, Path], object],
    case: PhantomCase,
    cases: int,
    tmp: Path,
) -> float:
    """Seconds per volume of ``convert`` on ``cases`` copies of ``case``, after a one-case warm-up."""
    warm, src = tmp / "warm", tmp / "src"
    write(case, warm, ["warm_up"])
    convert(warm, tmp / "warm_out")
    write(case, src, [f"case{i:03d}" for i in range(cases)])
    start = time.perf_counter()
    convert(src, tmp / "out")
    return (time.perf_counter() - start) / cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw-shape", type=int, nargs=3, default=[128, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.78, 0.78], metavar=("Z", "Y", "X"))
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 256, 256], metavar=("D", "H", "W"))
    parser.add_argument("--cases", type=int, default=3, help="volumes timed per converter")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="process counts for Cap and Seg")
    parser.add_argument(
        "--seg-masks", type=int, default=26, help="masks per M3D-Seg case (release: 149,196 / 5,772 = 26)"
    )
    parser.add_argument(
        "--vqa-rows", type=int, default=509_755, help="rows of the M3D-VQA CSV (release: 509,755)"
    )
    args = parser.parse_args()
    shape = tuple(args.shape)
    start = time.perf_counter()
    case = make_case("bench", 0, args.raw_shape, args.spacing)
    print(f"phantom CT {case.hu.shape} at {case.spacing} mm generated in {time.perf_counter() - start:.0f} s")
    # Process pools first: a pool forked after torch ran a multi-threaded op in this process hangs
    # (OpenMP is not fork-safe), so every run that converts in this process comes after them.
    converters: list[tuple[str, Callable, Callable]] = []
    for workers in sorted(args.workers, reverse=True):
        converters += [
            (
                f"M3D-Cap (JPEG slices), {workers} proc",
                write_cap,
                lambda src, out, w=workers: prepare_m3d_cap(src, out, shape, workers=w),
            ),
            (
                f"M3D-Seg ({args.seg_masks} masks), {workers} proc",
                partial(write_seg, channels=args.seg_masks),
                lambda src, out, w=workers: prepare_m3d_seg(src, out, shape, workers=w),
            ),
        ]
    converters += [
        (
            "own scans (NIfTI, previews)",
            write_own_scans,
            lambda src, out: prepare_own_scans(src, out, shape, "soft tissue"),
        ),
        ("M3D-RefSeg (NIfTI + mask)", write_refseg, lambda src, out: prepare_m3d_refseg(src, out, shape)),
    ]
    print(f"{'converter':36s} {'s/volume':>9s} {'volumes/hour':>13s}")
    for name, write, convert in converters:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = time_converter(write, convert, case, args.cases, Path(tmp))
        print(f"{name:36s} {seconds:9.2f} {3600 / seconds:13.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_vqa(args.vqa_rows, 96_170, Path(tmp))
    print(f"M3D-VQA: {args.vqa_rows} CSV rows checked and copied in {seconds:.1f} s")


if __name__ == "__main__":
    main()
