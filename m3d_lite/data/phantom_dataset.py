"""Write a whole M3D-Phantom dataset root: raw NIfTI plus M3D-Cap, M3D-VQA, M3D-Seg and M3D-RefSeg.

The layout is the one of the data spec (the same the real-data converters write), so the course's
loaders cannot tell the phantom from M3D's data. Case ``i`` is generated from a seed derived from
(seed, i) alone, so it is the same whatever ``num_volumes``; the split is by case index (the last
10 % test, the 10 % before validation; at least one of each from 3 cases on). M3D-Seg and
M3D-RefSeg use train = Cap train + validation and test = Cap test. Writing twice gives
byte-identical .npy, .csv and .json files.

Speed on 2 CPU cores (``benchmarks/phantom_speed.py``, 100 volumes): ci writes about 800 cases per
minute (3.3 MB each), small about 300 (12.7 MB each); generation alone is about 1400 and 470 per minute.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from m3d_lite.config import DataConfig
from m3d_lite.data import text
from m3d_lite.data.formats import (
    CAP_SPLITS,
    NEGATIVE_MASK_SHAPE,
    REFSEG_ALL_FILE,
    REFSEG_COLUMNS,
    REFSEG_FILES,
    VQA_COLUMNS,
    VQA_FILES,
    seg_mask_name,
    vqa_row,
)
from m3d_lite.data.phantom import ORGANS, PhantomCase, make_case, reslice, series_name
from m3d_lite.data.preprocess import MASK_MODE, WINDOWS, crop_and_resize, prepare_arrays
from m3d_lite.io import atomic_path, save_csv, save_json, save_npy, save_text

NAME = "M3D-Phantom"
SEG_CODE = "phantom"
VERSION = 1
_MANAGED = ("dataset_info.json", "raw", "M3D_Cap", "M3D_VQA", "M3D_Seg", "M3D_RefSeg")


@dataclass
class PhantomSummary:
    """What :func:`write_phantom_dataset` wrote: root path, counts per split and part, and the time taken."""

    path: Path
    num_volumes: int
    counts: dict[str, int]
    seconds: float

    @property
    def volumes_per_minute(self) -> float:
        return 60.0 * self.num_volumes / max(self.seconds, 1e-9)


def case_id(index: int) -> str:
    """``phantom_00000``-style id of case ``index``."""
    return f"phantom_{index:05d}"


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index``: depends on (seed, index) only, not on how many cases are written."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def split_of(index: int, num_volumes: int) -> str:
    """'train', 'validation' or 'test' for case ``index`` of ``num_volumes``.

    The last 10 % are test and the 10 % before them validation (at least one each from 3 cases on).
    """
    n_test = max(1, num_volumes // 10) if num_volumes >= 2 else 0
    n_val = max(1, num_volumes // 10) if num_volumes >= 3 else 0
    if index >= num_volumes - n_test:
        return "test"
    if index >= num_volumes - n_test - n_val:
        return "validation"
    return "train"


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``, or empty a previous phantom dataset there; refuse any other content."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"{out}: exists and is not a directory; choose a new folder for the phantom dataset"
        )
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _MANAGED)
    info_path = out / "dataset_info.json"
    try:
        is_phantom = SEG_CODE in json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        is_phantom = False
    if foreign or not is_phantom:
        found = foreign or sorted(p.name for p in out.iterdir())
        raise FileExistsError(
            f"{out}: folder is not empty and does not hold a previous phantom dataset (found {found[:5]}); "
            "choose an empty or new folder"
        )
    for name in _MANAGED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _save_nifti(path: Path, array: np.ndarray, spacing) -> None:
    """Save a (z, y, x) array as NIfTI with ITK spacing (x, y, z), origin at the volume centre, LPS."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin(
        tuple(-(n - 1) / 2 * s for n, s in zip(reversed(array.shape), reversed(spacing), strict=True))
    )
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def _write_case(root: Path, case: PhantomCase, image_shape, rng: np.random.Generator) -> dict:
    """Write one case's files; return its Cap item, VQA rows, Seg items and RefSeg rows."""
    cid, findings = case.case_id, case.findings
    raw = root / "raw" / cid
    _save_nifti(raw / "ct.nii.gz", np.round(case.hu).astype(np.int16), case.spacing)
    _save_nifti(raw / "organs.nii.gz", case.organ_labels, case.spacing)
    _save_nifti(raw / "lesions.nii.gz", case.lesion_labels, case.spacing)

    # M3D-Cap: the series as acquired (plane) and displayed (window)
    series = prepare_arrays(
        reslice(case.hu, findings.plane),
        image_shape,
        WINDOWS[findings.window],
        name=f"{cid} {findings.plane}",
    ).image
    image_rel = f"ct_case/{cid}/{series_name(findings)}.npy"
    text_rel = f"ct_case/{cid}/text.txt"
    report = text.report(findings, rng)
    save_npy(root / "M3D_Cap" / image_rel, series)
    save_text(root / "M3D_Cap" / text_rel, report)
    vqa_rows = [vqa_row(image_rel, report, item) for item in text.vqa_items(findings, rng)]

    # M3D-Seg and M3D-RefSeg share the axial soft-tissue volume. Nearest-neighbour resizing of a
    # label map gives the same voxels as resizing each class mask, in two calls instead of ~14.
    prepared = prepare_arrays(case.hu, image_shape, WINDOWS["soft tissue"], name=f"{cid} axial")
    organs, regions = (
        np.rint(crop_and_resize(labels, prepared.crop_box, image_shape, MASK_MODE)[None]).astype(np.uint8)
        for labels in (case.organ_labels, case.lesion_labels)
    )
    lost = [name for label, name in ORGANS.items() if name in findings.organs and not (organs == label).any()]
    lost += [
        f"lesion {lesion.lesion_id}" for lesion in findings.lesions if not (regions == lesion.lesion_id).any()
    ]
    if lost:
        raise RuntimeError(
            f"{cid}: {lost} vanished when resized to {tuple(image_shape)}; use a larger image_shape"
        )
    seg_dir = root / "M3D_Seg" / SEG_CODE / cid
    save_npy(seg_dir / "image.npy", prepared.image)
    seg_items = []
    for label, name in ORGANS.items():
        mask = organs == label if name in findings.organs else np.zeros(NEGATIVE_MASK_SHAPE, dtype=bool)
        mask_name = seg_mask_name(label - 1)
        save_npy(seg_dir / "masks" / mask_name, mask)
        seg_items.append(
            {"image": f"{SEG_CODE}/{cid}/image.npy", "label": f"{SEG_CODE}/{cid}/masks/{mask_name}"}
        )

    refseg_rows = []
    if findings.lesions:
        save_npy(root / "M3D_RefSeg" / cid / "ct.npy", prepared.image)
        save_npy(root / "M3D_RefSeg" / cid / "mask.npy", regions)
        for lesion in findings.lesions:
            for qtype, question, answer in text.refseg_qas(lesion, findings, rng):
                refseg_rows.append(
                    {
                        "Image": f"{cid}/ct.npy",
                        "Mask": f"{cid}/mask.npy",
                        "Mask_ID": lesion.lesion_id,
                        "Question_Type": qtype,
                        "Question": question,
                        "Answer": answer,
                    }
                )
    return {
        "cap": {"image": image_rel, "text": text_rel},
        "vqa": vqa_rows,
        "seg": seg_items,
        "refseg": refseg_rows,
    }


