"""Check an exercise against the package's reference and report it to the student and to the grader.

Every check prints one line for the student (✅/❌/⚠️) and one `M3D_CHECK {json}` line that
`parse_check_lines` reads back from an executed notebook, so grading needs nothing but the outputs.
A failed check either raises `CheckFailed` (strict, for CI and the solutions) or hands back the
reference implementation, so a student who is stuck on one exercise can still run the rest.

Graded runs (`m3d-lite course grade`) set `M3D_LITE_GRADING` to a random per-run token: then a check
also runs its `hidden_cases`, never raises (so every exercise gets a result, not just the first failed
one), and stamps its `M3D_CHECK` line with the token, so the grader can ignore lines a student printed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

PREFIX = "M3D_CHECK"
GRADING_ENV = "M3D_LITE_GRADING"
ICONS = {"passed": "✅", "failed": "❌", "error": "❌", "not attempted": "⚠️"}
_LINE = re.compile(rf"^{PREFIX} (\{{.*\}})\s*$", re.MULTILINE)


class CheckFailed(AssertionError):
    """A strict check did not pass."""


@dataclasses.dataclass
class CheckResult:
    """The outcome of one check, as printed in its `M3D_CHECK` line."""

    name: str
    status: str  # "passed" | "failed" | "not attempted" | "error"
    message: str
    weight: float


_RESULTS: dict[str, CheckResult] = {}  # latest result per check name, in the order they last ran


def _truncate(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(x: Any, limit: int = 80) -> str:
    """A one-line description: shape and dtype for arrays and tensors, else a truncated repr."""
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, np.ndarray):
        return f"array{x.shape} {x.dtype}"
    return _truncate(repr(x), limit)


def _compare_arrays(expected: np.ndarray | torch.Tensor, got: Any) -> str | None:
    """Compare shape, then dtype kind, then values (atol 1e-5); name the first value that differs."""
    kind = torch.Tensor if isinstance(expected, torch.Tensor) else np.ndarray
    if not isinstance(got, kind):
        return f"expected a {kind.__module__}.{kind.__name__}, got {_short(got)}"
    as_numpy = [x.detach().cpu().float() if x.dtype == torch.bfloat16 else x for x in (expected, got)]
    want, have = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in as_numpy)
    if want.shape != have.shape:
        return f"expected shape {want.shape}, got shape {have.shape}"
    if want.dtype.kind != have.dtype.kind:
        return f"expected dtype {expected.dtype}, got dtype {got.dtype}"
    close = np.isclose(have, want, atol=1e-5, equal_nan=True) if want.dtype.kind in "fc" else have == want
    if close.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~close)[0])
    return (
        f"{int((~close).sum())} of {close.size} values differ, the first at index {index}: "
        f"expected {want[index].item()!r}, got {have[index].item()!r}"
    )


def compare_outputs(expected: Any, got: Any) -> str | None:
    """The default `compare`: None when `got` matches `expected`, else what differs, in one sentence.

    Arrays and tensors compare shape, dtype kind and values; floats compare with math.isclose (1e-5);
    lists, tuples, dicts and dataclasses compare item by item, so they may hold arrays; the rest uses ==.
    """
    if isinstance(expected, (np.ndarray, torch.Tensor)):
        return _compare_arrays(expected, got)
    if isinstance(expected, (float, np.floating)):
        if not isinstance(got, (int, float, np.integer, np.floating)) or isinstance(got, bool):
            return f"expected the number {expected!r}, got {_short(got)}"
        both_nan = math.isnan(got) and math.isnan(expected)
        same = both_nan or math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-5)
        return None if same else f"expected {expected!r}, got {got!r}"
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"expected a {type(expected).__name__} of {len(expected)} items, got {_short(got)}"
        items = [(f"item [{i}]", e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True))]
    elif isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = sorted(map(str, got)) if isinstance(got, dict) else _short(got)
            return f"expected a dict with keys {sorted(map(str, expected))}, got {keys}"
        items = [(f"[{key!r}]", value, got[key]) for key, value in expected.items()]
    elif dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        if type(got) is not type(expected):
            return f"expected a {type(expected).__name__}, got {_short(got)}"
        names = [field.name for field in dataclasses.fields(expected)]
        items = [(f".{n}", getattr(expected, n), getattr(got, n)) for n in names]
    else:
        try:
            same = bool(expected == got)
        except Exception:  # e.g. an array compared with a scalar: "truth value is ambiguous"
            same = False
        return None if same else f"expected {_short(expected)}, got {_short(got)}"
    for where, want, have in items:
        difference = compare_outputs(want, have)
        if difference is not None:
            return f"{where}: {difference}"
    return None


def _difference(compare: Callable[[Any, Any], str | None] | None, expected: Any, got: Any) -> str | None:
    """Run `compare`; a comparison that crashes on an odd output counts as a mismatch, not a crash."""
    try:
        return (compare or compare_outputs)(expected, got)
    except Exception as exc:
        return f"could not compare with the expected output ({type(exc).__name__}: {exc}); got {_short(got)}"


def grading_token() -> str:
    """The grader's token for this run, or "" outside graded runs (read from `$M3D_LITE_GRADING`)."""
    return os.environ.get(GRADING_ENV, "")


