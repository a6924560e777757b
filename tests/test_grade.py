"""Grading a synthetic class on a two-exercise course: every kind of student gets the right gradebook rows.

The course is a tiny solution notebook written here (a few seconds a run), so the test exercises the
grader, not the phantom. Students: solved, untouched, wrong (fails a hidden case too), raises, loops
forever, one that vandalises files outside its folder and forges check lines, one that prints megabytes,
and one whose folder holds no notebook.
"""

import csv
import hashlib
import json
import textwrap
import time

import nbformat
import pytest

from m3d_lite.cli import main
from m3d_lite.course.checks import GRADING_ENV, CheckFailed, check_function, parse_check_lines
from m3d_lite.course.grade import COLUMNS, Exercise, exercises, find_submission, grade
from m3d_lite.course.make_student import make_student_source

SOLUTION = textwrap.dedent("""\
    # %% tags=["parameters"]
    STRICT_CHECKS = False

    # %%
    from m3d_lite.course.checks import check_function, check_value

    def reference_double(x):
        return 2 * x

    # %%
    def double(x):
        ### BEGIN SOLUTION
        return 2 * x
        ### END SOLUTION

    # %%
    double = check_function(
        "01.double", double, reference_double, cases=[(1,), (2.5,)], hidden_cases=[(-3,)],
        strict=STRICT_CHECKS, weight=2,
    )

    # %%
    def mean(values):
        ### BEGIN SOLUTION
        return sum(values) / len(values)
        ### END SOLUTION

    # %%
    check_value("01.mean", mean([1, 4, 9]), 14 / 3, strict=STRICT_CHECKS)
    """)
STUDENT = make_student_source(SOLUTION, "01_tiny.py")
STUB = '    raise NotImplementedError("exercise: replace this line with your code")'
SOLVED = STUDENT.replace(STUB, "    return 2 * x", 1).replace(STUB, "    return sum(values) / len(values)", 1)
FORGED = 'M3D_CHECK {"name": "01.double", "status": "passed", "message": "forged", "weight": 2.0}'

STUDENTS = {
    "solved": SOLVED,
    "untouched": STUDENT,
    # right on the visible cases only, and a wrong mean
    "wrong": STUDENT.replace(STUB, "    return x + abs(x)", 1).replace(STUB, "    return sum(values)", 1),
    # a crash before `def double`: exercise 1 has no function to check, exercise 2 still runs
    "raises": SOLVED.replace("# %%\ndef double", "# %%\nraise RuntimeError('my bad')\ndef double"),
    "loops": SOLVED.replace("# %%\ndef mean", "# %%\nwhile True:\n    pass\n\n# %%\ndef mean"),
    # untouched exercises, a forged check line, an edited check cell, and writes outside its folder
    "vandal": STUDENT
    + textwrap.dedent(f"""
        # %%
        import shutil
        from pathlib import Path
        print({FORGED!r})
        check_value("01.mean", 1, 1)
        for up in range(1, 4):
            (Path("../" * up) / "gradebook.csv").write_text("student,hacked")
        shutil.rmtree("../solved", ignore_errors=True)  # a sibling's folder, if it were named so
        shutil.rmtree(Path.home(), ignore_errors=True)
        """).replace('check_value("01.mean", mean([1, 4, 9]), 14 / 3, strict=STRICT_CHECKS)\n', ""),
    "loud": SOLVED.replace(
        "# %%\ndef mean", "# %%\nfor _ in range(3000):\n    print('x' * 999)\n\n# %%\ndef mean"
    ),
}


def by_key(rows):
    return {(row.student, row.exercise): (row.status, row.points, row.message) for row in rows}


def double_visible_only(x):
    return x + abs(x)  # right for the visible cases (x > 0), wrong for negative x


def test_hidden_cases_and_no_raising_only_in_graded_runs(monkeypatch, capsys):
    with pytest.raises(CheckFailed):  # a student's run: strict raises on the first failure ...
        check_function("neg", double_visible_only, lambda x: 2 * x, [(-1,)], strict=True)
    # ... and hidden cases do not run
    assert check_function(
        "vis", double_visible_only, lambda x: 2 * x, [(1,)], hidden_cases=[(-3,)], strict=True
    )
    assert "token" not in capsys.readouterr().out

    monkeypatch.setenv(GRADING_ENV, "secret")
    with pytest.warns(UserWarning, match="using the reference"):  # graded: recorded, never raised
        check_function("vis", double_visible_only, lambda x: 2 * x, [(1,)], hidden_cases=[(-3,)], strict=True)
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("M3D_CHECK")]
    assert json.loads(line.split(" ", 1)[1])["token"] == "secret"
    (result,) = parse_check_lines(out, token="secret")
    assert result.status == "failed" and result.message.startswith("hidden case double_visible_only(-3)")

    forged = 'M3D_CHECK {"name": "vis", "status": "passed", "message": "", "weight": 1.0}\nM3D_CHECK {oops}\n'
    assert parse_check_lines(forged + out, token="secret") == [result]  # unstamped and broken lines skipped
    assert len(parse_check_lines(forged + out)) == 2  # without a token every well-formed line counts


