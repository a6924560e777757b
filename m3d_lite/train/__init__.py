"""Training: one shared accelerate loop (``loop.train``) and one entry point per stage.

Stage 0 is ``clip.train_clip``, stage 1 ``align.train_align``, stage 2 ``instruct.train_instruct``. Run a
stage from a notebook with
``from m3d_lite.train import train_clip`` or from a shell with ``python -m m3d_lite.train clip ...``
(see ``__main__.py``). The names below are imported on first use,
so that ``python -m m3d_lite.train --help`` and ``m3d-lite --help`` do not wait for torch and accelerate.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "TrainResult": "loop",
    "save_artifact": "loop",
    "train": "loop",
    "train_align": "align",
    "train_clip": "clip",
    "train_instruct": "instruct",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'm3d_lite.train' has no attribute {name!r}")
    return getattr(import_module(f"m3d_lite.train.{_HOMES[name]}"), name)
