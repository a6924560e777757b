"""M3D's file formats: exact column and key names, boxes as text, readers, and a dataset validator.

The same loaders read the phantom and the real M3D data, so every format detail lives here once:
the M3D-Cap json, the M3D-VQA and M3D-RefSeg csv columns, the M3D-Seg per-class mask layout
(``mask_<k>.npy`` where ``k`` indexes ``dataset_info[code]``, 0-based, as M3D's loaders parse it), and
boxes written as ``<bx_start>[d0, h0, w0, d1, h1, w1]<bx_end>`` (see M3D_FACTS 2.5 and 3). Readers
raise :class:`DatasetError` naming the file, the row or key and what was expected;
:func:`validate_dataset` collects every problem of a dataset root instead of stopping at the first.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VQA_COLUMNS = (
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)
REFSEG_COLUMNS = ("Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer")
QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
CAP_SPLITS = ("train", "validation", "test")
VQA_FILES = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"}
SEG_SPLITS = ("train", "test")
REFSEG_FILES = {"train": "M3D_RefSeg_train.csv", "test": "M3D_RefSeg_test.csv"}
REFSEG_ALL_FILE = "M3D_RefSeg_all.csv"
BOX_START, BOX_END = "<bx_start>", "<bx_end>"
SEG_TOKEN = "[SEG]"
NEGATIVE_MASK_SHAPE = (1, 1, 1, 1)

_NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 6) + r"\s*\]")
_MASK_NAME_RE = re.compile(r"^mask_(\d+)\.npy$")


class DatasetError(ValueError):
    """A dataset file does not have the expected format; the message names the file and the entry."""


# --------------------------------------------------------------------------------------------
# Boxes.
def mask_to_box(mask: np.ndarray, name: str = "mask") -> tuple[float, ...]:
    """M3D's box of a D x H x W (or 1 x D x H x W) mask: (d0/D, h0/H, w0/W, d1/D, h1/H, w1/W), 3 decimals.

    Mins and maxs are voxel indices of the mask's extent, so a box never reaches 1.0.
    """
    array = np.asarray(mask)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a D x H x W or 1 x D x H x W mask, got shape {array.shape}")
    lows, highs = [], []
    for axis in range(3):
        hit = np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            raise ValueError(f"{name}: mask of shape {array.shape} is empty, so it has no box")
        lows.append(hit[0] / array.shape[axis])
        highs.append(hit[-1] / array.shape[axis])
    return tuple(round(float(v), 3) for v in (*lows, *highs))


def box_to_text(box) -> str:
    """``<bx_start>[d0, h0, w0, d1, h1, w1]<bx_end>`` exactly as M3D writes it (Python list repr)."""
    return BOX_START + str([float(v) for v in box]) + BOX_END


def parse_box(text: str) -> tuple[float, ...] | None:
    """The first six comma-separated numbers inside brackets in ``text`` (wrappers allowed), or None."""
    match = _BOX_RE.search(text)
    return tuple(float(v) for v in match.groups()) if match else None


def box_in_range(box) -> bool:
    """True for six finite values in [0, 1] with each minimum <= its maximum."""
    if box is None or len(box) != 6:
        return False
    values = [float(v) for v in box]
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        return False
    return all(values[i] <= values[i + 3] for i in range(3))


# --------------------------------------------------------------------------------------------
# Readers.
@dataclass(frozen=True)
class CapItem:
    """One M3D-Cap pair: image and text paths, relative to the M3D_Cap folder."""

    image: str
    text: str


@dataclass(frozen=True)
class SegItem:
    """One M3D-Seg (image, class mask) pair, paths relative to M3D_Seg; ``class_index`` from ``mask_<k>``."""

    image: str
    label: str
    class_index: int


@dataclass
class SegDataset:
    """A ``<code>/<code>.json``: its name, label names by id, and items per split."""

    name: str
    labels: dict[int, str]
    splits: dict[str, list[SegItem]]


def _load_json(path: Path):
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a csv whose header must be exactly ``columns``."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if header != columns:
            missing = [c for c in columns if c not in header]
            extra = [c for c in header if c not in columns]
            raise DatasetError(
                f"{path}: columns {list(header)} are not exactly {list(columns)} "
                f"(missing {missing}, extra {extra})"
            )
        return list(reader)


def _raise_first(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)


def _path_pairs(
    path: Path, split: str, items, keys: tuple[str, str], problems: list[str]
) -> list[tuple[int, dict]] | None:
    """The (index, item) pairs of a json split whose ``keys`` are both strings; the others become problems.
    None (and a problem) when the split is not a list."""
    if not isinstance(items, list):
        problems.append(f"{path}: split {split!r} must be a list of {{{keys[0]!r}, {keys[1]!r}}} items")
        return None
    valid = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and all(isinstance(item.get(k), str) for k in keys):
            valid.append((i, item))
        else:
            wanted = f"string keys {keys[0]!r} and {keys[1]!r}"
            problems.append(f"{path}: {split}[{i}] must have {wanted}, got {item!r}")
    return valid


def _cap_problems(path: Path, data) -> tuple[dict[str, list[CapItem]], list[str]]:
    if not isinstance(data, dict) or not data:
        return {}, [f"{path}: expected a JSON object of splits {list(CAP_SPLITS)}, got {type(data).__name__}"]
    splits, problems = {}, []
    for split, items in data.items():
        valid = _path_pairs(path, split, items, ("image", "text"), problems)
        if valid is not None:
            splits[split] = [CapItem(item["image"], item["text"]) for _, item in valid]
    return splits, problems


def read_cap_json(path) -> dict[str, list[CapItem]]:
    """Read ``M3D_Cap.json``: split name -> list of (image, text) paths relative to M3D_Cap/."""
    path = Path(path)
    splits, problems = _cap_problems(path, _load_json(path))
    _raise_first(problems)
    return splits


def _vqa_problems(path: Path, rows: list[dict[str, str]]) -> list[str]:
    problems = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 2}"  # line number, the header being line 1
        if row["Question Type"] not in {str(k) for k in QUESTION_TYPES}:
            problems.append(f"{where}: 'Question Type' must be 1..5, got {row['Question Type']!r}")
        letter = row["Answer Choice"]
        if letter not in ("A", "B", "C", "D"):
            problems.append(f"{where}: 'Answer Choice' must be one of A-D, got {letter!r}")
        elif row["Answer"] != row[f"Choice {letter}"]:
            problems.append(
                f"{where}: 'Answer' {row['Answer']!r} is not the text of "
                f"Choice {letter} {row[f'Choice {letter}']!r}"
            )
    return problems


def read_vqa_csv(path) -> list[dict]:
    """Read an M3D-VQA csv (exact columns, checked types and answers); 'Question Type' becomes an int."""
    path = Path(path)
    rows = _read_csv(path, VQA_COLUMNS)
    _raise_first(_vqa_problems(path, rows))
    return [{**row, "Question Type": int(row["Question Type"])} for row in rows]


def _seg_problems(path: Path, data) -> tuple[SegDataset | None, list[str]]:
    if not isinstance(data, dict):
        return None, [f"{path}: expected a JSON object with 'labels' and splits {list(SEG_SPLITS)}"]
    problems = []
    labels = data.get("labels")
    if not isinstance(labels, dict) or not all(
        str(k).isdigit() and isinstance(v, str) for k, v in labels.items()
    ):
        problems.append(f"{path}: 'labels' must map label ids to class names, got {labels!r}")
        labels = {}
    if not any(split in data for split in SEG_SPLITS):
        problems.append(f"{path}: no split; expected keys {list(SEG_SPLITS)}")
    splits: dict[str, list[SegItem]] = {}
    for split in SEG_SPLITS:
        valid = _path_pairs(path, split, data.get(split, []), ("image", "label"), problems)
        if valid is None:
            continue
        splits[split] = []
        for i, item in valid:
            match = _MASK_NAME_RE.match(Path(item["label"]).name)
            if match is None:
                problems.append(f"{path}: {split}[{i}] label {item['label']!r} is not named mask_<k>.npy")
                continue
            splits[split].append(SegItem(item["image"], item["label"], int(match.group(1))))
    name = data.get("name", path.stem)
    return SegDataset(str(name), {int(k): v for k, v in labels.items()}, splits), problems


def read_seg_dataset(code_json_path) -> SegDataset:
    """Read an M3D-Seg ``<code>/<code>.json``: labels and (image, mask_<k>) items per split."""
    path = Path(code_json_path)
    dataset, problems = _seg_problems(path, _load_json(path))
    _raise_first(problems)
    return dataset


def _refseg_problems(path: Path, rows: list[dict[str, str]]) -> list[str]:
    problems = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 2}"
        if not (row["Mask_ID"].isdigit() and int(row["Mask_ID"]) >= 1):
            problems.append(f"{where}: 'Mask_ID' must be an integer >= 1, got {row['Mask_ID']!r}")
        if row["Question_Type"] not in ("0", "1"):
            problems.append(
                f"{where}: 'Question_Type' must be 0 (description) or 1 (reasoning), "
                f"got {row['Question_Type']!r}"
            )
        if row["Answer"].count(SEG_TOKEN) != 1:
            problems.append(f"{where}: 'Answer' must contain exactly one {SEG_TOKEN}, got {row['Answer']!r}")
    return problems


def read_refseg_csv(path) -> list[dict]:
    """Read an M3D-RefSeg csv (exact columns); 'Mask_ID' and 'Question_Type' become ints."""
    path = Path(path)
    rows = _read_csv(path, REFSEG_COLUMNS)
    _raise_first(_refseg_problems(path, rows))
    return [
        {**row, "Mask_ID": int(row["Mask_ID"]), "Question_Type": int(row["Question_Type"])} for row in rows
    ]


def vqa_row(image_path: str, text: str, item) -> dict:
    """One M3D-VQA csv row for a VQA item (anything with question_type, question, choices, answer_letter)."""
    choices = dict(zip(("Choice A", "Choice B", "Choice C", "Choice D"), item.choices, strict=True))
    answer = item.choices["ABCD".index(item.answer_letter)]
    return {
        "Image Path": image_path,
        "Text": text,
        "Question Type": item.question_type,
        "Question": item.question,
        **choices,
        "Answer": answer,
        "Answer Choice": item.answer_letter,
    }


def seg_mask_name(class_index: int) -> str:
    """File name of class ``class_index`` (0-based index into ``dataset_info[code]``)."""
    return f"mask_{class_index}.npy"


# --------------------------------------------------------------------------------------------
# Validation.
@dataclass
class ValidationReport:
    """Every problem found in a dataset root, and item counts per part and split."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        head = f"{len(self.problems)} problem(s); {counts}"
        return "\n".join([head, *(f"- {p}" for p in self.problems)])


