"""The data scripts on tiny fixtures written in the REAL released layouts of M3D-Cap, -VQA, -Seg, -RefSeg."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy import sparse

from m3d_lite.data.formats import REFSEG_COLUMNS, VQA_COLUMNS, mask_to_box, validate_dataset
from m3d_lite.data.m3d_release import cap_text, find_scans, split_ids

SCRIPTS = Path(__file__).resolve().parents[1] / "data_scripts"
SHAPE = ["--shape", "8", "16", "16"]
REPORT = "study_findings: The liver is normal.\nA 2 cm cyst in the spleen.\n\ndiscussion: Benign."


def script(name: str):
    """The module of data_scripts/<name>.py (scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_valid(root: Path) -> None:
    report = validate_dataset(root)
    assert report.problems == [], report.problems


def write_slices(folder: Path, count: int, shape=(40, 48), odd: int | None = None, suffix=".png") -> None:
    """Slices 1..count whose brightness grows with the slice number (so the order is checkable)."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disk = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 3) ** 2
    for n in range(1, count + 1):
        pixels = np.where(disk, 20 + n * 15, 0).astype(np.uint8)
        Image.fromarray(pixels if n != odd else pixels[:20, :20]).save(folder / f"{n}{suffix}")


@pytest.fixture
def cap_raw(tmp_path):
    src = tmp_path / "raw_cap"
    write_slices(src / "ct_case/000001/Axial_non_contrast", 12, odd=5)
    write_slices(src / "ct_case/000001/Coronal_bone_window", 6, shape=(30, 30))
    (src / "ct_case/000001/text.txt").write_text("case: liver\n" + REPORT)
    for case in ("000002", "000003", "000004"):
        write_slices(src / f"ct_case/{case}/Axial_C__portal_venous_phase", 4, suffix=".jpeg")
        (src / f"ct_case/{case}/text.txt").write_text(f"discussion: Case {case} shows nothing.")
    return src


def test_cap_text_rules():
    assert cap_text(REPORT) == "The liver is normal. A 2 cm cyst in the spleen.  discussion: Benign."
    # empty findings (under 5 characters): fall back to the discussion
    assert (
        cap_text("discussion: Only a discussion.\nstudy_findings: ") == "Only a discussion. study_findings:"
    )
    assert cap_text("No markers\nat all.") == "No markers at all."


def test_split_is_deterministic_and_stable():
    ids = [f"{i:06d}" for i in range(2000)]
    split = split_ids(ids, 0.1, 0.2, seed=3)
    assert sorted(sum(split.values(), [])) == ids
    assert 300 < len(split["test"]) < 500 and 120 < len(split["validation"]) < 280
    assert split == split_ids(list(reversed(ids)), 0.1, 0.2, seed=3)
    assert split != split_ids(ids, 0.1, 0.2, seed=4)
    # a case keeps its split when others are added or left out
    part = split_ids(ids[::7], 0.1, 0.2, seed=3)
    assert all(set(part[k]) <= set(split[k]) for k in split)


def test_prepare_m3d_cap(cap_raw, tmp_path, capsys):
    root = tmp_path / "out"
    args = [
        "--src",
        str(cap_raw),
        "--out",
        str(root),
        *SHAPE,
        "--val-fraction",
        "0.25",
        "--test-fraction",
        "0.25",
    ]
    assert script("prepare_m3d_cap").main(args) == 0
    printed = capsys.readouterr().out
    assert "kept 11 slices of shape (40, 48), dropped 1" in printed
    case = root / "M3D_Cap/ct_case/000001"
    volume = np.load(case / "Axial_non_contrast.npy")
    assert volume.shape == (1, 8, 16, 16) and volume.dtype == np.float32
    assert volume.min() == 0.0 and 0.9 < volume.max() <= 1.0
    means = volume[0].mean(axis=(1, 2))
    assert np.all(np.diff(means) > 0), "slices are not in numeric order (1, 2, ..., 10, 12)"
    assert (case / "text.txt").read_text() == cap_text(REPORT)
    cap_json = json.loads((root / "M3D_Cap/M3D_Cap.json").read_text())
    assert sorted(cap_json) == ["test", "train", "validation"]
    assert sum(len(v) for v in cap_json.values()) == 5
    splits_of_case_1 = {s for s, items in cap_json.items() for e in items if "000001" in e["image"]}
    assert len(splits_of_case_1) == 1  # both series of a case in the same split
    assert {
        "image": "ct_case/000002/Axial_C__portal_venous_phase.npy",
        "text": "ct_case/000002/text.txt",
    } in sum(cap_json.values(), [])
    assert_valid(root)
    # re-running keeps what exists, and gives the same json
    assert script("prepare_m3d_cap").main(args) == 0
    assert "series kept (already prepared): 5" in capsys.readouterr().out
    assert json.loads((root / "M3D_Cap/M3D_Cap.json").read_text()) == cap_json
    # two worker processes write the same volumes
    assert script("prepare_m3d_cap").main([*args, "--workers", "2", "--overwrite"]) == 0
    assert "series written: 5" in capsys.readouterr().out
    assert np.array_equal(np.load(case / "Axial_non_contrast.npy"), volume)


def test_cap_refuses_wrong_layout(tmp_path):
    (tmp_path / "wrong").mkdir()
    with pytest.raises(FileNotFoundError, match=r"wrong: no ct_case/ or ct_quizze/ folder"):
        script("prepare_m3d_cap").main(["--src", str(tmp_path / "wrong"), "--out", str(tmp_path / "o")])


def test_prepare_m3d_vqa(cap_raw, tmp_path, capsys):
    root = tmp_path / "out"
    script("prepare_m3d_cap").main(["--src", str(cap_raw), "--out", str(root), *SHAPE])
    src = tmp_path / "raw_vqa"
    src.mkdir()
    row = {
        "Text": "The liver is normal.",
        "Question Type": "1",
        "Question": "Which plane is this image in?",
        "Choice A": "Axial",
        "Choice B": "Coronal",
        "Choice C": "Sagittal",
        "Choice D": "NA",
        "Answer": "Axial",
        "Answer Choice": "A",
    }
    images = [
        "ct_case/000001/Axial_non_contrast.npy",
        "ct_case/000002/Axial_C__portal_venous_phase.npy",
        "ct_case/999999/Axial_gone.npy",
    ]
    pd.DataFrame([{"Image Path": image, **row} for image in images])[list(VQA_COLUMNS)].to_csv(
        src / "M3D_VQA_train.csv", index=False
    )
    for name in ("M3D_VQA_val.csv", "M3D_VQA_test.csv"):
        pd.DataFrame([{"Image Path": images[0], **row}])[list(VQA_COLUMNS)].to_csv(src / name, index=False)
    pd.DataFrame({"Image Path": images[:1], "Question": ["Is it axial?"], "Answer": ["Yes"]}).to_csv(
        src / "M3D_VQA_yn_train.csv", index=False
    )

    assert (
        script("prepare_m3d_vqa").main(["--src", str(src), "--out", str(root)]) == 1
    )  # invalid: missing image
    printed = capsys.readouterr().out
    assert "M3D_VQA_train.csv: 1 of 3 rows have no image" in printed
    assert "'Image Path' 'ct_case/999999/Axial_gone.npy' does not exist" in printed  # from validate_dataset
    assert "M3D_VQA_yn_train.csv: columns" in printed and "file not copied" in printed
    train = pd.read_csv(root / "M3D_VQA/M3D_VQA_train.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == list(VQA_COLUMNS) and len(train) == 3
    assert train["Choice D"].tolist() == ["NA"] * 3  # "NA" is an option text, not a missing value
    assert not (root / "M3D_VQA/M3D_VQA_yn_train.csv").exists()

    assert script("prepare_m3d_vqa").main(["--src", str(src), "--out", str(root), "--drop-missing"]) == 0
    train = pd.read_csv(root / "M3D_VQA/M3D_VQA_train.csv", dtype=str, keep_default_na=False)
    assert train["Image Path"].tolist() == images[:2]
    assert_valid(root)


def write_seg_case(code_dir: Path, case: str, xyz, boxes, channels: int) -> dict:
    """A case in the FACTS layout: ct/<case>.npy (1, X, Y, Z) + gt/<case>.(C, X, Y, Z).npz."""
    rng = np.random.default_rng(len(case))
    image = 100.0 + rng.normal(0, 5, size=(1, *xyz))  # foreground everywhere: the crop keeps all
    masks = np.zeros((channels, *xyz), dtype=np.uint8)
    for k, (lo, hi) in boxes.items():
        masks[k, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    (code_dir / "ct").mkdir(parents=True, exist_ok=True)
    (code_dir / "gt").mkdir(parents=True, exist_ok=True)
    np.save(code_dir / "ct" / f"{case}.npy", image)
    label = f"gt/{case}.{(channels, *xyz)}.npz"
    sparse.save_npz(code_dir / label, sparse.csr_matrix(masks.reshape(channels, -1)))
    return {"image": f"{code_dir.name}/ct/{case}.npy", "label": f"{code_dir.name}/{label}"}


def test_prepare_m3d_seg(tmp_path):
    src, root = tmp_path / "raw_seg", tmp_path / "out"
    xyz = (20, 24, 12)  # X, Y, Z
    cube = ((4, 6, 2), (10, 18, 8))  # in X, Y, Z
    train = write_seg_case(src / "0000", "case1", xyz, {0: cube, 1: ((12, 2, 0), (18, 8, 12))}, channels=3)
    test = write_seg_case(src / "0000", "case2", xyz, {1: cube}, channels=3)
    labels = {"0": "background", "1": "liver", "2": "spleen", "3": "left kidney"}
    (src / "0000/0000.json").write_text(
        json.dumps({"name": "CHAOS", "labels": labels, "train": [train], "test": [test]})
    )
    (src / "dataset_info.json").write_text(json.dumps({"0000": ["liver", "spleen", "left kidney"]}))
    terms = {name: [f"The {name} is an organ."] for name in ("liver", "spleen", "left kidney")}
    (src / "term_dictionary.json").write_text(json.dumps(terms))
    earlier = {"aorta": ["The aorta is an artery."]}  # another dataset's terms, already in the root
    (root / "M3D_Seg").mkdir(parents=True)
    (root / "M3D_Seg/term_dictionary.json").write_text(json.dumps(earlier))

    assert script("prepare_m3d_seg").main(["--src", str(src), "--out", str(root), *SHAPE]) == 0
    out = root / "M3D_Seg/0000"
    image = np.load(out / "case1/image.npy")
    assert image.shape == (1, 8, 16, 16) and image.dtype == np.float32 and 0 <= image.min() < image.max() <= 1
    liver = np.load(out / "case1/masks/mask_0.npy")
    assert liver.shape == (1, 8, 16, 16) and liver.dtype == bool
    # (X, Y, Z) -> (Z, Y, X): the cube's box follows the swapped axes
    (x0, y0, z0), (x1, y1, z1) = cube
    expected = (z0 / 12, y0 / 24, x0 / 20, (z1 - 1) / 12, (y1 - 1) / 24, (x1 - 1) / 20)
    assert np.allclose(mask_to_box(liver[0]), expected, atol=1.5 / 8)
    assert np.load(out / "case1/masks/mask_2.npy").shape == (1, 1, 1, 1)  # absent class: negative sample
    assert np.load(out / "case2/masks/mask_0.npy").shape == (1, 1, 1, 1)
    prepared_json = json.loads((out / "0000.json").read_text())
    assert prepared_json["labels"] == labels and prepared_json["name"] == "CHAOS"
    assert prepared_json["train"] == [
        {"image": "0000/case1/image.npy", "label": f"0000/case1/masks/mask_{k}.npy"} for k in range(3)
    ]
    assert len(prepared_json["test"]) == 3
    assert json.loads((root / "M3D_Seg/dataset_info.json").read_text()) == {
        "0000": ["liver", "spleen", "left kidney"]
    }
    assert json.loads((root / "M3D_Seg/term_dictionary.json").read_text()) == {**earlier, **terms}
    assert_valid(root)


def test_seg_reports_bad_mask_name(tmp_path, capsys):
    src = tmp_path / "raw_seg"
    item = write_seg_case(src / "0001", "c", (6, 6, 6), {0: ((1, 1, 1), (4, 4, 4))}, channels=1)
    renamed = src / "0001/gt/c_mask.npz"
    (src / item["label"]).rename(renamed)
    item["label"] = "0001/gt/c_mask.npz"
    (src / "0001/0001.json").write_text(json.dumps({"labels": {"1": "liver"}, "train": [item], "test": []}))
    script("prepare_m3d_seg").main(["--src", str(src), "--out", str(tmp_path / "out"), *SHAPE])
    assert "c_mask.npz: no '(C, X, Y, Z)' shape in the file name" in capsys.readouterr().out


def write_nifti(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_prepare_m3d_refseg(tmp_path, capsys):
    src, root = tmp_path / "raw_refseg", tmp_path / "out"
    rows = []
    for case in ("s0000", "s0001", "s0002"):
        (src / case).mkdir(parents=True)
        ct = np.full((20, 40, 40), -1000, dtype=np.int16)
        ct[2:18, 5:35, 5:35] = 40
        ct[8:12, 10:20, 10:20] = 200
        mask = np.zeros_like(ct, dtype=np.uint8)
        mask[8:12, 10:20, 10:20] = 1
        mask[4:8, 22:30, 22:30] = 2
        write_nifti(src / case / "ct.nii.gz", ct)
        write_nifti(src / case / "mask.nii.gz", mask)
        (src / case / "text.json").write_text(json.dumps({"1": "A bright lesion.", "2": "A second region."}))
        rows += [
            {
                "Image": f"{case}/ct.nii.gz",
                "Mask": f"{case}/mask.nii.gz",
                "Mask_ID": str(m),
                "Question_Type": "0",
                "Question": "Where is the lesion?",
                "Answer": "It is [SEG].",
            }
            for m in (1, 2, 7)
        ]
    pd.DataFrame(rows)[list(REFSEG_COLUMNS)].to_csv(src / "M3D_RefSeg.csv", index=False)

    args = ["--src", str(src), "--out", str(root), *SHAPE, "--test-fraction", "0.34"]
    assert script("prepare_m3d_refseg").main(args) == 0
    assert "Mask_ID '7' is not a region of s0000/mask.npy (regions [1, 2])" in capsys.readouterr().out
    ct, mask = np.load(root / "M3D_RefSeg/s0000/ct.npy"), np.load(root / "M3D_RefSeg/s0000/mask.npy")
    assert ct.shape == mask.shape == (1, 8, 16, 16)
    assert ct.dtype == np.float32 and ct.max() == pytest.approx(1.0) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1, 2}
    assert ct[mask == 1].mean() > ct[mask == 2].mean()  # the bright lesion stays on label 1
    train = pd.read_csv(root / "M3D_RefSeg/M3D_RefSeg_train.csv", dtype=str)
    test = pd.read_csv(root / "M3D_RefSeg/M3D_RefSeg_test.csv", dtype=str)
    assert list(train.columns) == list(REFSEG_COLUMNS)
    assert (len(train), len(test)) == (4, 2)
    assert set(train["Image"]) | set(test["Image"]) == {f"s000{i}/ct.npy" for i in range(3)}
    assert set(train["Image"].str[:5]).isdisjoint(test["Image"].str[:5])
    assert (root / "M3D_RefSeg/s0001/text.json").is_file()
    assert_valid(root)


def write_dicom_series(folder: Path, count: int) -> None:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    for i in range(count):
        ds = source.copy()
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], 5.0 * i]
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{i}.dcm")


def test_prepare_own_scans(tmp_path, capsys):
    src, root = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    body = np.zeros((12, 30, 30), dtype=np.float32)
    body[2:10, 5:25, 5:25] = 300.0
    write_nifti(src / "patient one.nii.gz", body)
    (src / "patient_one.txt").write_text("A normal abdomen.\n")
    write_dicom_series(src / "ct_series", 4)
    (src / "notes.txt").write_text("not a scan")
    (src / "junk.bin").write_bytes(b"1234")
    shutil_copy = get_testdata_file("CT_small.dcm")
    (src / "single").mkdir()
    (src / "single" / "slice.dcm").write_bytes(Path(shutil_copy).read_bytes())

    assert [name for name, _, _ in find_scans(src)] == ["ct_series", "slice", "patient_one"]
    args = ["--src", str(src), "--out", str(root), *SHAPE, "--window", "soft", "tissue"]
    assert script("prepare_own_scans").main(args) == 0
    printed = capsys.readouterr().out
    assert "expected a 3D volume, got 2D image of size 128x128" in printed
    assert "junk.bin: not a scan file nor a folder holding a DICOM series; ignored" in printed
    assert "notes.txt" not in printed
    cap = root / "M3D_Cap"
    for name in ("patient_one", "ct_series"):
        volume = np.load(cap / f"ct_case/{name}/Axial_soft_tissue_window.npy")
        assert volume.shape == (1, 8, 16, 16) and volume.max() <= 1.0
        assert (root / f"previews/{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (cap / "ct_case/patient_one/text.txt").read_text() == "A normal abdomen."
    cap_json = json.loads((cap / "M3D_Cap.json").read_text())
    # only the scan with a report is an image-report pair; own_scans.json lists both
    image = "ct_case/patient_one/Axial_soft_tissue_window.npy"
    assert cap_json == {
        "train": [],
        "validation": [],
        "test": [{"image": image, "text": "ct_case/patient_one/text.txt"}],
    }
    records = json.loads((root / "own_scans.json").read_text())
    assert [r["original_size_zyx"] for r in records] == [[4, 128, 128], [12, 30, 30]]
    assert records[0]["spacing_zyx_mm"] == pytest.approx([5.0, 0.661468, 0.661468])
    assert_valid(root)


def test_make_phantom(tmp_path):
    root = tmp_path / "phantom"
    assert script("make_phantom").main(["--out", str(root), "--num-volumes", "2", "--seed", "1"]) == 0
    assert_valid(root)


def test_scripts_have_help(capsys):
    for name in (
        "prepare_m3d_cap",
        "prepare_m3d_vqa",
        "prepare_m3d_seg",
        "prepare_m3d_refseg",
        "prepare_own_scans",
        "make_phantom",
    ):
        with pytest.raises(SystemExit) as exit_info:
            script(name).main(["--help"])
        assert exit_info.value.code == 0
        assert "Examples:" in capsys.readouterr().out
    assert (
        "DMCA"
        in subprocess.run(
            [sys.executable, str(SCRIPTS / "prepare_m3d_cap.py"), "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
