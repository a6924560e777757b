"""What the demo accepts, checked before the model sees it: an uploaded scan within a size limit, the
question of each task, and that question within the model's token budget.

Scans load through :func:`m3d_lite.infer.load_scan`, as in ``m3d-lite infer``; a zipped DICOM series is
unpacked to a temporary folder first. Every refusal is a ``ValueError`` that names the file or the value
and what was expected: the app shows it in the page and keeps serving.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m3d_lite.config import SCALES, DataConfig, default_data_dir
from m3d_lite.data import text
from m3d_lite.data.phantom_dataset import SEG_CODE, case_id, split_of
from m3d_lite.data.preprocess import Window, dicom_series
from m3d_lite.infer import ScanInput, load_scan

MAX_VOXELS = 512 * 512 * 1024  # 268 million voxels, 1 GiB as float32: a long thin-slice CT still fits
MAX_UPLOAD = "1gb"  # Gradio refuses bigger uploads before they reach the app
MAX_UNZIPPED_BYTES = 2 * 2**30  # a zipped series may unpack to this much (guards against zip bombs)

TASKS = ("free question", "report", "VQA with choices", "REC (box)", "segmentation")


def task_question(task: str, question: str = "", target: str = "", choices: Sequence[str] = ()) -> str:
    """The question sent for ``task``, in the wording the model was trained on (:mod:`m3d_lite.data.text`):
    a free ``question`` as it is; a report request; ``question`` with four ``choices`` in M3D's closed-VQA
    format; a box or a mask of ``target`` (an organ name or a description)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
    question, target = question.strip(), target.strip()
    if task == "report":
        return text.CAPTION_PROMPTS[0]
    if task in ("REC (box)", "segmentation"):
        if not target:
            raise ValueError(f"{task}: name the target (an organ such as 'liver', or a description)")
        templates = text.REC_QUESTIONS if task == "REC (box)" else text.SEG_QUESTIONS
        return templates[0].format(target)
    if not question:
        raise ValueError(f"{task}: the question is empty; type one")
    if task == "VQA with choices":
        choices = tuple(choice.strip() for choice in choices)
        if len(choices) != 4 or not all(choices):
            raise ValueError(f"VQA with choices: fill in all four choices A-D, got {list(choices)}")
        # only the question and the choices are read: the type and the answer letter do not matter here
        return text.closed_vqa_question(text.VQAItem(0, question, choices, "A"))
    return question


def voxel_count(path: Path) -> int | None:
    """Voxels of the scan at ``path`` from its header alone (no pixel data read); None when the header
    cannot be read, so that loading it names the problem."""
    try:
        if path.is_dir():
            series = list(dicom_series(path).values())
            if len(series) != 1:
                return None
            reader, files = sitk.ImageFileReader(), series[0]
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            return math.prod(reader.GetSize()) * len(files)
        if path.suffix == ".npy":
            return math.prod(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return math.prod(reader.GetSize())
    except (RuntimeError, ValueError, OSError):
        return None


def _check_size(path: Path, name: str, max_voxels: int) -> None:
    count = voxel_count(path)
    if count is not None and count > max_voxels:
        raise ValueError(
            f"{name}: {count:,} voxels is over the demo's limit of {max_voxels:,} "
            f"(512 x 512 x {max_voxels // 512**2} at most); crop or downsample the scan first"
        )


def _series_folder(root: Path, name: str) -> Path:
    """The one folder under ``root`` (itself included) that holds one DICOM series."""
    found = []
    for folder in (root, *sorted(p for p in root.rglob("*") if p.is_dir())):
        found += [(folder, len(files)) for files in dicom_series(folder).values()]
    if len(found) == 1:
        return found[0][0]
    if not found:
        count = sum(1 for p in root.rglob("*") if p.is_file())
        raise ValueError(
            f"{name}: no DICOM series in this zip ({count} files); expected the .dcm files of one"
        )
    listing = "; ".join(f"{folder.relative_to(root)} ({n} files)" for folder, n in found)
    raise ValueError(f"{name}: holds {len(found)} DICOM series, expected one: {listing}")


def _load_zipped_series(path: Path, image_size: Sequence[int], window: Window, max_voxels: int) -> ScanInput:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path.name}: not a readable zip file; expected a zipped DICOM series") from None
    with archive, tempfile.TemporaryDirectory(prefix="m3d-lite-dicom-") as tmp:
        unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > MAX_UNZIPPED_BYTES:
            raise ValueError(
                f"{path.name}: unpacks to {unpacked / 2**30:.1f} GiB, over the demo's limit of "
                f"{MAX_UNZIPPED_BYTES / 2**30:.0f} GiB"
            )
        archive.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
        try:
            folder = _series_folder(Path(tmp), path.name)
            _check_size(folder, path.name, max_voxels)
            scan = load_scan(folder, image_size, window)
        except ValueError as error:  # name the zip, not the temporary folder
            raise ValueError(str(error).replace(tmp, path.name)) from None
    scan.source = str(path)
    return scan


def read_upload(
    path: str | os.PathLike, image_size: Sequence[int], window: Window = None, max_voxels: int = MAX_VOXELS
) -> ScanInput:
    """An uploaded scan as the model's input (see :func:`~m3d_lite.infer.load_scan`): NIfTI, DICOM file,
    a ``.zip`` of one DICOM series, NRRD, MHA or ``.npy``; refused over ``max_voxels`` before loading."""
    path = Path(path)
    if path.suffix.lower() == ".zip":
        return _load_zipped_series(path, image_size, window, max_voxels)
    _check_size(path, str(path), max_voxels)
    try:
        return load_scan(path, image_size, window)
    except ValueError as error:
        if "one DICOM slice" in str(error):  # a page takes no folder: say how to send the series
            raise ValueError(f"{error}; here, upload the series folder as one .zip") from None
        raise


def phantom_examples(root: str | os.PathLike | None, image_size: Sequence[int]) -> dict[str, Path]:
    """The raw NIfTI scans of the test split of the phantom dataset ``root``, by case id; with ``root``
    None, those of the default dataset (:func:`~m3d_lite.config.default_data_dir`) of the scale whose
    prepared shape is ``image_size``, when it has been written. Empty without a dataset."""
    if root is None:
        scales = [s for s in SCALES if DataConfig.from_scale(s).image_shape == tuple(image_size)]
        roots = [default_data_dir(s) for s in scales if default_data_dir(s).is_dir()]
        if not roots:
            return {}
        root = roots[0]
    root = Path(root)
    try:
        info = json.loads((root / "dataset_info.json").read_text(encoding="utf-8"))[SEG_CODE]
        num_volumes = int(info["num_volumes"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"{root}: not a phantom dataset (no readable dataset_info.json); write one with "
            "`m3d-lite data phantom --out DIR`"
        ) from None
    cases = (case_id(i) for i in range(num_volumes) if split_of(i, num_volumes) == "test")
    return {case: root / "raw" / case / "ct.nii.gz" for case in cases if (root / "raw" / case).is_dir()}
