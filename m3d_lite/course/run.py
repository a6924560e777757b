"""Execute course notebooks (jupytext `.py` or `.ipynb`) with papermill and time them.

papermill injects the parameters (`SCALE`, `OUTPUT_DIR`, `STRICT_CHECKS`, ...) after the cell tagged
`parameters` and saves the executed notebook, outputs and all, after every cell; its command line cannot
read jupytext files, so this module converts them with jupytext and calls papermill from Python.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jupytext
import nbformat
import papermill
from papermill.exceptions import PapermillExecutionError

from m3d_lite.io import save_text


@dataclass
class NotebookRun:
    """One executed notebook: where it came from, where the executed copy is, how long it took."""

    source: Path
    output: Path
    seconds: float
    error: str | None  # None on success, else "ExceptionClass: message"
    reused: bool = False  # True: finished in an earlier run_all, not run again


def parse_parameter(value: str) -> Any:
    """Turn a command-line parameter into a Python value the way papermill's `-p` does.

    "12" -> 12, "0.5" -> 0.5, "True"/"true" -> True, "False"/"false" -> False, "None"/"null" -> None;
    anything else stays a string.
    """
    constants = {"True": True, "true": True, "False": False, "false": False, "None": None, "null": None}
    if value in constants:
        return constants[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _describe(exc: Exception) -> str:
    """One line for a gradebook or a summary table: the exception, and for notebook errors the cell."""
    if isinstance(exc, PapermillExecutionError):
        return f"PapermillExecutionError: {exc.ename}: {exc.evalue} (cell In [{exc.exec_count}])"
    first_line = str(exc).strip().split("\n", 1)[0]  # e.g. nbclient's CellTimeoutError: "A cell timed out..."
    return f"{type(exc).__name__}: {first_line}"


def run_notebook(
    notebook: Path,
    output: Path,
    parameters: dict[str, Any] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    kernel_name: str = "python3",
    raise_on_error: bool = True,
    allow_errors: bool = False,
) -> NotebookRun:
    """Execute `notebook` with `parameters` and write the executed `.ipynb` to `output`.

    `cwd` defaults to the notebook's own folder, as in JupyterLab, so relative paths in parameters are
    relative to it: pass absolute ones. `timeout` is per cell, in seconds.
    With `raise_on_error=False` a failure is recorded in `NotebookRun.error` instead of raised; the
    executed notebook, outputs up to the failing cell included, is written either way.
    `allow_errors=True` runs the cells after a failing one too (grading: a crash in one exercise must
    not hide the next); the first error is still reported.
    """
    # absolute, because papermill saves after each cell from inside `cwd`
    notebook, output = Path(notebook), Path(output).resolve()
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook not found: {notebook.resolve()}")
    nb = jupytext.read(notebook)
    # jupytext files often carry no kernelspec, and papermill needs the language to write the parameters
    kernelspec = {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    nb.metadata.setdefault("kernelspec", kernelspec)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)  # so a stale copy is never mistaken for this run's
    error = None
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            nb,
            str(output),
            parameters=parameters or {},
            cwd=str(cwd or notebook.parent),
            kernel_name=kernel_name,
            execution_timeout=timeout,
            progress_bar=False,
            log_output=False,
            allow_errors=allow_errors,
        )
    except Exception as exc:
        if raise_on_error:
            raise
        error = _describe(exc)
    finally:
        seconds = time.perf_counter() - start
        if output.is_file():
            # papermill records the whole input notebook when given one in memory; keep just its path
            executed = nbformat.read(output, as_version=4)
            executed.metadata.papermill.input_path = str(notebook)
            save_text(output, nbformat.writes(executed))
    return NotebookRun(source=notebook, output=output, seconds=seconds, error=error)


def run_stamp(notebook: Path, parameters: dict[str, Any]) -> str:
    """What a finished run of ``notebook`` depends on: its text and its parameters, as one JSON line."""
    digest = hashlib.sha256(Path(notebook).read_bytes()).hexdigest()
    return json.dumps({"notebook": digest, "parameters": parameters}, sort_keys=True, default=str)


def run_all(
    notebooks_dir: Path,
    out_dir: Path,
    parameters: dict | None = None,
    pattern: str = "[0-9][0-9]_*.py",
    timeout: float | None = None,
    force: bool = False,
) -> list[NotebookRun]:
    """Run every notebook matching `pattern` in order, to `out_dir/<stem>.ipynb`, and print a summary.

    Each notebook gets `OUTPUT_DIR=out_dir/<stem>` (absolute) unless `parameters` sets it. A failure does
    not stop the others, so one run reports every broken notebook; check `run.error` for each.
    Finished stages are reused: a notebook that ran to the end with the same text and parameters
    (`out_dir/<stem>.done`) is not run again, as long as every notebook before it was reused too, since a
    later notebook builds on the runs of the earlier ones. `force=True` runs them all.
    """
    notebooks_dir, out_dir = Path(notebooks_dir), Path(out_dir)
    notebooks = sorted(notebooks_dir.glob(pattern))
    if not notebooks:
        raise FileNotFoundError(f"no notebook matches {notebooks_dir.resolve() / pattern}")
    runs, reusing = [], not force
    for i, notebook in enumerate(notebooks, start=1):
        notebook_parameters = {"OUTPUT_DIR": str((out_dir / notebook.stem).resolve()), **(parameters or {})}
        output, done = out_dir / f"{notebook.stem}.ipynb", out_dir / f"{notebook.stem}.done"
        stamp = run_stamp(notebook, notebook_parameters)
        reusing = reusing and output.is_file() and done.is_file() and done.read_text() == stamp
        if reusing:
            print(f"[{i}/{len(notebooks)}] {notebook}: finished before, reused (--force runs it)", flush=True)
            runs.append(NotebookRun(notebook, output.resolve(), 0.0, None, reused=True))
            continue
        print(f"[{i}/{len(notebooks)}] {notebook}", flush=True)
        done.unlink(missing_ok=True)
        run = run_notebook(notebook, output, notebook_parameters, timeout=timeout, raise_on_error=False)
        if run.error is None:
            save_text(done, stamp)
        runs.append(run)
    width = max(len(run.source.name) for run in runs)
    print(f"\n{'notebook':<{width}}  {'seconds':>8}  result")
    for run in runs:
        result = "reused" if run.reused else "ok" if run.error is None else f"error: {run.error}"[:100]
        print(f"{run.source.name:<{width}}  {run.seconds:8.1f}  {result}")
    return runs
