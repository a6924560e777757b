"""Atomic file writes: every file m3d-lite writes appears whole or not at all.

Each writer saves to a temporary name beside the target and renames it into place, so an
interrupted run never leaves a half-written volume, CSV or JSON that a later step would trust.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix(es) so that libraries which choose a format by extension still do so
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp creates 0600; give the file the permissions open() would have
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    ``replace=True``: an existing ``path`` is swapped for the new folder (a reader sees the old or the new
    one; for an instant, none). ``replace=False``: an existing ``path`` wins, so that several processes
    filling the same cache entry keep the first complete one and discard the others.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700
        if replace and target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)


def save_text(path: str | os.PathLike, text: str) -> Path:
    """Save UTF-8 ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Save ``obj`` as indented JSON atomically."""
    return save_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Save ``rows`` (dicts keyed by ``columns``) as CSV with exactly ``columns`` as header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