def _record(result: CheckResult, strict: bool, cause: BaseException | None = None) -> bool:
    """Store and print `result`; return whether it passed, raising CheckFailed if strict and it did not.

    In a graded run nothing raises: the grader wants a result for every exercise, not the first failure.
    """
    result.message = " ".join(result.message.split())  # one line each, whatever the exception said
    _RESULTS.pop(result.name, None)
    _RESULTS[result.name] = result
    print(f"{ICONS[result.status]} {result.name}: {result.status}: {result.message}")
    line = dataclasses.asdict(result)
    if grading_token():
        line["token"] = grading_token()
    print(f"{PREFIX} {json.dumps(line)}", flush=True)
    if result.status == "passed":
        return True
    if strict and not grading_token():
        raise CheckFailed(f"{result.name} {result.status}: {result.message}") from cause
    return False


def check_function(
    name: str,
    student_fn: Callable,
    reference_fn: Callable,
    cases: Sequence[tuple | dict],
    *,
    strict: bool = False,
    weight: float = 1.0,
    compare: Callable[[Any, Any], str | None] | None = None,
    hidden_cases: Sequence[tuple | dict] = (),
) -> Callable:
    """Compare `student_fn` with `reference_fn` on every case; return the function the notebook should use.

    A case is a tuple of positional arguments or a dict of keyword arguments. `compare(expected, got)`
    returns None when they match, else a message (default `compare_outputs`). The student's function
    comes back when every case matches; otherwise strict raises CheckFailed, and non-strict warns and
    returns `reference_fn` so the rest of the notebook still runs. `hidden_cases` run only in graded
    runs, after the visible ones, so that a function tuned to the visible cases does not pass.
    """
    if not cases:
        raise ValueError(f"check {name!r} has no cases: it would pass whatever the student wrote")
    fn_name = getattr(student_fn, "__name__", name)
    hidden = list(hidden_cases) if grading_token() else []
    extra = f" (+{len(hidden)} hidden)" if hidden else ""
    status, message, cause = "passed", f"{len(cases)}{extra} cases match the reference", None
    for number, case in enumerate([*cases, *hidden]):
        if not isinstance(case, (tuple, dict)):
            raise TypeError(f"check {name!r}: a case is a tuple of arguments or a dict, got {_short(case)}")
        args, kwargs = (case, {}) if isinstance(case, tuple) else ((), case)
        shown = ", ".join([_short(a, 30) for a in args] + [f"{k}={_short(v, 30)}" for k, v in kwargs.items()])
        call = _truncate(f"{'hidden case ' if number >= len(cases) else ''}{fn_name}({shown})")
        expected = reference_fn(*args, **kwargs)
        # the student works on copies: an in-place edit must not change the inputs or the expected output
        student_args, student_kwargs = copy.deepcopy((args, kwargs))
        try:
            got = student_fn(*student_args, **student_kwargs)
        except NotImplementedError as exc:
            status, message, cause = "not attempted", "the exercise still raises NotImplementedError", exc
            break
        except Exception as exc:
            status, message, cause = "error", f"{call} raised {type(exc).__name__}: {exc}", exc
            break
        difference = _difference(compare, expected, got)
        if difference is not None:
            status, message = "failed", f"{call}: {difference}"
            break
    if _record(CheckResult(name, status, message, weight), strict, cause):
        return student_fn
    warnings.warn(
        f"{name} {status}: using the reference implementation so the notebook keeps running",
        UserWarning,
        stacklevel=2,
    )
    return reference_fn


def check_value(
    name: str,
    value: Any,
    expected: Any,
    *,
    strict: bool = False,
    weight: float = 1.0,
    compare: Callable[[Any, Any], str | None] | None = None,
) -> bool:
    """Check an exercise whose answer is a value; return True when it matches `expected`."""
    difference = _difference(compare, expected, value)
    if difference is None:
        return _record(CheckResult(name, "passed", "matches the expected value", weight), strict)
    return _record(CheckResult(name, "failed", difference, weight), strict)


def parse_check_lines(text: str, token: str | None = None) -> list[CheckResult]:
    """Read the `M3D_CHECK` lines back from a notebook's output text, in order.

    With a `token`, only lines stamped with it count (a graded run); lines that are not valid check
    results, such as a student's hand-written imitation, are skipped rather than trusted or fatal.
    """
    found = []
    for line in _LINE.findall(text):
        try:
            fields = json.loads(line)
            line_token = fields.pop("token", "")
            result = CheckResult(**fields)
        except (ValueError, TypeError, AttributeError):
            continue
        if token is None or line_token == token:
            found.append(result)
    return found


def results() -> list[CheckResult]:
    """The latest result of each check run in this process, in the order they last ran."""
    return list(_RESULTS.values())


def summary() -> str:
    """A short table of `results()` with the weighted score, for the last cell of a notebook."""
    rows = results()
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'check':<{width}}  {'status':<13}  weight"]
    lines += [f"{r.name:<{width}}  {r.status:<13}  {r.weight:6.1f}" for r in rows]
    passed = [r for r in rows if r.status == "passed"]
    score, total = sum(r.weight for r in passed), sum(r.weight for r in rows)
    lines.append(f"{len(passed)} of {len(rows)} checks passed, score {score:g} of {total:g}")
    return "\n".join(lines)
