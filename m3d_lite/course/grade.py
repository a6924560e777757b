"""Grade a class: run every student's notebooks in a sandbox and write one gradebook row per exercise.

`m3d-lite course grade SUBMISSIONS/ --out gradebook.csv` finds `NN_*.py` or `NN_*.ipynb` in each student's
folder and executes it with papermill at `SCALE=ci`, `STRICT_CHECKS=True`, in a process of its own that
is killed, kernel and all, when the notebook runs past its time-out. The kernel runs in a per-student
sandbox (`<out stem>_runs/.sandbox/<student>-<random>/`: the notebook copy, `HOME`, `TMPDIR`, `DATA_DIR`,
`OUTPUT_DIR`), keeps at most `max_output_bytes` of output, and gets a random token in `$M3D_LITE_GRADING`:
with it the checks run their hidden cases, record every exercise instead of stopping at the first failed
one, and stamp their `M3D_CHECK` lines so that lines a student prints by hand do not count.

The exercises of a notebook, with their weights, are read from the solution master
(`solutions/NN_*.py`), so an exercise that never ran still gets its row: error, timed out, not attempted
or missing, with the reason. Points and weights come from the solutions, never from the submission.
The executed notebooks are kept under `<out stem>_runs/<student>/` for review; the gradebook is written
at the end, atomically, from the grader's memory. What this does and does not isolate: docs/INSTRUCTORS.md.
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import psutil

from m3d_lite.course.checks import GRADING_ENV, PREFIX, CheckResult, parse_check_lines
from m3d_lite.course.make_student import PATTERN, make_student_source
from m3d_lite.io import save_csv

COLUMNS = ("student", "notebook", "exercise", "status", "points", "max_points", "message")
CHECK_CALLS = ("check_function", "check_value")
MESSAGE_LIMIT = 300
RESULT_PREFIX = "M3D_GRADE_RESULT"
WORKER = "import sys; from m3d_lite.course.grade import _worker; _worker(sys.argv[1])"
_RUNNING: dict[int, tuple[subprocess.Popen, str]] = {}  # runner processes in progress and their tokens
_STOP = threading.Event()  # set on Ctrl-C: start no more notebooks


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One check of a solution notebook: its name and its weight (the points it is worth)."""

    name: str
    weight: float


@dataclasses.dataclass
class GradeRow:
    """One gradebook row: how one student did on one exercise."""

    student: str
    notebook: str
    exercise: str
    status: str  # passed | failed | not attempted | error | timed out | missing
    points: float
    max_points: float
    message: str


@dataclasses.dataclass
class _Outcome:
    """How one notebook run ended, and the check results it printed."""

    status: str  # ok | error | timed out | missing
    message: str
    seconds: float
    results: dict[str, CheckResult] = dataclasses.field(default_factory=dict)
    edited_checks: set[str] = dataclasses.field(default_factory=set)  # reported only from edited cells


