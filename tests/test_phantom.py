"""M3D-Phantom: determinism, anatomy (labels, HU, positions in LPS), lesions, phases, reslicing, writer."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from m3d_lite.config import DataConfig
from m3d_lite.data import phantom
from m3d_lite.data.phantom import (
    LESION_KINDS,
    LESION_ORGAN_KINDS,
    ORGAN_LABELS,
    ORGANS,
    PHASES,
    PLANES,
    SUBLOCATIONS,
    WINDOW_NAMES,
    Findings,
    make_case,
    reslice,
    series_name,
)
from m3d_lite.data.phantom_dataset import case_seed, split_of, write_phantom_dataset

CI = DataConfig.from_scale("ci")
SEEDS = range(12)


@pytest.fixture(scope="module")
def cases():
    return [make_case(f"c{s}", s, CI.raw_shape, CI.raw_spacing) for s in SEEDS]


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)  # (z, y, x) in voxels


def test_same_seed_same_case_and_different_seed_differs():
    a = make_case("a", 7, CI.raw_shape, CI.raw_spacing)
    b = make_case("a", 7, CI.raw_shape, CI.raw_spacing)
    c = make_case("a", 8, CI.raw_shape, CI.raw_spacing)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.organ_labels, b.organ_labels)
    np.testing.assert_array_equal(a.lesion_labels, b.lesion_labels)
    assert a.findings == b.findings
    assert not np.array_equal(a.hu, c.hu)
    assert not np.array_equal(a.organ_labels, c.organ_labels)


def test_arrays_have_raw_shape_types_and_spacing(cases):
    for case in cases:
        assert case.hu.shape == case.organ_labels.shape == case.lesion_labels.shape == CI.raw_shape
        assert case.hu.dtype == np.float32 and np.isfinite(case.hu).all()
        assert case.organ_labels.dtype == np.uint8 and case.lesion_labels.dtype == np.uint8
        assert case.spacing == CI.raw_spacing
        assert case.hu.min() >= -1024 and case.hu.max() <= 3071
        # air outside the body: the corners of every slice
        assert np.median(case.hu[:, :3, :3]) < -900


def test_findings_use_the_vocabularies(cases):
    for case in cases:
        f = case.findings
        assert f.phase in PHASES and f.plane in PLANES and f.window in WINDOW_NAMES
        assert set(f.organs) <= set(ORGANS.values())
        ids = [lesion.lesion_id for lesion in f.lesions]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) <= 3
        assert set(np.unique(case.lesion_labels)) == {0, *ids}
        for lesion in f.lesions:
            assert lesion.kind in LESION_KINDS and lesion.kind in LESION_ORGAN_KINDS[lesion.organ]
            assert lesion.sublocation in SUBLOCATIONS[lesion.organ]
            assert lesion.size_mm >= phantom.MIN_LESION_MM - 1
        assert len({lesion.organ for lesion in f.lesions}) == len(f.lesions)  # one lesion per organ


def test_every_organ_present_except_a_removed_gallbladder(cases):
    for case in cases:
        present = {name for label, name in ORGANS.items() if (case.organ_labels == label).any()}
        assert present == set(case.findings.organs)
        assert set(ORGANS.values()) - present <= {"gallbladder"}
    # cholecystectomy is rare (8 %) but happens
    assert any(
        "gallbladder" not in make_case("x", s, CI.raw_shape, CI.raw_spacing).findings.organs
        for s in range(40)
    )


def median_hu(case, name: str) -> float:
    return float(np.median(case.hu[case.organ_labels == ORGAN_LABELS[name]]))


def test_organ_hu_is_plausible(cases):
    for case in cases:
        phase = case.findings.phase
        assert 30 < median_hu(case, "liver") < 150, phase
        assert 20 < median_hu(case, "spleen") < 160, phase
        assert median_hu(case, "vertebrae") > 150
        assert median_hu(case, "lungs") < -600
        if "gallbladder" in case.findings.organs:
            assert -20 < median_hu(case, "gallbladder") < 60
        assert (median_hu(case, "aorta") > 200) == (phase == "arterial")


def test_organs_sit_where_anatomy_puts_them(cases):
    # LPS: x grows to the patient's Left (patient right = small x), y to Posterior, z to Superior
    for case in cases:
        c = {
            name: centroid(case.organ_labels == label)
            for label, name in ORGANS.items()
            if name in case.findings.organs
        }
        mid_x = CI.raw_shape[2] / 2
        assert c["liver"][2] < mid_x < c["spleen"][2]
        assert c["right kidney"][2] < mid_x < c["left kidney"][2]
        assert c["stomach"][2] > mid_x
        assert c["aorta"][1] < c["vertebrae"][1]  # aorta anterior to the spine
        assert (
            c["right kidney"][1] > c["liver"][1] and c["left kidney"][1] > c["stomach"][1]
        )  # kidneys posterior
        assert c["lungs"][0] > c["liver"][0] > c["right kidney"][0]  # lungs at the top, kidneys lower
        assert abs(c["vertebrae"][2] - mid_x) < 3


def test_lesions_lie_inside_their_organ_and_sublocation():
    checked = 0
    for s in range(40):
        case = make_case("x", s, CI.raw_shape, CI.raw_spacing)
        for lesion in case.findings.lesions:
            inside = case.lesion_labels == lesion.lesion_id
            assert inside.sum() >= 8
            assert (case.organ_labels[inside] == ORGAN_LABELS[lesion.organ]).all()
            organ = centroid(case.organ_labels == ORGAN_LABELS[lesion.organ])
            z = centroid(inside)[0]
            if lesion.organ.endswith("kidney") and lesion.sublocation != "interpolar region":
                assert (z > organ[0]) == (lesion.sublocation == "upper pole"), lesion
            if lesion.organ == "spleen":
                assert (z > organ[0] - 0.5) == (lesion.sublocation == "upper pole"), lesion
            checked += 1
    assert checked > 20


def test_lesion_hu_matches_kind():
    for s in range(40):
        case = make_case("x", s, CI.raw_shape, CI.raw_spacing)
        for lesion in case.findings.lesions:
            hu = float(np.median(case.hu[case.lesion_labels == lesion.lesion_id]))
            if lesion.kind == "cyst":
                assert -25 < hu < 50 and lesion.hu < 20
            elif lesion.kind in ("calcification", "stone"):
                assert lesion.hu > 300 and hu > 150


def test_phase_changes_enhancement_but_not_anatomy():
    plain = make_case("x", 3, CI.raw_shape, CI.raw_spacing, phase="non-contrast")
    arterial = make_case("x", 3, CI.raw_shape, CI.raw_spacing, phase="arterial")
    delayed = make_case("x", 3, CI.raw_shape, CI.raw_spacing, phase="delayed")
    np.testing.assert_array_equal(plain.organ_labels, arterial.organ_labels)
    aorta = plain.organ_labels == ORGAN_LABELS["aorta"]
    assert np.median(arterial.hu[aorta]) > np.median(plain.hu[aorta]) + 150
    kidney = plain.organ_labels == ORGAN_LABELS["right kidney"]
    assert np.median(delayed.hu[kidney]) > np.median(plain.hu[kidney]) + 50
    assert arterial.findings.phase == "arterial" and plain.findings.phase == "non-contrast"
    with pytest.raises(ValueError, match="unknown phase"):
        make_case("x", 3, CI.raw_shape, CI.raw_spacing, phase="venous")


def test_reslice_puts_the_plane_normal_first():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (z, y, x)
    assert reslice(volume, "axial") is volume
    coronal, sagittal = reslice(volume, "coronal"), reslice(volume, "sagittal")
    assert coronal.shape == (5, 4, 6) and sagittal.shape == (6, 4, 5)
    # superior (last z) is row 0
    assert coronal[2, 0, 3] == volume[3, 2, 3] and coronal[2, 3, 1] == volume[0, 2, 1]
    assert sagittal[1, 0, 4] == volume[3, 4, 1]
    with pytest.raises(ValueError, match="unknown plane"):
        reslice(volume, "oblique")


def test_series_name():
    f = Findings("c", "portal venous", "axial", "soft tissue", (), ())
    assert series_name(f) == "Axial_portal_venous_soft_tissue_window"
    f = Findings("c", "non-contrast", "coronal", "bone", (), ())
    assert series_name(f) == "Coronal_non_contrast_bone_window"


def test_smooth_noise_is_standardised_and_smooth():
    rng = np.random.default_rng(0)
    noise = phantom.smooth_noise(rng, (40, 96, 96), (5.0, 4.0, 4.0), 30.0)
    assert noise.shape == (40, 96, 96) and noise.dtype == np.float32
    assert abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3
    neighbour = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert neighbour > 0.9


def test_make_case_rejects_bad_grids():
    with pytest.raises(ValueError, match="raw_shape"):
        make_case("x", 0, (40, 96), CI.raw_spacing)
    with pytest.raises(ValueError, match="raw_spacing"):
        make_case("x", 0, CI.raw_shape, (5.0, 0.0, 4.0))


# --------------------------------------------------------------------------------------------
# The dataset writer (layout and validation are tested in test_formats.py).
def test_split_by_index():
    splits = [split_of(i, 20) for i in range(20)]
    assert splits.count("train") == 16 and splits.count("validation") == 2 and splits.count("test") == 2
    assert [split_of(i, 3) for i in range(3)] == ["train", "validation", "test"]
    assert split_of(0, 1) == "train"
    assert case_seed(0, 5) == case_seed(0, 5) != case_seed(1, 5)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writer_is_byte_identical_and_case_i_does_not_depend_on_count(tmp_path):
    first = write_phantom_dataset(tmp_path / "a", 4, progress=False)
    files = [
        "M3D_Cap/M3D_Cap.json",
        "M3D_VQA/M3D_VQA_train.csv",
        "M3D_RefSeg/M3D_RefSeg_all.csv",
        "M3D_Seg/phantom/phantom.json",
        "M3D_Seg/phantom/phantom_00001/image.npy",
        "M3D_Seg/phantom/phantom_00001/masks/mask_0.npy",
    ]
    before = {f: _digest(tmp_path / "a" / f) for f in files}
    again = write_phantom_dataset(tmp_path / "a", 4, progress=False)  # same folder: replaced
    assert {f: _digest(tmp_path / "a" / f) for f in files} == before
    assert first.counts == again.counts and first.counts["cap_test"] == 1
    write_phantom_dataset(tmp_path / "b", 2, progress=False)
    case_file = "M3D_Seg/phantom/phantom_00001/image.npy"
    assert _digest(tmp_path / "b" / case_file) == before[case_file]
    info = json.loads((tmp_path / "a" / "dataset_info.json").read_text())
    assert info["phantom"]["num_volumes"] == 4 and info["phantom"]["image_shape"] == [32, 64, 64]


def test_writer_refuses_a_folder_with_other_content(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_phantom_dataset(tmp_path, 1, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_ensure_reuses_a_complete_dataset_and_rewrites_an_interrupted_one(tmp_path):
    import json

    from m3d_lite.data.phantom_dataset import ensure_phantom_dataset

    root = ensure_phantom_dataset(tmp_path / "p", num_volumes=3, scale="ci", seed=1, progress=False)
    report = root / "M3D_Cap" / "ct_case" / "phantom_00000" / "text.txt"
    stamp = report.stat().st_mtime_ns
    ensure_phantom_dataset(root, num_volumes=3, scale="ci", seed=1, progress=False)
    assert report.stat().st_mtime_ns == stamp  # reused, not rewritten

    info_path = root / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["phantom"]["complete"] = False  # as an interrupted write leaves it
    info_path.write_text(json.dumps(info))
    ensure_phantom_dataset(root, num_volumes=3, scale="ci", seed=1, progress=False)
    assert json.loads(info_path.read_text())["phantom"]["complete"] is True
    assert report.stat().st_mtime_ns != stamp
