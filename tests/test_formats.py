"""M3D formats: boxes as text, readers with clear errors, and validate_dataset on a written phantom root."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from m3d_lite.data.formats import (
    QUESTION_TYPES,
    REFSEG_COLUMNS,
    VQA_COLUMNS,
    DatasetError,
    box_in_range,
    box_to_text,
    mask_to_box,
    parse_box,
    read_cap_json,
    read_refseg_csv,
    read_seg_dataset,
    read_vqa_csv,
    validate_dataset,
)
from m3d_lite.data.phantom import ORGANS
from m3d_lite.data.phantom_dataset import write_phantom_dataset

NUM_VOLUMES = 6


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "root"
    summary = write_phantom_dataset(root, NUM_VOLUMES, scale="ci", seed=0, progress=False)
    return root, summary


@pytest.fixture
def copy(written, tmp_path):
    """A private copy of the written dataset, to break."""
    return shutil.copytree(written[0], tmp_path / "root")


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def rewrite_csv(path, transform):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    write_csv(path, transform(rows))


def only_problem_about(report, *words):
    """Assert the report has problems and one of them contains every word."""
    assert report.problems, "expected problems"
    assert any(all(w in p for w in words) for p in report.problems), report.problems


# --------------------------------------------------------------------------------------------
# Boxes.
def test_mask_to_box_matches_m3d_text():
    mask = np.zeros((8, 16, 32), dtype=bool)
    mask[1:6, 4:10, 8:24] = True
    box = mask_to_box(mask)
    assert box == (0.125, 0.25, 0.25, 0.625, 0.562, 0.719)
    assert box_to_text(box) == "<bx_start>[0.125, 0.25, 0.25, 0.625, 0.562, 0.719]<bx_end>"
    assert mask_to_box(mask[None]) == box
    assert all(type(v) is float for v in box)


def test_mask_to_box_rejects_empty_and_bad_rank():
    with pytest.raises(ValueError, match="liver mask.*empty"):
        mask_to_box(np.zeros((4, 4, 4)), name="liver mask")
    with pytest.raises(ValueError, match="D x H x W"):
        mask_to_box(np.ones((4, 4)))


def test_box_text_round_trip_and_parse_tolerance():
    box = (0.0, 0.031, 0.5, 0.969, 0.75, 0.984)
    assert parse_box(box_to_text(box)) == box
    assert parse_box("Sure, it is at <bx_start>[0.1, 0.2, 0.3,0.4 , 0.5, 0.6]<bx_end>.") == (
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
    )
    assert parse_box("[0.1, 0.2, 0.3, 0.4, 0.5]") is None
    assert parse_box("no box here") is None


def test_box_in_range():
    assert box_in_range((0.0, 0.1, 0.2, 0.5, 0.6, 0.999))
    assert not box_in_range((0.0, 0.1, 0.2, 1.5, 0.6, 0.9))  # beyond 1
    assert not box_in_range((-0.1, 0.1, 0.2, 0.5, 0.6, 0.9))
    assert not box_in_range((0.6, 0.1, 0.2, 0.5, 0.6, 0.9))  # min > max
    assert not box_in_range((0.1, 0.2))
    assert not box_in_range(None)
    assert not box_in_range((0.1, 0.2, 0.3, float("nan"), 0.5, 0.6))


# --------------------------------------------------------------------------------------------
# Readers.
def test_readers_on_a_written_dataset(written):
    root, summary = written
    cap = read_cap_json(root / "M3D_Cap" / "M3D_Cap.json")
    assert [len(cap[s]) for s in ("train", "validation", "test")] == [4, 1, 1]
    assert cap["train"][0].image.startswith("ct_case/phantom_00000/") and cap["train"][0].text.endswith(
        "text.txt"
    )
    rows = read_vqa_csv(root / "M3D_VQA" / "M3D_VQA_train.csv")
    assert rows and set(rows[0]) == set(VQA_COLUMNS)
    assert {r["Question Type"] for r in rows} <= set(QUESTION_TYPES) and {1, 2, 3, 4} <= {
        r["Question Type"] for r in rows
    }
    seg = read_seg_dataset(root / "M3D_Seg" / "phantom" / "phantom.json")
    assert seg.labels == ORGANS
    assert len(seg.splits["train"]) == 5 * len(ORGANS) and len(seg.splits["test"]) == len(ORGANS)
    assert {item.class_index for item in seg.splits["train"]} == set(range(len(ORGANS)))
    refseg = read_refseg_csv(root / "M3D_RefSeg" / "M3D_RefSeg_all.csv")
    assert refseg and all(r["Mask_ID"] >= 1 and r["Question_Type"] in (0, 1) for r in refseg)
    assert summary.counts["vqa_train"] == len(rows)


def test_vqa_reader_names_file_row_and_expectation(tmp_path):
    path = tmp_path / "vqa.csv"
    row = ["a.npy", "t", "2", "Q?", "x", "y", "NA", "NA", "y", "A"]
    write_csv(path, [list(VQA_COLUMNS), row])
    with pytest.raises(DatasetError, match=r"vqa.csv: row 2: 'Answer' 'y' is not the text of Choice A"):
        read_vqa_csv(path)
    write_csv(path, [list(VQA_COLUMNS), [*row[:2], "7", *row[3:8], "x", "E"]])
    with pytest.raises(DatasetError, match=r"'Question Type' must be 1..5.*more problems"):
        read_vqa_csv(path)


def test_refseg_and_cap_readers_reject_bad_content(tmp_path):
    path = tmp_path / "refseg.csv"
    write_csv(path, [list(REFSEG_COLUMNS), ["c/ct.npy", "c/mask.npy", "1", "0", "Q?", "no token"]])
    with pytest.raises(DatasetError, match=r"refseg.csv: row 2: 'Answer' must contain exactly one \[SEG\]"):
        read_refseg_csv(path)
    cap = tmp_path / "M3D_Cap.json"
    cap.write_text(json.dumps({"train": [{"image": "a.npy"}]}))
    with pytest.raises(
        DatasetError, match=r"M3D_Cap.json: train\[0\] must have string keys 'image' and 'text'"
    ):
        read_cap_json(cap)
    with pytest.raises(DatasetError, match="file not found"):
        read_seg_dataset(tmp_path / "0000.json")


# --------------------------------------------------------------------------------------------
# validate_dataset: a clean root, then one test per breakage.
def test_written_dataset_validates_with_zero_problems(written):
    root, summary = written
    report = validate_dataset(root)
    assert report.ok, str(report)
    assert report.counts["cap_train"] == 4 and report.counts["raw_cases"] == NUM_VOLUMES
    assert report.counts["seg_train"] == summary.counts["seg_train"]
    assert report.counts["refseg_train"] + report.counts["refseg_test"] == report.counts["refseg_all"] > 0


def test_root_without_m3d_folders_is_a_problem(tmp_path):
    only_problem_about(validate_dataset(tmp_path), "no M3D dataset")


def test_missing_vqa_column(copy):
    path = copy / "M3D_VQA" / "M3D_VQA_train.csv"
    rewrite_csv(path, lambda rows: [r[:-2] + r[-1:] for r in rows])  # drop "Answer"
    only_problem_about(validate_dataset(copy), "M3D_VQA_train.csv", "missing ['Answer']")


def test_wrong_answer_text_and_missing_vqa_image(copy):
    path = copy / "M3D_VQA" / "M3D_VQA_val.csv"
    rewrite_csv(
        path, lambda rows: [rows[0], [rows[1][0].replace(".npy", "_x.npy"), *rows[1][1:8], "zzz", rows[1][9]]]
    )
    report = validate_dataset(copy)
    only_problem_about(report, "M3D_VQA_val.csv", "row 2", "'zzz' is not the text of Choice")
    only_problem_about(report, "M3D_VQA_val.csv", "_x.npy", "does not exist")


def test_wrong_npy_shape(copy):
    item = json.loads((copy / "M3D_Cap" / "M3D_Cap.json").read_text())["train"][0]
    path = copy / "M3D_Cap" / item["image"]
    np.save(path, np.load(path)[0])  # drop the channel axis
    only_problem_about(validate_dataset(copy), str(path), "1 x D x H x W", "(32, 64, 64)")


def test_nan_in_a_volume(copy):
    path = copy / "M3D_Seg" / "phantom" / "phantom_00002" / "image.npy"
    image = np.load(path)
    image[0, 5, 10, 10] = np.nan
    np.save(path, image)
    only_problem_about(validate_dataset(copy), str(path), "NaN")


def test_values_outside_unit_range(copy):
    path = copy / "M3D_Seg" / "phantom" / "phantom_00002" / "image.npy"
    np.save(path, np.load(path) * 2.0)
    only_problem_about(validate_dataset(copy), str(path), "[0, 1]")


def test_refseg_mask_id_without_region_has_no_box(copy):
    path = copy / "M3D_RefSeg" / "M3D_RefSeg_train.csv"
    rewrite_csv(path, lambda rows: [rows[0], [*rows[1][:2], "9", *rows[1][3:]], *rows[2:]])
    only_problem_about(validate_dataset(copy), "M3D_RefSeg_train.csv", "row 2", "Mask_ID 9 is not present")


def test_empty_mask_file(copy):
    path = copy / "M3D_Seg" / "phantom" / "phantom_00001" / "masks" / "mask_0.npy"
    np.save(path, np.zeros_like(np.load(path)))
    only_problem_about(validate_dataset(copy), str(path), "empty mask")


def test_mask_shape_differs_from_image(copy):
    path = copy / "M3D_Seg" / "phantom" / "phantom_00001" / "masks" / "mask_1.npy"
    np.save(path, np.load(path)[:, :16])
    only_problem_about(validate_dataset(copy), str(path), "differs from its image")


def test_unreadable_nifti(copy):
    path = copy / "raw" / "phantom_00003" / "ct.nii.gz"
    path.write_bytes(b"this is not a NIfTI file at all")
    only_problem_about(validate_dataset(copy), str(path), "unreadable NIfTI")


def test_unreadable_npy(copy):
    path = (
        copy / "M3D_RefSeg" / next(p.name for p in (copy / "M3D_RefSeg").iterdir() if p.is_dir()) / "mask.npy"
    )
    path.write_bytes(b"garbage")
    only_problem_about(validate_dataset(copy), str(path), "unreadable .npy")


def test_malformed_json(copy):
    path = copy / "M3D_Cap" / "M3D_Cap.json"
    path.write_text('{"train": [')
    only_problem_about(validate_dataset(copy), str(path), "not valid JSON")
    seg_json = copy / "M3D_Seg" / "phantom" / "phantom.json"
    seg_json.write_text(
        json.dumps({"labels": {"1": "liver"}, "train": [{"image": "x.npy", "label": "m.npy"}]})
    )
    only_problem_about(validate_dataset(copy), str(seg_json), "train[0]", "mask_<k>.npy")


def test_missing_files_are_all_collected(copy):
    text = copy / "M3D_Cap" / "ct_case" / "phantom_00004" / "text.txt"
    mask = copy / "M3D_Seg" / "phantom" / "phantom_00000" / "masks" / "mask_3.npy"
    text.unlink()
    mask.unlink()
    (copy / "M3D_VQA" / "M3D_VQA_test.csv").unlink()
    report = validate_dataset(copy)
    only_problem_about(report, str(text), "missing file")
    only_problem_about(report, str(mask), "missing file")
    only_problem_about(report, "M3D_VQA_test.csv", "file not found")
    assert len(report.problems) == 3, report.problems


def test_empty_report_text(copy):
    path = copy / "M3D_Cap" / "ct_case" / "phantom_00001" / "text.txt"
    path.write_text("  \n")
    only_problem_about(validate_dataset(copy), str(path), "empty report text")