def _check_calls(source: str, where: str) -> list[Exercise]:
    """The `check_function`/`check_value` calls of `source`, in order; names and weights must be literals."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if func not in CHECK_CALLS:
            continue
        name = node.args[0] if node.args else None
        weight = next((k.value for k in node.keywords if k.arg == "weight"), ast.Constant(1.0))
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
            raise ValueError(f"{where}, line {node.lineno}: the name of {func} must be a string literal")
        if not (isinstance(weight, ast.Constant) and isinstance(weight.value, int | float)):
            raise ValueError(f"{where}, line {node.lineno}: the weight of {name.value!r} must be a number")
        calls.append((node.lineno, Exercise(name.value, float(weight.value))))
    return [exercise for _, exercise in sorted(calls, key=lambda call: call[0])]


def exercises(solution: Path) -> list[Exercise]:
    """The exercises of a solution notebook: every check call, in order, each name once."""
    first: dict[str, Exercise] = {}
    for exercise in _check_calls(Path(solution).read_text(encoding="utf-8"), str(solution)):
        first.setdefault(exercise.name, exercise)
    return list(first.values())


def find_submission(student_dir: Path, stem: str) -> Path | None:
    """The student's file for notebook `stem`: `NN_*.py` or `NN_*.ipynb` anywhere in their folder (hidden
    folders such as `.ipynb_checkpoints` excluded), the most recently modified when there are several."""
    prefix = stem.split("_", 1)[0] + "_"
    candidates = [
        path
        for path in Path(student_dir).rglob(f"{prefix}*")
        if path.suffix in (".py", ".ipynb")
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(student_dir).parts)
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def _normalised(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def check_cells(solution: Path) -> set[str]:
    """The check cells of the released (student) notebook of `solution`, whitespace-normalised: a check
    that reports from any other cell ran from code the student wrote or edited."""
    released = make_student_source(Path(solution).read_text(encoding="utf-8"), Path(solution).name)
    cells = jupytext.reads(released, fmt="py:percent").cells
    calls = tuple(f"{call}(" for call in CHECK_CALLS)
    return {
        _normalised(c.source) for c in cells if c.cell_type == "code" and any(x in c.source for x in calls)
    }


def _kill_run(proc: subprocess.Popen, token: str) -> None:
    """Kill the runner process, its kernel and everything they started: the runner's process tree and
    any process whose environment carries this run's token (a kernel or daemon that left the tree)."""
    victims = []
    try:
        root = psutil.Process(proc.pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if process.environ().get(GRADING_ENV) == token:
                victims.append(process)
        except psutil.Error:
            continue
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(victims, timeout=10)
    proc.wait()


def _cap_outputs(max_bytes: int) -> None:
    """Keep at most `max_bytes` of outputs in the notebook this process executes.

    Past the cap an output is dropped, except its `M3D_CHECK` lines, and one notice says so; error
    tracebacks are always kept. Patches papermill's client, so only for the runner process.
    """
    from papermill.clientwrap import PapermillNotebookClient

    original = PapermillNotebookClient.output
    kept, notice_given = 0, False

    def output(self, outs: list, msg: dict, display_id: str | None, cell_index: int) -> Any:
        nonlocal kept, notice_given
        out = original(self, outs, msg, display_id, cell_index)
        if out is None or out.output_type == "error":
            return out
        kept += len(json.dumps(out))
        if kept <= max_bytes:
            return out
        if outs and outs[-1] is out:
            outs.pop()
        if not notice_given:
            notice = f"[grader: output truncated, this notebook printed more than {max_bytes} bytes]\n"
            outs.append(nbformat.v4.new_output("stream", name="stderr", text=notice))
            notice_given = True
        lines = [line for line in out.get("text", "").splitlines(keepends=True) if line.startswith(PREFIX)]
        if lines:
            outs.append(nbformat.v4.new_output("stream", name="stdout", text="".join(lines)[:100_000]))
        return None

    PapermillNotebookClient.output = output


def _worker(spec_json: str) -> None:
    """Entry point of the runner process: execute one notebook and print its result line."""
    from m3d_lite.course.run import run_notebook

    spec = json.loads(spec_json)
    if sys.platform == "linux":  # die with the grader, even a SIGKILLed one (the kernel follows its parent)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != spec["grader"]:
            sys.exit("the grader exited before this run started")
    _cap_outputs(spec["max_output_bytes"])
    try:
        run = run_notebook(
            Path(spec["notebook"]),
            Path(spec["output"]),
            spec["parameters"],
            cwd=Path.cwd(),
            timeout=spec["timeout"],
            raise_on_error=False,
            allow_errors=True,
        )
        error = run.error
    except Exception as exc:  # e.g. a submission that is not a notebook
        error = f"{type(exc).__name__}: {exc}"
    print(RESULT_PREFIX, json.dumps({"error": error}), flush=True)


def _read_notebook(path: Path) -> nbformat.NotebookNode | None:
    """The executed notebook, or None when it is missing or half written (a run killed while saving)."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception:
        return None


def _first_error(nb: nbformat.NotebookNode | None) -> str | None:
    """'Exception: message (cell In [n])' for the first cell that raised, else None.

    papermill names the last failing cell; with `allow_errors` that is often a NameError the first
    error caused, so the gradebook names the first one.
    """
    for cell in nb.cells if nb else []:
        for output in cell.get("outputs", []):
            clean_exit = output.get("ename") == "SystemExit" and output.get("evalue") in ("", "0")
            if output.output_type == "error" and not clean_exit:
                return f"{output.ename}: {output.evalue} (cell In [{cell.execution_count}])"
    return None


def _running_cell(nb: nbformat.NotebookNode | None) -> str:
    """' in the cell starting "..."' for the cell papermill marked as running, else ''."""
    cells = [c for c in (nb.cells if nb else []) if c.get("metadata", {}).get("papermill", {}).get("status")]
    running = [c for c in cells if c.metadata.papermill.status == "running"]
    if not running:
        return ""
    first_line = next((line for line in running[0].source.splitlines() if line.strip()), "")
    return f' in the cell starting "{first_line.strip()[:60]}"'


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What one notebook run may use: wall-clock seconds, bytes of output, CPU threads."""

    timeout: float
    max_output_bytes: int
    threads: int


def _execute(notebook: Path, executed: Path, parameters: dict[str, Any], limits: _Limits, token: str) -> bool:
    """Run `notebook` (in its sandbox folder) to `executed` in a runner process; False if it timed out.

    The runner's output goes to `executed` with suffix `.log`, its last line the runner's result.
    """
    sandbox = notebook.parent
    env = {
        **os.environ,
        "HOME": str(sandbox / "home"),
        "TMPDIR": str(sandbox / "tmp"),
        "M3D_LITE_DATA_DIR": str(sandbox / "data"),
        GRADING_ENV: token,
    }
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # --jobs N kernels share the cores
        env.setdefault(var, str(limits.threads))
    spec = {
        "notebook": str(notebook),
        "output": str(executed),
        "parameters": parameters,
        "timeout": limits.timeout,
        "max_output_bytes": limits.max_output_bytes,
        "grader": os.getpid(),
    }
    executed.parent.mkdir(parents=True, exist_ok=True)
    with open(executed.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(spec)],
            cwd=sandbox,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _RUNNING[proc.pid] = (proc, token)
        try:
            proc.wait(timeout=limits.timeout)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        finally:
            _RUNNING.pop(proc.pid, None)
            _kill_run(proc, token)  # also after a normal end: background processes the notebook started
    return finished


def _runner_result(log: Path) -> dict | None:
    """The result line the runner printed last in `log`, or None (the runner was killed or crashed)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            tail = f.read().decode("utf-8", "replace")
    except OSError:  # deleted by the notebook
        return None
    lines = [line for line in tail.splitlines() if line.startswith(RESULT_PREFIX + " ")]
    try:
        return dict(json.loads(lines[-1].removeprefix(RESULT_PREFIX)))
    except (IndexError, ValueError, TypeError):  # no result line, or a mangled one
        return None


def _run_in_sandbox(
    submission: Path,
    sandbox: Path,
    executed: Path,
    parameters: dict[str, Any],
    check_sources: set[str],
    limits: _Limits,
) -> _Outcome:
    """Copy `submission` into `sandbox`, run it there, and read back how it ended and what it checked.

    Only check lines stamped with this run's token count; a check that reported from a cell other than
    its released check cell is marked as edited, for the instructor to review.
    """
    notebook = sandbox / submission.name
    shutil.copyfile(submission, notebook)
    for folder in ("home", "tmp", "data"):
        (sandbox / folder).mkdir(exist_ok=True)
    token = secrets.token_hex(16)
    start = time.perf_counter()
    finished = _execute(notebook, executed, parameters, limits, token)
    seconds = time.perf_counter() - start

    nb = _read_notebook(executed)
    released, edited = {}, {}  # results by name, from released check cells and from any other cell
    for cell in nb.cells if nb else []:
        text = "\n".join(output.get("text", "") for output in cell.get("outputs", []))
        for result in parse_check_lines(text, token):
            (released if _normalised(cell.source) in check_sources else edited)[result.name] = result
    log, result = executed.with_suffix(".log"), _runner_result(executed.with_suffix(".log"))
    if not finished:
        status, message = "timed out", f"ran past the {limits.timeout:g} s time-out{_running_cell(nb)}"
    elif result is None:
        status, message = "error", f"the runner stopped without a result, see {log}"
    elif result.get("error"):
        status, message = "error", _first_error(nb) or result["error"]
    else:
        status, message = "ok", ""
        log.unlink(missing_ok=True)
    if nb is None and status != "timed out":
        message = f"{message}; the executed notebook is missing or unreadable".lstrip("; ")
    return _Outcome(status, message, seconds, {**edited, **released}, set(edited) - set(released))


def _rows(student: str, stem: str, course: list[Exercise], outcome: _Outcome) -> list[GradeRow]:
    """One row per exercise of notebook `stem`, from the checks the run printed or, failing that, from
    how the run ended."""
    rows = []
    for exercise in course:
        result = outcome.results.get(exercise.name)
        if result is not None:
            status, message = result.status, result.message
        elif outcome.status in ("missing", "timed out"):
            status, message = outcome.status, outcome.message
        elif outcome.status == "error":
            status = "not attempted" if outcome.message.startswith("NotImplementedError") else "error"
            message = f"the check did not run: {outcome.message}"
        else:
            status, message = "not attempted", "the check never ran: was its check cell deleted?"
        if exercise.name in outcome.edited_checks:
            message = f"[check cell edited: review it] {message}"
        points = exercise.weight if status == "passed" else 0.0
        message = " ".join(message.split())[:MESSAGE_LIMIT]
        rows.append(GradeRow(student, stem, exercise.name, status, points, exercise.weight, message))
    return rows


def _grade_student(
    student_dir: Path,
    course: dict[str, tuple[list[Exercise], set[str]]],
    runs_dir: Path,
    parameters: dict[str, Any],
    limits: _Limits,
) -> list[GradeRow]:
    """Grade one student's notebooks in order, in one sandbox (a later notebook may read an earlier one's
    DATA_DIR), then delete the sandbox."""
    student = student_dir.name
    sandbox = runs_dir / ".sandbox" / f"{student}-{secrets.token_hex(4)}"
    sandbox.mkdir(parents=True)
    rows = []
    try:
        for stem, (course_exercises, check_sources) in course.items():
            if _STOP.is_set():
                break
            submission = find_submission(student_dir, stem)
            if submission is None:
                message = f"no {stem.split('_', 1)[0]}_*.py or .ipynb in {student_dir.name}/"
                outcome = _Outcome("missing", message, 0.0)
            else:
                notebook_parameters = {
                    "SCALE": "ci",
                    "STRICT_CHECKS": True,
                    "DATA_DIR": str(sandbox / "data"),
                    "OUTPUT_DIR": str(sandbox / "output" / stem),
                    **parameters,
                }
                executed = runs_dir / student / f"{stem}.ipynb"
                outcome = _run_in_sandbox(
                    submission, sandbox, executed, notebook_parameters, check_sources, limits
                )
            notebook_rows = _rows(student, stem, course_exercises, outcome)
            passed = sum(row.status == "passed" for row in notebook_rows)
            points = sum(row.points for row in notebook_rows)
            total = sum(row.max_points for row in notebook_rows)
            print(
                f"{student} {stem}: {passed}/{len(notebook_rows)} passed, {points:g}/{total:g} points, "
                f"{outcome.status} ({outcome.seconds:.1f} s)",
                flush=True,
            )
            rows += notebook_rows
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    return rows


def _map_students(work: Callable[[Path], list[GradeRow]], students: list[Path], jobs: int) -> list[GradeRow]:
    """`work` on every student, `jobs` at a time. On Ctrl-C or SIGTERM, kill the notebooks that are
    running (in sessions of their own, they do not get the terminal's signal) and start no more."""
    _STOP.clear()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        return [row for student_rows in pool.map(work, students) for row in student_rows]
    except KeyboardInterrupt:
        _STOP.set()
        for proc, token in list(_RUNNING.values()):
            _kill_run(proc, token)
        raise
    finally:
        pool.shutdown(cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def grade(
    submissions_dir: Path,
    out_csv: Path,
    notebooks: list[str] | None = None,
    timeout: float = 600,
    jobs: int = 1,
    parameters: dict[str, Any] | None = None,
    solutions_dir: Path = Path("solutions"),
    max_output_bytes: int = 5_000_000,
) -> list[GradeRow]:
    """Grade every student folder of `submissions_dir` against `solutions_dir`; write `out_csv`.

    `notebooks` selects by number or stem ("01", "01_data_preparation"; default: every solution).
    `timeout` is the wall-clock budget of one notebook, in seconds; `jobs` students run at a time;
    `parameters` override the papermill defaults (SCALE=ci, STRICT_CHECKS=True, DATA_DIR, OUTPUT_DIR).
    Executed notebooks go to `<out_csv stem>_runs/<student>/`, with a `.log` beside any that did not
    end cleanly. Returns the rows written, sorted by student, notebook and exercise order.
    """
    submissions_dir, out_csv, solutions_dir = Path(submissions_dir), Path(out_csv), Path(solutions_dir)
    solutions = sorted(solutions_dir.glob(PATTERN))
    if notebooks:
        wanted = [s for s in solutions if any(s.stem == n or s.stem.split("_", 1)[0] == n for n in notebooks)]
        if len(wanted) < len(set(notebooks)):
            names = [s.stem for s in solutions]
            raise ValueError(f"--notebooks {' '.join(notebooks)}: no such solution; there are {names}")
        solutions = wanted
    if not solutions:
        raise FileNotFoundError(f"no solution notebook matches {solutions_dir.resolve() / PATTERN}")
    course = {s.stem: (exercises(s), check_cells(s)) for s in solutions}
    students = sorted(p for p in submissions_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not students:
        raise FileNotFoundError(f"no student folder in {submissions_dir.resolve()}")
    runs_dir = (out_csv.parent / f"{out_csv.stem}_runs").resolve()
    limits = _Limits(timeout, max_output_bytes, threads=max(1, (os.cpu_count() or 1) // jobs))
    print(f"grading {len(students)} students x {len(course)} notebooks, {jobs} at a time; runs in {runs_dir}")

    def grade_one(student_dir: Path) -> list[GradeRow]:
        return _grade_student(student_dir, course, runs_dir, parameters or {}, limits)

    rows = _map_students(grade_one, students, jobs)
    shutil.rmtree(runs_dir / ".sandbox", ignore_errors=True)  # and whatever a notebook left beside its own
    save_csv(out_csv, [dataclasses.asdict(row) for row in rows], COLUMNS)
    return rows


def totals(rows: list[GradeRow]) -> str:
    """A short table of points per student, for the end of a grading run."""
    students = list(dict.fromkeys(row.student for row in rows))
    width = max([len(s) for s in students] + [7])
    lines = [f"{'student':<{width}}  {'points':>8}  {'of':>6}  passed"]
    for student in students:
        mine = [row for row in rows if row.student == student]
        points, total = sum(r.points for r in mine), sum(r.max_points for r in mine)
        passed = sum(r.status == "passed" for r in mine)
        lines.append(f"{student:<{width}}  {points:8g}  {total:6g}  {passed}/{len(mine)}")
    return "\n".join(lines)