class _Arrays:
    """Loads and checks .npy files once each, recording problems."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        self.images: dict[Path, tuple[int, ...] | None] = {}
        self.label_ids: dict[Path, set[int] | None] = {}

    def _load(self, path: Path) -> np.ndarray | None:
        if not path.is_file():
            self.problems.append(f"{path}: missing file")
            return None
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as error:  # any failure to parse is the same problem for a student
            self.problems.append(f"{path}: unreadable .npy ({type(error).__name__}: {error})")
            return None

    def image(self, path: Path) -> tuple[int, ...] | None:
        """Shape of a valid 1 x D x H x W float image in [0, 1]; None (and a problem) otherwise."""
        if path not in self.images:
            self.images[path] = self._check_image(path)
        return self.images[path]

    def _check_image(self, path: Path) -> tuple[int, ...] | None:
        array = self._load(path)
        if array is None:
            return None
        if array.ndim != 4 or array.shape[0] != 1:
            self.problems.append(f"{path}: expected an image of shape 1 x D x H x W, got {array.shape}")
            return None
        if not np.issubdtype(array.dtype, np.floating):
            self.problems.append(f"{path}: expected a float image, got dtype {array.dtype}")
            return None
        values = np.asarray(array)
        if not np.isfinite(values).all():
            self.problems.append(f"{path}: image contains NaN or infinite values")
            return None
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            self.problems.append(f"{path}: image values must be in [0, 1], found [{low:.4g}, {high:.4g}]")
            return None
        return tuple(array.shape)

    def class_mask(self, path: Path, image_shape: tuple[int, ...] | None) -> None:
        """Check an M3D-Seg mask: bool/uint8, the image's shape and non-empty, or the (1,1,1,1) negative."""
        array = self._load(path)
        if array is None:
            return
        if array.dtype not in (np.bool_, np.uint8):
            self.problems.append(f"{path}: expected a bool or uint8 mask, got dtype {array.dtype}")
            return
        values = np.asarray(array)
        if array.shape == NEGATIVE_MASK_SHAPE:
            if values.any():
                self.problems.append(f"{path}: a (1, 1, 1, 1) negative mask must be zero")
            return
        if image_shape is not None and array.shape != image_shape:
            self.problems.append(f"{path}: mask shape {array.shape} differs from its image's {image_shape}")
            return
        if not values.any():
            self.problems.append(
                f"{path}: empty mask (all zeros at full size; an absent class must be "
                f"saved as zeros of shape {NEGATIVE_MASK_SHAPE})"
            )
            return
        box = mask_to_box(values, name=str(path))
        if not box_in_range(box):
            self.problems.append(f"{path}: box {box} of the mask is out of range [0, 1]")

    def region_ids(self, path: Path, image_shape: tuple[int, ...] | None) -> set[int] | None:
        """Region ids of an M3D-RefSeg integer mask of the image's shape (None and a problem otherwise)."""
        if path not in self.label_ids:
            self.label_ids[path] = self._check_regions(path, image_shape)
        return self.label_ids[path]

    def _check_regions(self, path: Path, image_shape) -> set[int] | None:
        array = self._load(path)
        if array is None:
            return None
        if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
            self.problems.append(f"{path}: expected an integer region-label mask, got dtype {array.dtype}")
            return None
        if image_shape is not None and array.shape != image_shape:
            self.problems.append(f"{path}: mask shape {array.shape} differs from its image's {image_shape}")
            return None
        return {int(v) for v in np.unique(np.asarray(array))} - {0}


