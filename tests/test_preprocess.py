"""Loading and preparing real scans: MNI152 MRI (nilearn) and pydicom's CT / enhanced MR test files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nilearn.datasets import load_mni152_template
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from m3d_lite.data.formats import mask_to_box
from m3d_lite.data.preprocess import (
    WINDOWS,
    load_volume,
    prepare_arrays,
    prepare_file,
    restore_mask,
    save_mask_nifti,
)

SHAPE = (32, 64, 64)


@pytest.fixture(scope="module")
def mni_path(tmp_path_factory):
    """The 2 mm MNI152 T1 template (99 x 117 x 95, RAS affine) saved as NIfTI."""
    path = tmp_path_factory.mktemp("mni") / "mni.nii.gz"
    nib.save(load_mni152_template(resolution=2), path)
    return path


def write_ct_series(folder, positions, series_uid=None):
    """Copies of CT_small.dcm at ``positions`` (mm, z), written in shuffled order; slice i has a
    raw-value marker i * 100 in its top-left corner (HU = marker - 1024)."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = series_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(positions))
    for i in order:
        ds = source.copy()
        x, y, _ = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, positions[i]]
        ds.SliceLocation = positions[i]
        ds.InstanceNumber = int(i) + 1
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pixels = ds.pixel_array.copy()
        pixels[:8, :8] = i * 100
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{int(i) * 7 % 10:02d}_{i}_{series_uid[-4:]}.dcm")
    return folder


def test_mni_round_trip(mni_path):
    volume = load_volume(mni_path)
    assert volume.array.shape == (95, 117, 99)  # (z, y, x)
    assert volume.array.dtype == np.float32
    assert volume.spacing == (2.0, 2.0, 2.0)
    assert volume.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # LPS
    prepared, loaded = prepare_file(mni_path, SHAPE)
    assert prepared.image.shape == (1, *SHAPE) and prepared.image.dtype == np.float32
    assert prepared.image.min() >= 0.0 and 0.8 < prepared.image.max() <= 1.0
    assert prepared.source_shape == loaded.array.shape
    # the crop removed the empty border around the head
    (d0, h0, w0), (d1, h1, w1) = prepared.crop_box
    assert h0 > 0 and w0 > 0 and h1 < 117 and w1 < 99
    robust, _ = prepare_file(mni_path, SHAPE, percentiles=(0.5, 99.5))
    assert robust.image.max() == pytest.approx(1.0) and robust.image.mean() > prepared.image.mean()


def test_orientation_is_canonical(mni_path, tmp_path):
    lps = load_volume(mni_path)
    # the file is RAS (nibabel); LPS flips x and y
    assert np.array_equal(load_volume(mni_path, orient="RAS").array, lps.array[:, ::-1, ::-1])
    assert np.array_equal(load_volume(mni_path, orient=None).array, lps.array[:, ::-1, ::-1])
    # the same voxels written with x flipped (direction -1 on x, origin moved) load to the same LPS array
    flipped = sitk.GetImageFromArray(lps.array[:, :, ::-1].copy())
    flipped.SetSpacing(lps.spacing[::-1])
    last_x = lps.origin[0] + (lps.array.shape[2] - 1) * lps.spacing[2]
    flipped.SetOrigin((last_x, lps.origin[1], lps.origin[2]))
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    again = load_volume(tmp_path / "flipped.nii.gz")
    assert np.array_equal(again.array, lps.array)
    assert again.origin == pytest.approx(lps.origin)


def test_dicom_series_folder(tmp_path):
    positions = [-77.2 + 5.0 * i for i in range(6)]
    folder = write_ct_series(tmp_path / "series", positions)
    volume = load_volume(folder)
    assert volume.array.shape == (6, 128, 128)
    assert volume.spacing[0] == pytest.approx(5.0)
    # slices sorted by position, not by file name; HU from the rescale (intercept -1024)
    assert volume.array[:, 0, 0].tolist() == [i * 100 - 1024 for i in range(6)]
    body = volume.array[:, 64, 32:96]
    assert -1100 <= volume.array.min() and volume.array.max() < 3100 and body.mean() > -500
    prepared, _ = prepare_file(folder, (4, 32, 32), window="soft tissue")
    assert prepared.image.shape == (1, 4, 32, 32)


def test_dicom_folder_with_two_series(tmp_path):
    folder = write_ct_series(tmp_path / "two", [0.0, 5.0, 10.0], series_uid="1.2.3.4")
    write_ct_series(folder, [0.0, 2.5, 5.0, 7.5], series_uid="1.2.3.5")
    with pytest.raises(
        ValueError, match=r"holds 2 DICOM series.*1\.2\.3\.4 \(3 files\).*1\.2\.3\.5 \(4 files\)"
    ):
        load_volume(folder)
    assert load_volume(folder, series_id="1.2.3.5").array.shape[0] == 4


