"""The demo's input checks and pictures, without a browser: task questions in the training wording, the
token budget, zipped DICOM series, the size limit, phantom test volumes, and `m3d-lite demo` refusing a
missing model."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file
from test_preprocess import write_ct_series

from m3d_lite.cli import main
from m3d_lite.data import text
from m3d_lite.demo.inputs import phantom_examples, read_upload, task_question
from m3d_lite.infer import Answer, check_question, load_scan
from m3d_lite.models import build_lamed

SIZE = (32, 64, 64)


def test_each_task_asks_in_the_wording_the_model_was_trained_on():
    assert task_question("report") == text.CAPTION_PROMPTS[0]
    assert task_question("segmentation", target=" spleen ") == "Can you segment the spleen in this image?"
    assert task_question("REC (box)", target="liver") == text.REC_QUESTIONS[0].format("liver")
    vqa = task_question("VQA with choices", "Which phase is it?", choices=("a", "b", "c", "d"))
    assert vqa == "Which phase is it? Choices: A. a B. b C. c D. d"  # M3D's closed-VQA format
    assert task_question("free question", " Is there a cyst? ") == "Is there a cyst?"


@pytest.mark.parametrize(
    ("task", "kwargs", "message"),
    [
        ("segmentation", {}, "segmentation: name the target"),
        ("free question", {"question": "  "}, "free question: the question is empty"),
        ("VQA with choices", {"question": "Q?", "choices": ("a", "", "c", "d")}, "fill in all four choices"),
        ("caption", {}, "unknown task 'caption'"),
    ],
)
def test_a_task_without_what_it_needs_is_refused(task, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task_question(task, **kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        torch.manual_seed(0)
        return build_lamed("ci", llm="tiny-llama")


def test_a_question_over_the_token_budget_is_refused(model):
    lamed, tokenizer = model
    config = lamed.config
    length = check_question(tokenizer, config, "Where is the liver?", 16)
    assert config.proj_out_num < length < config.model_max_length - 16
    with pytest.raises(ValueError, match=r"over the model's budget of 256 tokens; shorten the question to"):
        check_question(tokenizer, config, "Where is the liver? " * 40, 16)
    with pytest.raises(ValueError, match=r"budget of 256 tokens; lower the answer length"):
        check_question(tokenizer, config, "Where is the liver?", 250)


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))
    return archive


def test_a_zipped_dicom_series_loads_as_its_folder(tmp_path):
    series = write_ct_series(tmp_path / "scans" / "series", [0.0, 5.0, 10.0, 15.0])
    scan = read_upload(zip_folder(series, tmp_path / "series.zip"), SIZE, "soft tissue")
    expected = load_scan(series, SIZE, "soft tissue")
    assert torch.equal(scan.image, expected.image) and scan.source.endswith("series.zip")
    assert scan.volume.input_grid == expected.volume.input_grid  # so the mask goes back on the series grid

    write_ct_series(tmp_path / "scans" / "other", [0.0, 5.0, 10.0])
    with pytest.raises(
        ValueError, match=r"two.zip: holds 2 DICOM series, expected one: scans/other \(3 files\)"
    ):
        read_upload(zip_folder(tmp_path / "scans", tmp_path / "two.zip"), SIZE)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"notes.zip: no DICOM series in this zip \(1 files\)"):
        read_upload(zip_folder(tmp_path / "notes", tmp_path / "notes.zip"), SIZE)
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="fake.zip: not a readable zip file"):
        read_upload(tmp_path / "fake.zip", SIZE)


def test_huge_and_flat_volumes_are_refused_before_the_model(tmp_path):
    big = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, 40, sitk.sitkInt16), str(big))
    with pytest.raises(ValueError, match=r"big.nii.gz: 163,840 voxels is over the demo's limit of 100,000"):
        read_upload(big, SIZE, max_voxels=100_000)
    flat = tmp_path / "slice.npy"
    np.save(flat, np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"slice.npy: expected a numeric D x H x W"):
        read_upload(flat, SIZE)
    with pytest.raises(
        ValueError, match=r"CT_small.dcm: expected a 3D volume, .* upload the series folder as"
    ):
        read_upload(get_testdata_file("CT_small.dcm"), SIZE)
    png = tmp_path / "photo.png"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkUInt8), str(png))
    with pytest.raises(ValueError, match="photo.png: expected a 3D volume, got 2D image of size 32x32"):
        read_upload(png, SIZE)


def test_phantom_examples_are_the_raw_test_volumes(phantom8, tmp_path):
    assert phantom_examples(phantom8, SIZE) == {
        "phantom_00007": phantom8 / "raw" / "phantom_00007" / "ct.nii.gz"
    }
    with pytest.raises(ValueError, match=r"not a phantom dataset \(no readable dataset_info.json\)"):
        phantom_examples(tmp_path, SIZE)


def test_views_centre_on_the_answer_and_draw_its_mask_and_box(phantom8):
    app = pytest.importorskip("m3d_lite.demo.app")
    scan = load_scan(phantom8 / "raw" / "phantom_00000" / "ct.nii.gz", SIZE, "soft tissue")
    display = app.display_volume(scan, "ct.nii.gz")
    (z0, _, _), (z1, _, _) = scan.prepared.crop_box
    assert display.spacing[0] == pytest.approx((z1 - z0) * scan.volume.spacing[0] / SIZE[0])
    mask = torch.zeros(1, *SIZE, dtype=torch.bool)
    mask[0, 4:9, 14:23, 30:41] = True
    box = (0.5, 0.25, 0.25, 0.75, 0.5, 0.5)
    answer = Answer("ct.nii.gz", "q", "text", box, mask)
    point = app.answer_point(answer, SIZE)
    assert point == [6, 18, 35]  # the mask's centre wins over the box's
    assert app.answer_point(Answer("s", "q", "t", box), SIZE) == [20, 24, 24]
    figure = app.draw_views(app.Shown(scan, Path("ct.nii.gz"), "ct.nii.gz", display, answer), point)
    axes = figure.axes[:3]
    assert [ax.get_title() for ax in axes] == ["axial 6", "coronal 18", "sagittal 35"]
    assert all(ax.collections for ax in axes)  # the mask's contour on every plane through it
    assert [len(ax.patches) for ax in axes] == [0, 1, 0]  # the box only on the planes it reaches


def test_demo_command_names_a_missing_model(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "none: no config.json in it nor in its model/" in capsys.readouterr().err