def _check_cap(folder: Path, arrays: _Arrays, report: ValidationReport) -> None:
    path = folder / "M3D_Cap.json"
    try:
        splits, problems = _cap_problems(path, _load_json(path))
    except DatasetError as error:
        report.problems.append(str(error))
        return
    report.problems.extend(problems)
    for split, items in splits.items():
        report.counts[f"cap_{split}"] = len(items)
        for item in items:
            arrays.image(folder / item.image)
            text_path = folder / item.text
            if not text_path.is_file():
                report.problems.append(f"{text_path}: missing file (text of {path} {split})")
            elif not text_path.read_text(encoding="utf-8", errors="replace").strip():
                report.problems.append(f"{text_path}: empty report text")


def _check_vqa(folder: Path, arrays: _Arrays, report: ValidationReport) -> None:
    cap_folder = folder.parent / "M3D_Cap"
    for split, name in VQA_FILES.items():
        path = folder / name
        try:
            rows = _read_csv(path, VQA_COLUMNS)
        except DatasetError as error:
            report.problems.append(str(error))
            continue
        report.problems.extend(_vqa_problems(path, rows))
        report.counts[f"vqa_{split}"] = len(rows)
        for image in sorted({row["Image Path"] for row in rows}):
            if not (cap_folder / image).is_file():
                report.problems.append(f"{path}: 'Image Path' {image!r} does not exist under {cap_folder}")


