"""Every course notebook runs end to end at the ci scale: solutions pass every check, student copies finish.

The notebooks are the course, so they are tested like code: each solution runs with strict checks (a
wrong reference or a wrong solution fails here), and each student copy, whose stubs raise
NotImplementedError, must still reach its last cell on the reference implementations.
"""

from pathlib import Path

import nbformat
import pytest

from m3d_lite.course.checks import CheckResult, parse_check_lines
from m3d_lite.course.make_student import make_student
from m3d_lite.course.run import run_notebook

REPO = Path(__file__).resolve().parents[1]
PATTERN = "[0-9][0-9]_*.py"
NOTEBOOKS = sorted(REPO.glob(f"solutions/{PATTERN}")) + sorted(REPO.glob(f"notebooks/{PATTERN}"))


def executed_checks(executed: Path) -> list[CheckResult]:
    """The `M3D_CHECK` results printed in an executed notebook's stream outputs."""
    nb = nbformat.read(executed, as_version=4)
    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    return parse_check_lines("".join(o.text for o in outputs if o.output_type == "stream"))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[str(p.relative_to(REPO)) for p in NOTEBOOKS])
def test_notebook_runs_at_ci_scale(notebook: Path, tmp_path: Path):
    is_solution = notebook.parent.name == "solutions"
    parameters = {
        "SCALE": "ci",
        "STRICT_CHECKS": is_solution,
        "OUTPUT_DIR": str(tmp_path / "output"),
        "DATA_DIR": str(tmp_path / "data"),
    }
    run = run_notebook(notebook, tmp_path / f"{notebook.stem}.ipynb", parameters, timeout=300)
    assert run.error is None

    checks = executed_checks(run.output)
    if is_solution:
        assert checks, f"{notebook.name} prints no M3D_CHECK line: every exercise needs a check"
        assert [c for c in checks if c.status != "passed"] == []
    else:
        assert any(c.status == "not attempted" for c in checks), f"{notebook.name}: no stub reached a check"


def test_student_notebooks_are_in_sync_with_solutions():
    stale = make_student(REPO / "solutions", REPO / "notebooks", check=True)
    assert stale == [], "notebooks/ is out of date: run `m3d-lite course make-student`"