def test_exercises_are_read_from_the_solution_with_their_weights(tmp_path):
    (tmp_path / "01_tiny.py").write_text(SOLUTION)
    assert exercises(tmp_path / "01_tiny.py") == [Exercise("01.double", 2.0), Exercise("01.mean", 1.0)]
    (tmp_path / "02_bad.py").write_text("name = 'x'\ncheck_value(name, 1, 1)\n")
    with pytest.raises(ValueError, match="02_bad.py, line 2: the name of check_value must be a string"):
        exercises(tmp_path / "02_bad.py")


def test_find_submission_takes_the_newest_and_skips_checkpoints(tmp_path):
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "01_tiny-checkpoint.ipynb").write_text("{}")
    (tmp_path / "nested").mkdir()
    old, new = tmp_path / "01_tiny.py", tmp_path / "nested" / "01_tiny (1).ipynb"
    old.write_text("")
    new.write_text("")
    old.touch()
    time.sleep(0.01)
    new.touch()
    assert find_submission(tmp_path, "01_tiny") == new
    assert find_submission(tmp_path, "02_other") is None


@pytest.mark.slow
def test_grade_a_synthetic_class(tmp_path):
    solutions, submissions = tmp_path / "solutions", tmp_path / "submissions"
    solutions.mkdir()
    (solutions / "01_tiny.py").write_text(SOLUTION)
    for student, text in STUDENTS.items():
        (submissions / student).mkdir(parents=True)
        (submissions / student / "01_tiny.py").write_text(text)
    (submissions / "absent").mkdir()
    (submissions / "absent" / "notes.txt").write_text("forgot to upload")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in submissions.rglob("*") if p.is_file()}
    out = tmp_path / "gradebook.csv"

    start = time.perf_counter()
    rows = grade(submissions, out, timeout=20, jobs=2, solutions_dir=solutions, max_output_bytes=200_000)
    seconds = time.perf_counter() - start

    got = by_key(rows)
    statuses = {key: value[0] for key, value in got.items()}
    assert statuses == {
        ("absent", "01.double"): "missing",
        ("absent", "01.mean"): "missing",
        ("loops", "01.double"): "passed",
        ("loops", "01.mean"): "timed out",
        ("loud", "01.double"): "passed",
        ("loud", "01.mean"): "passed",
        ("raises", "01.double"): "error",
        ("raises", "01.mean"): "passed",
        ("solved", "01.double"): "passed",
        ("solved", "01.mean"): "passed",
        ("untouched", "01.double"): "not attempted",
        ("untouched", "01.mean"): "not attempted",  # the stub raises in the check_value cell
        ("vandal", "01.double"): "not attempted",  # its forged line does not count
        ("vandal", "01.mean"): "passed",  # its own check_value(...) passes, but the edit is flagged
        ("wrong", "01.double"): "failed",
        ("wrong", "01.mean"): "failed",
    }
    assert [got["solved", e][1] for e in ("01.double", "01.mean")] == [2.0, 1.0]
    assert got["wrong", "01.double"][2].startswith("hidden case double(-3): expected -6, got 0")
    assert got["raises", "01.double"][2] == "the check did not run: RuntimeError: my bad (cell In [5])"
    assert got["loops", "01.mean"][2] == 'ran past the 20 s time-out in the cell starting "while True:"'
    assert got["vandal", "01.mean"][2].startswith("[check cell edited: review it]")
    assert "edited" not in got["solved", "01.mean"][2]
    assert got["absent", "01.double"][2] == "no 01_*.py or .ipynb in absent/"

    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows) == 16  # the vandal's write was undone
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before  # submissions intact
    runs = tmp_path / "gradebook_runs"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == sorted(STUDENTS)  # no sandbox left
    assert all((runs / student / "01_tiny.ipynb").is_file() for student in STUDENTS)
    assert (runs / "loops" / "01_tiny.log").is_file() and not (runs / "solved" / "01_tiny.log").exists()
    assert (runs / "loud" / "01_tiny.ipynb").stat().st_size < 400_000  # 3 MB printed, 200 kB kept
    loud = nbformat.read(runs / "loud" / "01_tiny.ipynb", as_version=4)
    assert "[grader: output truncated" in str(loud)
    assert seconds < 80, f"grading took {seconds:.0f} s"


def test_cli_grade_writes_the_gradebook_and_names_unknown_notebooks(tmp_path, capsys):
    solutions, submissions, out = tmp_path / "solutions", tmp_path / "submissions", tmp_path / "book.csv"
    solutions.mkdir()
    (solutions / "01_tiny.py").write_text(SOLUTION)
    (submissions / "absent").mkdir(parents=True)
    args = ["course", "grade", str(submissions), "--out", str(out), "--solutions", str(solutions)]

    assert main([*args, "--notebooks", "01", "--jobs", "2"]) == 0
    with open(out, newline="") as f:
        assert [(r["exercise"], r["status"], r["max_points"]) for r in csv.DictReader(f)] == [
            ("01.double", "missing", "2.0"),
            ("01.mean", "missing", "1.0"),
        ]
    assert "absent" in capsys.readouterr().out
    assert main([*args, "--notebooks", "07"]) == 2
    assert "--notebooks 07: no such solution" in capsys.readouterr().err
