"""Convert the released M3D datasets, and your own scans, into m3d-lite's on-disk layout.

One function per dataset, each reading the layout the M3D authors released (see
``docs``/M3D_FACTS section 3) and writing ``ROOT/M3D_Cap``, ``ROOT/M3D_VQA``, ``ROOT/M3D_Seg`` or
``ROOT/M3D_RefSeg`` exactly as the phantom does, so one set of loaders reads both. The scripts in
``data_scripts/`` are thin command-line wrappers around these functions (preprocessing, which brings
torch and MONAI, is imported where it is used, so that a script's ``--help`` answers at once).

Converters are resumable (an output that exists is kept unless ``overwrite``) and never drop
anything silently: what they could not use is listed in the returned :class:`Report`, one line each.
Deliberate differences from M3D's own scripts: M3D-RefSeg is read with SimpleITK in LPS order
(z, y, x) like everything else here, where M3D's script transposes nibabel's array to (z, x, y).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from m3d_lite.config import SCALES, DataConfig
from m3d_lite.data.formats import (
    CAP_SPLITS,
    NEGATIVE_MASK_SHAPE,
    REFSEG_ALL_FILE,
    REFSEG_COLUMNS,
    REFSEG_FILES,
    SEG_SPLITS,
    VQA_COLUMNS,
    VQA_FILES,
    seg_mask_name,
    validate_dataset,
)
from m3d_lite.io import atomic_path, save_json, save_npy, save_text

if TYPE_CHECKING:
    from m3d_lite.data.preprocess import Volume, Window

HUB_REPOS = {
    "cap": "GoodBaiBai88/M3D-Cap",  # disabled on the Hub by a DMCA takedown (Radiopaedia's terms)
    "vqa": "GoodBaiBai88/M3D-VQA",
    "seg": "GoodBaiBai88/M3D-Seg",
    "refseg": "GoodBaiBai88/M3D-RefSeg",
}
SLICE_SUFFIXES = (".jpeg", ".jpg", ".png")
SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".npy")


@dataclass
class Report:
    """What a converter wrote (``counts``) and what it could not use (``problems``, one line each)."""

    name: str
    counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def merge(self, counts: dict[str, int], problems: Iterable[str]) -> None:
        self.counts.update(counts)
        self.problems.extend(problems)

    def summary(self, max_problems: int = 20) -> str:
        """Counts, then the first ``max_problems`` problems: what a script prints at the end."""
        lines = [f"{self.name}:"] + [f"  {key}: {value}" for key, value in sorted(self.counts.items())]
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines += [f"    - {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"    ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- shared helpers


def download(hub_repo: str, cache: str | os.PathLike, allow_patterns: Sequence[str] | None = None) -> Path:
    """Download Hub dataset ``hub_repo`` (only ``allow_patterns`` files) into ``cache``; return the folder."""
    from huggingface_hub import snapshot_download

    target = Path(cache) / hub_repo.replace("/", "__")
    try:
        folder = snapshot_download(
            repo_id=hub_repo,
            repo_type="dataset",
            local_dir=target,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
        )
    except Exception as error:  # the Hub client raises many kinds; all mean "not downloaded"
        raise RuntimeError(
            f"cannot download dataset {hub_repo} from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). "
            "Check the network, that HF_HUB_OFFLINE is unset or 0, `hf auth login` for gated datasets, "
            "or download it another way and pass the folder instead."
        ) from error
    return Path(folder)


def split_ids(
    ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Deterministic train/validation/test split of ``ids``, each sorted.

    Each id's split depends only on (``seed``, id), through a hash: a case never changes split when
    other cases are added or left out (say, a ``--limit`` trial run and then the full run), so a
    model trained on one run's train split is never tested on its own training cases in another.
    The sizes are therefore only close to the fractions, most so for many ids.
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"fractions must be >= 0 and sum below 1, got val {val_fraction} test {test_fraction}"
        )
    splits: dict[str, list[str]] = {split: [] for split in CAP_SPLITS}
    for item in sorted(ids):
        digest = hashlib.sha256(f"{seed}:{item}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        split = "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"
        splits[split].append(item)
    return splits


def _run(fn: Callable[[Any], Any], jobs: list[Any], workers: int, desc: str) -> Iterator[Any]:
    """``fn`` over ``jobs`` in order with a progress bar, in ``workers`` processes when more than one.
    The workers are spawned, not forked: a fork of a process whose torch thread pool has run (a notebook
    that prepared a scan first) can hang forever."""
    if workers <= 1:
        yield from (fn(job) for job in tqdm(jobs, desc=desc, unit="item"))
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, unit="item")


def _read_csv(path: Path, columns: Sequence[str], limit: int | None = None) -> pd.DataFrame:
    """A CSV as strings ("NA" stays "NA"), checked to have exactly ``columns``."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=limit)
    if list(frame.columns) != list(columns):
        raise ValueError(f"{path}: columns {list(frame.columns)}; expected exactly {list(columns)}")
    return frame