def _check_seg(folder: Path, arrays: _Arrays, report: ValidationReport) -> None:
    try:
        info = _load_json(folder / "dataset_info.json")
    except DatasetError as error:
        report.problems.append(str(error))
        return
    if not isinstance(info, dict) or not all(isinstance(v, list) for v in info.values()):
        report.problems.append(
            f"{folder / 'dataset_info.json'}: expected {{code: [class names]}}, got {info!r}"
        )
        return
    terms_path = folder / "term_dictionary.json"
    terms = None
    if terms_path.exists():
        try:
            terms = _load_json(terms_path)
        except DatasetError as error:
            report.problems.append(str(error))
    for code, classes in info.items():
        if isinstance(terms, dict):
            missing = [c for c in classes if not terms.get(c)]
            if missing:
                report.problems.append(f"{terms_path}: no definitions for classes {missing} of code {code!r}")
        path = folder / code / f"{code}.json"
        try:
            dataset, problems = _seg_problems(path, _load_json(path))
        except DatasetError as error:
            report.problems.append(str(error))
            continue
        report.problems.extend(problems)
        if dataset is None:
            continue
        for split, items in dataset.splits.items():
            report.counts[f"seg_{split}"] = report.counts.get(f"seg_{split}", 0) + len(items)
            for item in items:
                if item.class_index >= len(classes):
                    report.problems.append(
                        f"{path}: {item.label} has class index {item.class_index}, but "
                        f"dataset_info[{code!r}] lists only {len(classes)} classes"
                    )
                arrays.class_mask(folder / item.label, arrays.image(folder / item.image))