def write_phantom_dataset(
    out_dir,
    num_volumes: int,
    scale: str = "ci",
    seed: int = 0,
    image_shape=None,
    progress: bool = True,
) -> PhantomSummary:
    """Generate ``num_volumes`` phantom cases at ``scale``; write them as an M3D-format root in ``out_dir``.

    ``image_shape`` (D, H, W) overrides the scale's prepared shape. ``out_dir`` must be new, empty
    or a previous phantom dataset (which is replaced).
    """
    if num_volumes < 1:
        raise ValueError(f"num_volumes must be >= 1, got {num_volumes}")
    config = DataConfig.from_scale(scale, image_shape=tuple(image_shape) if image_shape is not None else None)
    out = Path(out_dir)
    start = time.perf_counter()
    _prepare_out_dir(out)
    info = {
        "name": NAME,
        "scale": scale,
        "image_shape": list(config.image_shape),
        "raw_shape": list(config.raw_shape),
        "raw_spacing": list(config.raw_spacing),
        "seed": seed,
        "num_volumes": num_volumes,
        "version": VERSION,
    }
    # written first as incomplete (so an interrupted run can be replaced), last as complete
    save_json(out / "dataset_info.json", {SEG_CODE: {**info, "complete": False}})

    cap = {split: [] for split in CAP_SPLITS}
    vqa = {split: [] for split in CAP_SPLITS}
    seg = {"train": [], "test": []}
    refseg = {"train": [], "test": []}
    for index in tqdm(range(num_volumes), desc="phantom", unit="case", disable=not progress):
        split = split_of(index, num_volumes)
        cseed = case_seed(seed, index)
        case = make_case(case_id(index), cseed, config.raw_shape, config.raw_spacing)
        written = _write_case(out, case, config.image_shape, np.random.default_rng([cseed, 1]))
        cap[split].append(written["cap"])
        vqa[split].extend(written["vqa"])
        seg_split = "test" if split == "test" else "train"
        seg[seg_split].extend(written["seg"])
        refseg[seg_split].extend(written["refseg"])

    save_json(out / "M3D_Cap" / "M3D_Cap.json", cap)
    for split, name in VQA_FILES.items():
        save_csv(out / "M3D_VQA" / name, vqa[split], VQA_COLUMNS)
    save_json(out / "M3D_Seg" / "dataset_info.json", {SEG_CODE: list(ORGANS.values())})
    save_json(out / "M3D_Seg" / "term_dictionary.json", text.TERM_DICTIONARY)
    save_json(
        out / "M3D_Seg" / SEG_CODE / f"{SEG_CODE}.json",
        {
            "name": NAME,
            "description": "Synthetic abdominal CT phantom (m3d-lite)",
            "modality": {"0": "CT"},
            "labels": {str(label): name for label, name in ORGANS.items()},
            **seg,
        },
    )
    for split, name in REFSEG_FILES.items():
        save_csv(out / "M3D_RefSeg" / name, refseg[split], REFSEG_COLUMNS)
    save_csv(out / "M3D_RefSeg" / REFSEG_ALL_FILE, refseg["train"] + refseg["test"], REFSEG_COLUMNS)
    save_json(out / "dataset_info.json", {SEG_CODE: {**info, "complete": True}})

    counts = {f"cap_{s}": len(v) for s, v in cap.items()}
    counts.update({f"vqa_{s}": len(v) for s, v in vqa.items()})
    counts.update({f"seg_{s}": len(v) for s, v in seg.items()})
    counts.update({f"refseg_{s}": len(v) for s, v in refseg.items()})
    return PhantomSummary(out, num_volumes, counts, time.perf_counter() - start)


def ensure_phantom_dataset(
    out_dir, num_volumes: int, scale: str = "ci", seed: int = 0, progress: bool = True
) -> Path:
    """Reuse the phantom dataset in ``out_dir`` if it is complete and was written with these settings;
    write it otherwise. Every notebook calls this, so the course generates its data once."""
    out = Path(out_dir)
    try:
        info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))[SEG_CODE]
    except (OSError, ValueError, TypeError, KeyError):
        info = {}
    wanted = {"scale": scale, "seed": seed, "num_volumes": num_volumes, "version": VERSION, "complete": True}
    if any(info.get(key) != value for key, value in wanted.items()):
        write_phantom_dataset(out, num_volumes=num_volumes, scale=scale, seed=seed, progress=progress)
    return out
