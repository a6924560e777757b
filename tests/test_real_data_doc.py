"""docs/REAL_DATA.md's worked example runs as written: its ``<!-- tested -->`` shell blocks, pasted into bash.

The blocks run from the repository root (they call ``data_scripts/``) with the venv's ``bin`` first on
PATH, ``WORK`` set to a temporary folder and ``MODEL`` to a tiny random ci LaMed built here (the doc's
default is a trained run, which a test cannot afford). Every file the doc says the example writes must be
there, so the page cannot drift from the code.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3d_lite.models import build_lamed, save_lamed

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "REAL_DATA.md"
MARKED_BLOCK = re.compile(r"<!-- tested -->\s*```bash\n(.*?)```", re.DOTALL)
COMMANDS = (
    "m3d-lite data phantom",
    "prepare_own_scans.py",
    "prepare_m3d_refseg.py",
    "m3d-lite data validate",
)


def marked_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks that follow a ``<!-- tested -->`` line, in order."""
    return MARKED_BLOCK.findall(text)


def test_only_marked_blocks_are_extracted():
    text = "```bash\necho no\n```\n<!-- tested -->\n```bash\necho yes\n```\n```text\nyes\n```\n"
    assert marked_blocks(text) == ["echo yes\n"]


def test_the_worked_example_is_marked_for_testing():
    script = "\n".join(marked_blocks(DOC.read_text(encoding="utf-8")))
    assert script, f"{DOC}: no ```bash block after a <!-- tested --> line"
    for command in (*COMMANDS, "m3d-lite infer"):
        assert command in script, f"the tested example of {DOC.name} no longer runs {command!r}"


@pytest.mark.slow  # five CLI calls, each importing torch and MONAI: ~40 s on 2 idle cores
def test_worked_example_runs_and_writes_what_the_doc_says(tmp_path, monkeypatch):
    monkeypatch.setenv("M3D_LITE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model, tokenizer = build_lamed("ci", llm="tiny-llama")
    save_lamed(model, tokenizer, tmp_path / "model")
    work = tmp_path / "work"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "WORK": str(work),
        "MODEL": str(tmp_path / "model"),
    }
    script = "\n".join(marked_blocks(DOC.read_text(encoding="utf-8")))
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, f"the worked example failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "image-report pairs in M3D_Cap.json train: 2" in run.stdout
    valid = f"{work}/mine: OK"  # what m3d-lite data validate prints last on a valid root
    assert valid in run.stdout, (
        f"m3d-lite data validate did not pass:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    )
    assert run.stdout.split(valid, 1)[1].strip(), "m3d-lite infer printed no answer"

    mine = work / "mine"
    cases = ("patient_a", "patient_b")
    expected = [
        mine / "own_scans.json",
        *(mine / "previews" / f"{case}.png" for case in cases),
        *(mine / "M3D_Cap" / "ct_case" / case / "Axial_soft_tissue_window.npy" for case in cases),
        *(mine / "M3D_RefSeg" / case / name for case in cases for name in ("ct.npy", "mask.npy")),
        *(mine / "M3D_RefSeg" / f"M3D_RefSeg_{split}.csv" for split in ("all", "train", "test")),
    ]
    missing = [str(path.relative_to(work)) for path in expected if not path.is_file()]
    assert not missing, f"the worked example did not write {missing}"
    pairs = json.loads((mine / "M3D_Cap" / "M3D_Cap.json").read_text())["train"]
    assert pairs == [
        {"image": f"ct_case/{case}/Axial_soft_tissue_window.npy", "text": f"ct_case/{case}/text.txt"}
        for case in cases
    ]
    report = (mine / "M3D_Cap" / "ct_case" / "patient_b" / "text.txt").read_text()
    assert report == "Non-contrast CT of the abdomen. No focal lesion."