def _save_frame(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """Write ``frame`` as CSV with exactly ``columns``, atomically (pandas: fast for M3D-VQA's 500k rows)."""
    with atomic_path(path) as tmp:
        frame[list(columns)].to_csv(tmp, index=False)


def _ascii_name(name: str) -> str:
    """'Pöschl' -> 'Poschl': M3D drops diacritics from series names, so M3D_Cap.json uses these names."""
    return "".join(c for c in unicodedata.normalize("NFD", name) if unicodedata.category(c) != "Mn")


# ------------------------------------------------------------------------------------------------ M3D-Cap


def cap_text(raw: str) -> str:
    """The report text M3D keeps from a case's ``text.txt``: what follows "study_findings:", else what
    follows "discussion:", else the whole file (a part shorter than 5 characters counts as absent);
    newlines become spaces."""
    for marker in ("study_findings:", "discussion:"):
        start = raw.find(marker)
        text = raw[start + len(marker) :].replace("\n", " ").strip() if start != -1 else ""
        if len(text.replace(" ", "")) >= 5:
            return text
    return raw.replace("\n", " ").strip()


def _slice_number(path: Path) -> int:
    if not path.stem.isdigit():
        raise ValueError(f"{path}: slice file name is not a number; expected 1.png, 2.png, ...")
    return int(path.stem)


def read_slice_series(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Stack the numbered JPEG/PNG slices of ``folder`` as M3D does: numeric order, grey /255, only the
    slices of the most common shape. Returns (D x H x W float32, problems)."""
    from PIL import Image

    files = [p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES]
    if not files:
        raise ValueError(f"{folder}: no .jpeg/.jpg/.png slices in this series folder")
    slices, problems = [], []
    for path in sorted(files, key=_slice_number):
        try:
            with Image.open(path) as image:
                slices.append(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)
        except OSError as error:
            problems.append(f"{path}: unreadable slice ({error})")
    if not slices:
        raise ValueError(f"{folder}: none of its {len(files)} slices could be read")
    shape, count = Counter(s.shape for s in slices).most_common(1)[0]
    if count < len(slices):
        dropped = len(slices) - count
        problems.append(f"{folder}: kept {count} slices of shape {shape}, dropped {dropped} of other shapes")
    if count < 2:
        raise ValueError(f"{folder}: only {count} usable slice(s); expected a 3D series of at least 2")
    return np.stack([s for s in slices if s.shape == shape]), problems


@dataclass(frozen=True)
class _CapJob:
    case_dir: Path
    out_dir: Path
    rel_dir: str
    shape: tuple[int, int, int]
    overwrite: bool


def _prepare_cap_case(job: _CapJob) -> tuple[list[dict[str, str]], dict[str, int], list[str]]:
    """One case: text.txt -> report text, each series folder -> <series>.npy; (entries, counts, problems)."""
    from m3d_lite.data.preprocess import prepare_arrays

    text_file = job.case_dir / "text.txt"
    if not text_file.is_file():
        return [], {"cases without text.txt": 1}, [f"{job.case_dir}: no text.txt; case skipped"]
    report_text = cap_text(text_file.read_text(encoding="utf-8", errors="replace"))
    if not report_text:
        return [], {"cases with an empty text": 1}, [f"{text_file}: empty; case skipped"]
    save_text(job.out_dir / "text.txt", report_text)
    entries, counts, problems = [], Counter(), []
    for series_dir in sorted(p for p in job.case_dir.iterdir() if p.is_dir()):
        series = _ascii_name(series_dir.name)
        target = job.out_dir / f"{series}.npy"
        if target.exists() and not job.overwrite:
            counts["series kept (already prepared)"] += 1
        else:
            try:
                stack, slice_problems = read_slice_series(series_dir)
                problems += slice_problems
                prepared = prepare_arrays(stack, job.shape, window=None, name=str(series_dir))
            except ValueError as error:
                problems.append(f"{error}; series skipped")
                counts["series skipped"] += 1
                continue
            save_npy(target, prepared.image)
            counts["series written"] += 1
        entries.append({"image": f"{job.rel_dir}/{series}.npy", "text": f"{job.rel_dir}/text.txt"})
    if not entries:
        problems.append(f"{job.case_dir}: no usable series folder")
    return entries, counts, problems


def prepare_m3d_cap(
    src: str | os.PathLike,
    root: str | os.PathLike,
    shape: tuple[int, int, int] = (32, 256, 256),
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> Report:
    """Raw M3D-Cap (``src/ct_case/<id>/<series>/<n>.jpeg`` + ``<id>/text.txt``, and ``ct_quizze/`` alike)
    -> ``root/M3D_Cap/<subset>/<id>/<series>.npy`` (1 x ``shape``, [0, 1]) + ``text.txt`` + ``M3D_Cap.json``.

    The json is ``src/M3D_Cap.json`` restricted to what was written when it exists; otherwise a split by
    case (all series of a case in the same split) from ``val_fraction``, ``test_fraction`` and ``seed``.
    ``limit``: only the first ``limit`` cases (sorted ids) of each subset, to try things out.
    """
    src, out = Path(src), Path(root) / "M3D_Cap"
    subsets = [d for d in (src / "ct_case", src / "ct_quizze") if d.is_dir()]
    if not subsets:
        zips = sorted(p.name for p in src.glob("*.zip"))
        hint = f" (found {zips}: unzip them first)" if zips else ""
        raise FileNotFoundError(
            f"{src}: no ct_case/ or ct_quizze/ folder; expected the raw M3D-Cap layout "
            f"ct_case/<id>/<series>/<n>.jpeg with ct_case/<id>/text.txt{hint}"
        )
    jobs = []
    for subset in subsets:
        cases = sorted(d for d in subset.iterdir() if d.is_dir())[:limit]
        jobs += [
            _CapJob(d, out / subset.name / d.name, f"{subset.name}/{d.name}", tuple(shape), overwrite)
            for d in cases
        ]
    if not jobs:
        raise ValueError(f"{src}: no case folders under {[s.name for s in subsets]}")
    report = Report("M3D-Cap")
    entries_by_case: dict[str, list[dict[str, str]]] = {}
    for job, (entries, counts, problems) in zip(
        jobs, _run(_prepare_cap_case, jobs, workers, "M3D-Cap cases"), strict=True
    ):
        report.merge(counts, problems)
        if entries:
            entries_by_case[job.rel_dir] = entries

    written = {e["image"]: e for entries in entries_by_case.values() for e in entries}
    released = src / "M3D_Cap.json"
    if released.is_file():
        splits = json.loads(released.read_text())
        cap_json = {}
        for split, items in splits.items():
            kept = [written[item["image"]] for item in items if item["image"] in written]
            report.counts[f"{split} entries of M3D_Cap.json without a prepared image"] += len(items) - len(
                kept
            )
            cap_json[split] = kept
        listed = {item["image"] for items in splits.values() for item in items}
        report.counts["prepared series not listed in M3D_Cap.json"] = len(set(written) - listed)
    else:
        ids = split_ids(list(entries_by_case), val_fraction, test_fraction, seed)
        cap_json = {
            split: [e for case in cases for e in entries_by_case[case]] for split, cases in ids.items()
        }
    save_json(out / "M3D_Cap.json", cap_json)
    report.counts.update({f"json {split}": len(items) for split, items in cap_json.items()})
    return report


# ------------------------------------------------------------------------------------------------ M3D-VQA


def prepare_m3d_vqa(
    src: str | os.PathLike,
    root: str | os.PathLike,
    cap_root: str | os.PathLike | None = None,
    limit: int | None = None,
    drop_missing: bool = False,
) -> Report:
    """Check and copy the M3D-VQA CSVs (``src/M3D_VQA_*.csv``) to ``root/M3D_VQA/``.

    Each file must have exactly the M3D-VQA columns (a file with other columns, like the yes/no set, is
    reported and not copied). Rows whose ``Image Path`` is missing under ``cap_root`` (default
    ``root/M3D_Cap``) are counted; ``drop_missing`` leaves them out. ``limit``: first rows of each file.
    """
    src, out = Path(src), Path(root) / "M3D_VQA"
    cap_root = Path(cap_root) if cap_root else Path(root) / "M3D_Cap"
    files = sorted(src.glob("M3D_VQA_*.csv"))
    if not files:
        raise FileNotFoundError(
            f"{src}: no M3D_VQA_*.csv file; expected M3D_VQA_train.csv, _val.csv, _test.csv"
        )
    report = Report("M3D-VQA")
    absent = [name for name in VQA_FILES.values() if not (src / name).is_file()]
    if absent:
        report.problems.append(f"{src}: no {absent}; the course expects all of {list(VQA_FILES.values())}")
    if not cap_root.is_dir():
        report.problems.append(
            f"{cap_root}: no prepared M3D-Cap here, so every image counts as missing "
            "(prepare M3D-Cap first or pass cap_root)"
        )
    for path in tqdm(files, desc="M3D-VQA files", unit="file"):
        try:
            frame = _read_csv(path, VQA_COLUMNS, limit)
        except ValueError as error:
            report.problems.append(f"{error}; file not copied")
            continue
        images = frame["Image Path"].unique()
        present = {image for image in images if (cap_root / image).is_file()}
        missing = ~frame["Image Path"].isin(present)
        if missing.any():
            example = frame.loc[missing, "Image Path"].iloc[0]
            report.problems.append(
                f"{path.name}: {int(missing.sum())} of {len(frame)} rows have no image under "
                f"{cap_root} (e.g. {example})" + ("; dropped" if drop_missing else "")
            )
        if drop_missing:
            frame = frame[~missing]
        _save_frame(out / path.name, frame, VQA_COLUMNS)
        report.counts[f"{path.name} rows"] = len(frame)
    return report


# ------------------------------------------------------------------------------------------------ M3D-Seg

_SHAPE_IN_NAME = re.compile(r"\((\d+),\s*(\d+),\s*(\d+),\s*(\d+)\)")


def mask_shape_from_name(path: Path) -> tuple[int, int, int, int]:
    """(C, X, Y, Z) from an M3D-Seg mask name such as ``mask_(4, 512, 512, 75).npz``."""
    found = _SHAPE_IN_NAME.search(path.name)
    if not found:
        raise ValueError(
            f"{path}: no '(C, X, Y, Z)' shape in the file name; expected e.g. 'mask_(4, 512, 512, 75).npz'"
        )
    return tuple(int(g) for g in found.groups())


def _release_path(path: str, src: Path, code: str) -> Path:
    """A path of a released json: relative to ``src``, to ``src/code``, or absolute on the authors' disk
    (then re-rooted at its ``code`` component)."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    candidates = [src / path, src / code / path]
    if code in parts:
        last = len(parts) - 1 - parts[::-1].index(code)
        candidates.append(src.joinpath(*parts[last:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} (from {code}/{code}.json): not found as any of {[str(c) for c in candidates]}"
    )


def _case_name(image: Path) -> str:
    """``<code>/<case>/image.npy`` -> case; ``<code>/ct/<case>.npy`` -> case."""
    return image.parent.name if image.stem == "image" else image.name.removesuffix(".npy")


@dataclass(frozen=True)
class _SegJob:
    image: Path
    label: Path
    out_dir: Path
    rel_dir: str
    shape: tuple[int, int, int]
    overwrite: bool


def _prepare_seg_case(job: _SegJob) -> tuple[list[dict[str, str]], dict[str, int], list[str]]:
    """One released case -> image.npy + masks/mask_<k>.npy. Returns (json items, counts, problems)."""
    try:
        channels, *xyz = mask_shape_from_name(job.label)
        names = [f"masks/{seg_mask_name(k)}" for k in range(channels)]
        done = (job.out_dir / "image.npy").exists() and all((job.out_dir / n).exists() for n in names)
        if done and not job.overwrite:
            counts = {"cases kept (already prepared)": 1}
        else:
            counts = _write_seg_case(job, channels, tuple(xyz), names)
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        return [], {"cases skipped": 1}, [f"{error}; case skipped"]
    items = [{"image": f"{job.rel_dir}/image.npy", "label": f"{job.rel_dir}/{n}"} for n in names]
    return items, counts, []


def _write_seg_case(job: _SegJob, channels: int, xyz: tuple[int, ...], names: list[str]) -> dict[str, int]:
    from scipy import sparse

    from m3d_lite.data.preprocess import MASK_MODE, crop_and_resize, prepare_arrays

    image = np.load(job.image, allow_pickle=False)
    if image.shape not in (xyz, (1, *xyz)):
        raise ValueError(
            f"{job.image}: shape {image.shape}; expected {(1, *xyz)} as named by {job.label.name}"
        )
    masks = sparse.load_npz(job.label).tocsr()
    if masks.shape != (channels, int(np.prod(xyz))):
        raise ValueError(
            f"{job.label}: sparse matrix of shape {masks.shape}; expected {(channels, int(np.prod(xyz)))}"
        )
    image_zyx = np.swapaxes(image.reshape(xyz), -1, -3)  # (X, Y, Z) -> (Z, Y, X), as M3D
    prepared = prepare_arrays(image_zyx, job.shape, window=None, name=str(job.image))
    save_npy(job.out_dir / "image.npy", prepared.image)
    counts = Counter({"cases written": 1})
    for k, name in enumerate(names):
        dense = np.swapaxes(masks[k].toarray().reshape(xyz), -1, -3)
        resized = (
            crop_and_resize(dense, prepared.crop_box, job.shape, MASK_MODE)[None] > 0.5
            if dense.any()
            else None
        )
        if resized is None or not resized.any():
            resized = np.zeros(NEGATIVE_MASK_SHAPE, dtype=bool)  # M3D's negative sample
            counts["masks absent (1x1x1x1 zeros)"] += 1
        else:
            counts["masks written"] += 1
        save_npy(job.out_dir / name, resized)
    return counts


def _seg_class_names(src: Path, code: str, release: dict[str, Any]) -> list[str]:
    """Class names of ``code`` in channel order: dataset_info.json, else the json's labels without 0."""
    info = src / "dataset_info.json"
    if info.is_file():
        names = json.loads(info.read_text()).get(code)
        if names:
            return list(names)
    labels = release.get("labels") or {}
    names = [labels[k] for k in sorted(labels, key=int) if int(k) != 0]
    if not names:
        raise ValueError(f"{src}/{code}: no class names in {info.name} nor in {code}.json 'labels'")
    return names


def prepare_m3d_seg(
    src: str | os.PathLike,
    root: str | os.PathLike,
    shape: tuple[int, int, int] = (32, 256, 256),
    codes: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> Report:
    """Released M3D-Seg -> ``root/M3D_Seg/<code>/<case>/image.npy`` + ``masks/mask_<k>.npy`` per class.

    Reads ``src/<code>/<code>.json`` (its train/test pairs of an image ``.npy`` (1 x X x Y x Z) and a
    scipy-sparse mask ``.npz`` whose name holds the shape ``(C, X, Y, Z)``), ``src/dataset_info.json``
    and ``src/term_dictionary.json``. Per case, as M3D's prepare script: axes to (Z, Y, X), min-max,
    crop to the image foreground, resize (trilinear image, nearest masks); a class absent after the
    resize is saved as M3D's 1 x 1 x 1 x 1 zeros. The rewritten ``<code>.json`` has one item per
    (image, class). ``codes``: which sub-datasets ("0000".."0024"; default all found); ``limit``: cases
    per split.
    """
    src, out = Path(src), Path(root) / "M3D_Seg"
    codes = list(codes or sorted(d.name for d in src.iterdir() if d.is_dir() and d.name.isdigit()))
    if not codes:
        zips = sorted(p.name for p in src.glob("*.zip"))
        hint = f"; found {zips}: unzip them first" if zips else ""
        raise FileNotFoundError(f"{src}: no dataset folders like 0000/ (expected <code>/<code>.json){hint}")
    report = Report("M3D-Seg")
    info_path = out / "dataset_info.json"
    dataset_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    for code in codes:
        release_json = src / code / f"{code}.json"
        if not release_json.is_file():
            raise FileNotFoundError(
                f"{release_json}: missing; expected the dataset's json with train/test lists"
            )
        release = json.loads(release_json.read_text())
        dataset_info[code] = _seg_class_names(src, code, release)
        splits = {k: v for k, v in release.items() if k in SEG_SPLITS and isinstance(v, list)}
        jobs, job_splits = [], []
        for split, pairs in splits.items():
            for pair in pairs[:limit]:
                try:
                    image, label = (_release_path(pair[key], src, code) for key in ("image", "label"))
                except (FileNotFoundError, KeyError) as error:
                    report.problems.append(f"{code} {split}: {error}; item skipped")
                    continue
                case = _case_name(image)
                jobs.append(
                    _SegJob(image, label, out / code / case, f"{code}/{case}", tuple(shape), overwrite)
                )
                job_splits.append(split)
        duplicates = [d for d, n in Counter(job.rel_dir for job in jobs).items() if n > 1]
        if duplicates:
            raise ValueError(f"{release_json}: several items map to the same case folder {duplicates[:5]}")
        items: dict[str, list[dict[str, str]]] = {split: [] for split in splits}
        for split, (case_items, counts, problems) in zip(
            job_splits, _run(_prepare_seg_case, jobs, workers, f"M3D-Seg {code}"), strict=True
        ):
            items[split] += case_items
            report.merge(counts, problems)
        labels = release.get("labels") or {
            "0": "background",
            **{str(k + 1): n for k, n in enumerate(dataset_info[code])},
        }
        save_json(out / code / f"{code}.json", {**release, "labels": labels, **items})
        report.counts.update({f"{code} {split} items": len(v) for split, v in items.items()})
    save_json(info_path, dataset_info)
    terms, terms_out = src / "term_dictionary.json", out / "term_dictionary.json"
    if terms.is_file():  # merged like dataset_info.json: a root may already hold other datasets' terms
        known = json.loads(terms_out.read_text()) if terms_out.is_file() else {}
        save_json(terms_out, {**known, **json.loads(terms.read_text())})
    else:
        report.problems.append(f"{terms}: missing, so no class definitions for description prompts")
    return report


# --------------------------------------------------------------------------------------------- M3D-RefSeg


def _same_grid(image: Volume, mask: Volume) -> bool:
    return (
        image.array.shape == mask.array.shape
        and np.allclose(image.spacing, mask.spacing, atol=1e-3)
        and np.allclose(image.origin, mask.origin, atol=1e-2)
    )


def _prepare_refseg_case(
    case_dir: Path, out_dir: Path, shape: tuple[int, int, int], overwrite: bool
) -> set[int]:
    """ct.nii.gz + mask.nii.gz -> ct.npy (percentiles 0.5-99.5) + mask.npy (uint8 labels); the labels kept."""
    if (out_dir / "mask.npy").exists() and (out_dir / "ct.npy").exists() and not overwrite:
        return set(np.unique(np.load(out_dir / "mask.npy")).tolist())
    from m3d_lite.data.preprocess import (
        MASK_MODE,
        crop_and_resize,
        load_volume,
        percentile_window,
        prepare_arrays,
    )

    ct, mask = load_volume(case_dir / "ct.nii.gz"), load_volume(case_dir / "mask.nii.gz")
    if not _same_grid(ct, mask):
        raise ValueError(
            f"{case_dir}: mask.nii.gz grid {mask.array.shape} at {mask.origin} does not match "
            f"ct.nii.gz {ct.array.shape} at {ct.origin}"
        )
    if mask.array.min() < 0 or mask.array.max() > 255:
        raise ValueError(
            f"{mask.source}: region labels must be 0..255, found {mask.array.min()}..{mask.array.max()}"
        )
    prepared = prepare_arrays(ct.array, shape, window=percentile_window(ct.array, 0.5, 99.5), name=ct.source)
    labels = np.rint(crop_and_resize(mask.array, prepared.crop_box, shape, MASK_MODE)).astype(np.uint8)[None]
    save_npy(out_dir / "ct.npy", prepared.image)
    save_npy(out_dir / "mask.npy", labels)
    if (case_dir / "text.json").is_file():
        shutil.copyfile(case_dir / "text.json", out_dir / "text.json")
    return set(np.unique(labels).tolist())


def prepare_m3d_refseg(
    src: str | os.PathLike,
    root: str | os.PathLike,
    shape: tuple[int, int, int] = (32, 256, 256),
    limit: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Report:
    """Released M3D-RefSeg (``src/<case>/ct.nii.gz``, ``mask.nii.gz``, ``text.json`` + ``src/*.csv``) ->
    ``root/M3D_RefSeg/<case>/ct.npy`` (1 x ``shape``, [0, 1]) + ``mask.npy`` (uint8 region labels) + CSVs.

    CT is clipped to its 0.5-99.5 intensity percentiles (as M3D), cropped to the foreground and resized
    (trilinear CT, nearest labels). Every CSV with exactly the RefSeg columns is copied with Image/Mask
    rewritten to ``<case>/ct.npy`` / ``<case>/mask.npy``; rows of unprepared cases or whose Mask_ID is
    not in the prepared mask are reported and left out. Without ``*_train.csv``/``*_test.csv`` in
    ``src``, train/test files are made by case with ``test_fraction`` and ``seed``.
    """
    src, out = Path(src), Path(root) / "M3D_RefSeg"
    cases = sorted(d for d in src.iterdir() if d.is_dir() and (d / "ct.nii.gz").is_file())[:limit]
    if not cases:
        raise FileNotFoundError(
            f"{src}: no case folder with ct.nii.gz; expected <case>/ct.nii.gz, mask.nii.gz"
        )
    report = Report("M3D-RefSeg")
    labels: dict[str, set[int]] = {}
    for case_dir in tqdm(cases, desc="M3D-RefSeg cases", unit="case"):
        try:
            labels[case_dir.name] = _prepare_refseg_case(
                case_dir, out / case_dir.name, tuple(shape), overwrite
            )
            report.counts["cases prepared"] += 1
        except (ValueError, FileNotFoundError) as error:
            report.problems.append(f"{error}; case skipped")
    frames = {}
    for path in sorted(src.glob("*.csv")):
        try:
            frames[path.name] = _rewrite_refseg_rows(_read_csv(path, REFSEG_COLUMNS), labels, path, report)
        except ValueError as error:
            report.problems.append(f"{error}; file not copied")
    if not frames:
        raise FileNotFoundError(f"{src}: no CSV with columns {list(REFSEG_COLUMNS)}")
    if not all(name in frames for name in REFSEG_FILES.values()):
        rows = pd.concat(frames.values()).drop_duplicates()
        split = split_ids(sorted(labels), 0.0, test_fraction, seed)
        case_of = rows["Image"].str.split("/").str[0]
        frames = {
            REFSEG_ALL_FILE: rows,
            **{name: rows[case_of.isin(split[s])] for s, name in REFSEG_FILES.items()},
        }
    for name, frame in frames.items():
        _save_frame(out / name, frame, REFSEG_COLUMNS)
        report.counts[f"{name} rows"] = len(frame)
    return report


def _rewrite_refseg_rows(frame: pd.DataFrame, labels: dict[str, set[int]], path: Path, report: Report):
    """Rows with Image/Mask pointing at the prepared files; rows that cannot be used are reported."""
    keep, cases = [], []
    for index, row in frame.iterrows():
        case = next((part for part in PurePosixPath(row["Image"]).parts if part in labels), None)
        if case is None:
            report.problems.append(
                f"{path.name} row {index + 2}: Image {row['Image']!r} names no prepared case"
            )
        elif not row["Mask_ID"].isdigit() or int(row["Mask_ID"]) not in labels[case] - {0}:
            report.problems.append(
                f"{path.name} row {index + 2}: Mask_ID {row['Mask_ID']!r} is not a region "
                f"of {case}/mask.npy (regions {sorted(labels[case] - {0})})"
            )
        else:
            keep.append(index)
            cases.append(case)
    frame = frame.loc[keep].copy()
    frame["Image"] = [f"{case}/ct.npy" for case in cases]
    frame["Mask"] = [f"{case}/mask.npy" for case in cases]
    return frame


# ------------------------------------------------------------------------------------------- own scans


def _scan_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", _ascii_name(name)).strip("_") or "scan"


def find_scans(src: str | os.PathLike) -> list[tuple[str, Path, str | None]]:
    """(name, path, DICOM series id or None) for each scan in ``src``: image files (NIfTI, NRRD, MHA, npy,
    multi-frame DICOM) and DICOM series, whether in sub-folders or loose in ``src`` itself."""
    from m3d_lite.data.preprocess import dicom_series

    src = Path(src)
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a folder; expected a folder of NIfTI/DICOM scans")
    scans: list[tuple[str, Path, str | None]] = []
    for folder in [src] + sorted(d for d in src.iterdir() if d.is_dir()):
        series = dicom_series(folder)
        stacks = [sid for sid, files in series.items() if len(files) > 1]
        for sid, files in series.items():
            if len(files) == 1:  # one file: a 3D (multi-frame) DICOM, or a 2D slice that load_volume refuses
                scans.append((_scan_name(Path(files[0])), Path(files[0]), None))
            else:
                number = "" if len(stacks) == 1 else f"_{stacks.index(sid) + 1}"
                scans.append((_scan_name(folder) + number, folder, sid))
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and path.name.lower().endswith(SCAN_SUFFIXES)
            and not path.name.lower().endswith(".dcm")
        ):
            scans.append((_scan_name(path), path, None))
    names = Counter(name for name, _, _ in scans)
    return [
        (name if names[name] == 1 else f"{name}_{i}", path, sid) for i, (name, path, sid) in enumerate(scans)
    ]


def _window_label(window: Window, percentiles: tuple[float, float] | None) -> str:
    if percentiles is not None:
        return f"percentiles_{percentiles[0]:g}_{percentiles[1]:g}"
    if isinstance(window, str):
        return f"{window.replace(' ', '_')}_window"
    return "minmax" if window is None else f"window_{window[0]:g}_{window[1]:g}"


def prepare_own_scans(
    src: str | os.PathLike,
    root: str | os.PathLike,
    shape: tuple[int, int, int] = (32, 256, 256),
    window: Window = None,
    percentiles: tuple[float, float] | None = None,
    split: str = "test",
    previews: bool = True,
) -> Report:
    """Your NIfTI/DICOM scans in ``src`` -> the M3D-Cap layout under ``root`` (see :func:`find_scans`).

    Each scan becomes ``M3D_Cap/ct_case/<name>/Axial_<window>.npy`` (re-oriented to LPS, so slices are
    axial whatever the acquisition plane) and a preview ``previews/<name>.png`` (montage). A sidecar
    ``src/<name>.txt`` becomes its report ``text.txt``; scans with a report are listed in
    ``M3D_Cap.json`` under ``split`` (an image-report pair needs both). ``own_scans.json`` lists every
    scan (for inference): name, image, source, original size, spacing, window. CT: pass a ``window``
    (name or HU pair); MRI: None (min-max) or ``percentiles`` such as (0.5, 99.5).
    """
    from m3d_lite.data.preprocess import prepare_file, resolve_window
    from m3d_lite.viz import montage, save_figure

    src, root = Path(src), Path(root)
    resolve_window(window)  # refuse a bad window before any work
    if split not in CAP_SPLITS:
        raise ValueError(f"split {split!r}: expected one of {list(CAP_SPLITS)}")
    scans = find_scans(src)
    if not scans:
        raise FileNotFoundError(f"{src}: no scans found; expected NIfTI/NRRD/MHA/npy files or DICOM series")
    series = f"Axial_{_window_label(window, percentiles)}"
    report, pairs, records = Report("own scans"), [], []
    used = {path for _, path, _ in scans} | {path.parent for _, path, _ in scans if path.parent != src}
    loose_dicom = src in used
    for path in sorted(src.iterdir()):
        if path not in used and path.suffix != ".txt" and not (loose_dicom and path.suffix.lower() == ".dcm"):
            report.problems.append(f"{path}: not a scan file nor a folder holding a DICOM series; ignored")
    for name, path, series_id in tqdm(scans, desc="scans", unit="scan"):
        try:
            prepared, volume = prepare_file(path, shape, window, percentiles=percentiles, series_id=series_id)
        except (ValueError, FileNotFoundError) as error:
            report.problems.append(f"{error}; scan skipped")
            continue
        record = {
            "name": name,
            "image": f"ct_case/{name}/{series}.npy",
            "source": str(path),
            "series_id": series_id,
            "original_size_zyx": list(volume.array.shape),
            "spacing_zyx_mm": list(volume.spacing),
            "window": window if window is None or isinstance(window, str) else list(window),
            "percentiles": list(percentiles) if percentiles else None,
        }
        save_npy(root / "M3D_Cap" / record["image"], prepared.image)
        sidecar = src / f"{name}.txt"
        if sidecar.is_file() and sidecar.read_text(encoding="utf-8").strip():
            record["text"] = f"ct_case/{name}/text.txt"
            save_text(root / "M3D_Cap" / record["text"], sidecar.read_text(encoding="utf-8").strip())
            pairs.append({"image": record["image"], "text": record["text"]})
        if previews:
            record["preview"] = f"previews/{name}.png"
            title = f"{name}: {volume.array.shape} at {tuple(round(s, 2) for s in volume.spacing)} mm"
            save_figure(montage(prepared.image, title=title), root / record["preview"])
        records.append(record)
    report.counts.update(
        {"scans prepared": len(records), f"image-report pairs in M3D_Cap.json {split}": len(pairs)}
    )
    save_json(root / "M3D_Cap" / "M3D_Cap.json", {s: pairs if s == split else [] for s in CAP_SPLITS})
    save_json(root / "own_scans.json", records)
    return report


# ------------------------------------------------------------------------------- command-line plumbing


def script_parser(doc: str, dataset: str | None) -> argparse.ArgumentParser:
    """The arguments every data script shares: where the data comes from, where it goes, the shape.

    ``doc`` is the script's docstring (first line: description; the rest: shown after the options).
    ``dataset`` ("cap", "vqa", "seg", "refseg") adds ``--src``/``--hub-repo``/``--cache``; None: ``--src``.
    """
    first, _, rest = doc.strip().partition("\n")
    parser = argparse.ArgumentParser(
        description=first, epilog=rest.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if dataset is None:
        parser.add_argument("--src", type=Path, required=True, help="input folder")
    else:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--src", type=Path, help="local folder holding the released data")
        source.add_argument(
            "--hub-repo",
            nargs="?",
            const=HUB_REPOS[dataset],
            metavar="ID",
            help=f"download from the Hugging Face Hub first (default id {HUB_REPOS[dataset]})",
        )
        parser.add_argument(
            "--cache",
            type=Path,
            default=Path("data/hub"),
            help="download folder for --hub-repo (default: data/hub)",
        )
    parser.add_argument("--out", type=Path, required=True, help="dataset root (the folder that holds M3D_*/)")
    return parser


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """``--shape D H W`` or ``--scale ci|small|paper`` (default: the paper's 32 x 256 x 256)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="prepared size (default 32 256 256)"
    )
    group.add_argument("--scale", choices=SCALES, help="use the image_shape of this preset instead")


def shape_from_args(args: argparse.Namespace) -> tuple[int, int, int]:
    """The prepared (D, H, W) asked for by ``--shape`` or ``--scale``."""
    if args.scale:
        return DataConfig.from_scale(args.scale).image_shape
    return tuple(args.shape) if args.shape else (32, 256, 256)


def source_from_args(args: argparse.Namespace, allow_patterns: Sequence[str] | None) -> Path:
    """``--src``, or the folder ``--hub-repo`` was downloaded to."""
    if getattr(args, "hub_repo", None):
        return download(args.hub_repo, args.cache, allow_patterns)
    if not args.src.is_dir():
        raise FileNotFoundError(f"--src {args.src}: no such folder")
    return args.src


def finish(report: Report, root: Path) -> int:
    """Print ``report`` and the validation of ``root``; exit status 1 when the written data is invalid."""
    print(report.summary())
    validation = validate_dataset(root)
    if validation.problems:
        print(f"\nvalidate_dataset({root}): {len(validation.problems)} problem(s)")
        for problem in validation.problems[:20]:
            print(f"  - {problem}")
        return 1
    print(f"\nvalidate_dataset({root}): OK")
    return 0


def run_script(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``, turning the errors it raises for bad input into one line on stderr."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