def _check_refseg(folder: Path, arrays: _Arrays, report: ValidationReport) -> None:
    names = dict(REFSEG_FILES)
    if (folder / REFSEG_ALL_FILE).exists():
        names["all"] = REFSEG_ALL_FILE
    for split, name in names.items():
        path = folder / name
        try:
            rows = _read_csv(path, REFSEG_COLUMNS)
        except DatasetError as error:
            report.problems.append(str(error))
            continue
        report.problems.extend(_refseg_problems(path, rows))
        report.counts[f"refseg_{split}"] = len(rows)
        for i, row in enumerate(rows):
            ids = arrays.region_ids(folder / row["Mask"], arrays.image(folder / row["Image"]))
            if ids is not None and row["Mask_ID"].isdigit() and int(row["Mask_ID"]) not in ids:
                report.problems.append(
                    f"{path}: row {i + 2}: Mask_ID {row['Mask_ID']} is not present in "
                    f"{folder / row['Mask']} (regions {sorted(ids)}), so it has no box"
                )


def _check_raw(folder: Path, report: ValidationReport) -> None:
    import SimpleITK as sitk  # only needed when a raw/ folder exists

    cases = sorted(p for p in folder.iterdir() if p.is_dir())
    report.counts["raw_cases"] = len(cases)
    for case in cases:
        sizes = {}
        for name in ("ct.nii.gz", "organs.nii.gz", "lesions.nii.gz"):
            path = case / name
            if not path.exists():
                if name == "ct.nii.gz":
                    report.problems.append(f"{path}: missing file")
                continue
            try:
                sizes[name] = sitk.ReadImage(str(path)).GetSize()
            except RuntimeError as error:
                first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
                report.problems.append(f"{path}: unreadable NIfTI ({first_line})")
        if len(set(sizes.values())) > 1:
            report.problems.append(f"{case}: raw volumes differ in size {sizes}")


def validate_dataset(root) -> ValidationReport:
    """Check each part of an M3D-format root that exists (raw, M3D_Cap, M3D_VQA, M3D_Seg, M3D_RefSeg).

    Files must exist and parse, columns and keys must be exact, images 1 x D x H x W float in [0, 1]
    without NaN, masks the image's shape (or the (1, 1, 1, 1) negative) and non-empty, RefSeg ids
    present in their mask, VQA images present, report texts non-empty, raw NIfTIs readable.
    All problems are collected; ``report.ok`` is True when there are none.
    """
    root = Path(root)
    report = ValidationReport()
    if not root.is_dir():
        report.problems.append(f"{root}: not a directory")
        return report
    arrays = _Arrays(report.problems)
    checks = {
        "M3D_Cap": _check_cap,
        "M3D_VQA": _check_vqa,
        "M3D_Seg": _check_seg,
        "M3D_RefSeg": _check_refseg,
    }
    present = [name for name in checks if (root / name).is_dir()]
    if not present:
        report.problems.append(f"{root}: no M3D dataset here; expected one of the folders {list(checks)}")
    for name in present:
        checks[name](root / name, arrays, report)
    if (root / "raw").is_dir():
        _check_raw(root / "raw", report)
    return report
