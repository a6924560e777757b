"""The ``m3d-lite`` command end to end, through its real console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from m3d_lite.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "phantom"
    args = ["data", "phantom", "--out", str(root), "--num-volumes", "4", "--scale", "ci", "--seed", "3"]
    assert main(args) == 0
    return root


def test_console_script_is_installed_and_lists_its_groups():
    out = subprocess.run(
        [Path(sys.executable).parent / "m3d-lite", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "data" in out and "course" in out and "export" in out


def test_phantom_then_validate_passes(phantom_root, capsys):
    assert (phantom_root / "M3D_Cap" / "M3D_Cap.json").is_file()
    assert main(["data", "validate", str(phantom_root)]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_exits_non_zero_and_names_the_broken_file(phantom_root, tmp_path, capsys):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(phantom_root), str(broken)], check=True)
    volume = next((broken / "M3D_Cap" / "ct_case").rglob("*.npy"))
    np.save(volume, np.full((1, 4, 4, 4), np.nan, dtype=np.float32))
    assert main(["data", "validate", str(broken)]) == 1
    err = capsys.readouterr().err
    assert volume.name in err and "NaN" in err


def test_prepare_writes_npy_and_preview_at_the_requested_shape(tmp_path):
    hu = np.full((20, 40, 40), -1000, dtype=np.int16)
    hu[4:16, 8:32, 8:32] = 40
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), scan)
    assert (
        main(
            [
                "data",
                "prepare",
                str(scan),
                "--out",
                str(tmp_path / "out"),
                "--shape",
                "8",
                "16",
                "16",
                "--window",
                "-160",
                "240",
            ]
        )
        == 0
    )
    prepared = np.load(tmp_path / "out" / "scan.npy")
    assert prepared.shape == (1, 8, 16, 16) and prepared.dtype == np.float32
    assert 0.0 <= prepared.min() and prepared.max() <= 1.0
    assert (tmp_path / "out" / "scan.png").stat().st_size > 0


def test_prepare_refuses_an_unreadable_file_with_its_name(tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    assert main(["data", "prepare", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "bad.nii.gz" in capsys.readouterr().err


def test_unknown_window_name_is_refused_before_any_work(capsys):
    assert main(["data", "prepare", "missing.nii.gz", "--out", "o", "--window", "brain"]) == 2
    assert "unknown window 'brain'" in capsys.readouterr().err


def test_make_student_check_passes_on_the_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["course", "make-student", "--check"]) == 0


def test_course_run_injects_parameters(tmp_path):
    notebook = tmp_path / "nb.py"
    notebook.write_text(
        '# %% tags=["parameters"]\nOUTPUT_DIR = "x"\n\n# %%\nfrom pathlib import Path\n'
        'Path(OUTPUT_DIR).mkdir(parents=True)\n(Path(OUTPUT_DIR) / "done").write_text("yes")\n'
    )
    out_dir = tmp_path / "made"
    assert (
        main(
            [
                "course",
                "run",
                str(notebook),
                "--out",
                str(tmp_path / "nb.ipynb"),
                "-p",
                "OUTPUT_DIR",
                str(out_dir),
            ]
        )
        == 0
    )
    assert (out_dir / "done").read_text() == "yes"


def test_train_clip_then_bench_retrieval(phantom_root, tmp_path, capsys):
    import json

    run = tmp_path / "clip"
    args = [
        "train",
        "clip",
        "--scale",
        "ci",
        "--data",
        str(phantom_root),
        "--out",
        str(run),
        "--max-steps",
        "2",
        "--set",
        "batch_size=2",
    ]
    assert main(args) == 0
    assert (run / "model" / "config.json").is_file() and (run / "vision_encoder").is_dir()
    assert (
        main(["bench", "--model", str(run), "--data", str(phantom_root), "--out", str(tmp_path / "bench")])
        == 0
    )
    results = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert set(results["tasks"]["retrieval"]["pool_100"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert "rec" in results["skipped"]  # a CLIP run as --model: only retrieval runs under the default "all"
    printed = capsys.readouterr().out
    assert "| retrieval | R@1 IR (pool" in printed and "report.html" in printed
    assert (
        main(
            [
                "bench",
                "--model",
                str(run),
                "--data",
                str(phantom_root),
                "--out",
                str(tmp_path / "b2"),
                "--tasks",
                "retrieval",
                "nonsense",
            ]
        )
        == 2
    )
    assert "nonsense" in capsys.readouterr().err
