"""Atomic writes: whole files or none, with ordinary permissions."""

import os

import numpy as np
import pytest

from m3d_lite.io import atomic_path, save_json, save_npy


def test_failed_write_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "volume.npy"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_written_files_round_trip_with_umask_permissions(tmp_path):
    array = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    np.testing.assert_array_equal(np.load(save_npy(tmp_path / "a.npy", array)), array)
    path = save_json(tmp_path / "sub" / "b.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_dir_replaces_or_keeps_the_first_complete_folder(tmp_path):
    from m3d_lite.io import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as folder:
        (folder / "weights").write_text("v1")
    with atomic_dir(target, replace=False) as folder:  # a racing process finishing second
        (folder / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as folder:
        (folder / "weights").write_text("v3")
    assert (target / "weights").read_text() == "v3"
    with pytest.raises(RuntimeError), atomic_dir(target) as folder:
        (folder / "weights").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left