def test_multiframe_dicom():
    mr = load_volume(get_testdata_file("emri_small.dcm"))
    assert mr.array.shape == (10, 64, 64) and mr.array.max() > 0
    ct = load_volume(get_testdata_file("eCT_Supplemental.dcm"))
    assert ct.array.shape == (2, 512, 512)
    assert ct.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert ct.array.min() == -1024  # HU: rescale intercept applied


def test_masks_stay_aligned(mni_path, tmp_path):
    volume = load_volume(mni_path)
    cube = np.zeros(volume.array.shape, dtype=bool)
    cube[30:50, 40:75, 20:45] = True
    prepared = prepare_arrays(volume.array, SHAPE, masks={"cube": cube})
    (d0, h0, w0), (d1, h1, w1) = prepared.crop_box
    cropped = cube[d0:d1, h0:h1, w0:w1]
    before, after = np.array(mask_to_box(cropped)), np.array(mask_to_box(prepared.masks["cube"][0]))
    voxel = 1.0 / np.array(SHAPE * 2) + 1.0 / np.array(cropped.shape * 2)
    assert np.all(np.abs(after - before) <= voxel), (before, after)

    # no shift: the centres agree within a quarter of a prepared voxel ("nearest" would be off by ~half)
    def centre(mask):
        return (np.argwhere(mask).mean(axis=0) + 0.5) / np.array(mask.shape)

    assert np.all(np.abs(centre(prepared.masks["cube"][0]) - centre(cropped)) <= 0.25 / np.array(SHAPE))

    # back on the original grid: restore_mask (within one prepared voxel), then a NIfTI on the input
    # file's own (RAS) grid
    restored = restore_mask(prepared.masks["cube"], prepared.crop_box, prepared.source_shape)
    prepared_voxel = np.array((d1 - d0, h1 - h0, w1 - w0)) / np.array(SHAPE)
    error = np.abs(np.array(mask_to_box(restored)) - np.array(mask_to_box(cube))) * np.array(cube.shape * 2)
    assert np.all(error <= np.tile(prepared_voxel, 2) / 2 + 0.5), error
    out = save_mask_nifti(prepared.masks["cube"], volume, tmp_path / "mask.nii.gz", prepared.crop_box)
    written, original = sitk.ReadImage(str(out)), sitk.ReadImage(str(mni_path))
    assert written.GetSize() == original.GetSize()
    assert written.GetDirection() == pytest.approx(original.GetDirection())
    assert written.GetOrigin() == pytest.approx(original.GetOrigin())
    assert np.array_equal(load_volume(out).array > 0, restored)


def test_unreadable_file_names_path(tmp_path):
    garbage = tmp_path / "scan.nii.gz"
    garbage.write_bytes(b"not a nifti" * 50)
    with pytest.raises(ValueError, match=r"scan\.nii\.gz: SimpleITK cannot read it"):
        load_volume(garbage)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM series found"):
        load_volume(tmp_path / "empty")


def test_2d_image_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected a 3D volume, got 2D image of size 128x128"):
        load_volume(get_testdata_file("CT_small.dcm"))
    sitk.WriteImage(sitk.Image(40, 30, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(ValueError, match=r"slice\.nii\.gz: expected a 3D volume, got 2D image of size 40x30"):
        load_volume(tmp_path / "slice.nii.gz")


def test_nan_refused(tmp_path):
    array = np.zeros((4, 5, 6), dtype=np.float32)
    array[1, 2, 3] = np.nan
    # SimpleITK reads a NIfTI NaN as 0, so load_volume checks NIfTI floats itself
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 1 of 120 voxels are NaN"):
        load_volume(tmp_path / "nan.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    with pytest.raises(ValueError, match=r"nan\.mha: 1 of 120 voxels are NaN"):
        load_volume(tmp_path / "nan.mha")


def test_npy(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"flat\.npy: expected a numeric D x H x W.*\(4, 5\)"):
        load_volume(tmp_path / "flat.npy")
    array = np.random.default_rng(0).random((1, 6, 7, 8))
    np.save(tmp_path / "ok.npy", array)
    volume = load_volume(tmp_path / "ok.npy")
    assert volume.array.shape == (6, 7, 8) and volume.spacing == (1.0, 1.0, 1.0)
    assert np.allclose(volume.array, array[0])


def test_window_and_constant_volume():
    hu = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    hu[2:6, 2:6, 2:6] = 40.0
    prepared = prepare_arrays(hu, (4, 4, 4), window="soft tissue")
    lo, hi = WINDOWS["soft tissue"]
    assert prepared.image.max() == pytest.approx((40.0 - lo) / (hi - lo), abs=1e-5)
    assert prepared.crop_box == ((2, 2, 2), (6, 6, 6))
    with pytest.raises(ValueError, match="constant volume"):
        prepare_arrays(np.ones((4, 4, 4)), (2, 2, 2), name="flat.nii.gz")
    with pytest.raises(ValueError, match="unknown window 'brain'"):
        prepare_arrays(hu, (4, 4, 4), window="brain")
