"""Scale presets (ci, small, paper) as YAML, loaded into dataclasses with checked overrides.

A preset file ``configs/<scale>.yaml`` has one section per part of the system (``data`` now; the
model and training stages add theirs). Any value can be overridden from a notebook's parameters
cell or the CLI; an unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

SCALES = ("ci", "small", "paper")

T = TypeVar("T")


def load_preset(scale: str) -> dict[str, Any]:
    """Return the raw preset dict for ``scale`` (one of :data:`SCALES`)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")
    text = resources.files("m3d_lite.configs").joinpath(f"{scale}.yaml").read_text()
    return yaml.safe_load(text)


def build_config(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``values``, naming ``where`` and the known keys on an unknown key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**converted)


def section_config(cls: type[T], scale: str, section: str, **overrides: Any) -> T:
    """Build ``cls`` from section ``section`` of preset ``scale``, with ``overrides`` applied on top."""
    preset = load_preset(scale)
    if section not in preset:
        raise KeyError(f"preset {scale!r} has no section {section!r}; it has {sorted(preset)}")
    values = {**preset[section], **{k: v for k, v in overrides.items() if v is not None}}
    return build_config(cls, values, where=f"preset {scale!r} section {section!r}")


@dataclass(frozen=True)
class DataConfig:
    """Shapes and sizes of the data at one scale."""

    image_shape: tuple[int, int, int]
    raw_shape: tuple[int, int, int]
    raw_spacing: tuple[float, float, float]
    num_volumes: int
    seed: int = 0

    @classmethod
    def from_scale(cls, scale: str, **overrides: Any) -> DataConfig:
        """The ``data`` section of preset ``scale`` with ``overrides`` (None values are ignored)."""
        return section_config(cls, scale, "data", **overrides)


def default_data_dir(scale: str) -> Path:
    """Where the phantom dataset of ``scale`` lives unless told otherwise.

    ``$M3D_LITE_DATA_DIR/phantom_<scale>`` when that variable is set (as in MONAI's tutorials),
    else ``~/.cache/m3d_lite/phantom_<scale>``, so that every notebook finds the same data.
    """
    base = os.environ.get("M3D_LITE_DATA_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "m3d_lite"
    return root / f"phantom_{scale}"


@dataclass(frozen=True)
class TrainConfig:
    """One training stage's loop settings (section ``train_<stage>`` of a preset).

    ``batch_size`` is per process; the global batch is ``batch_size * processes * grad_accum_steps``.
    ``global_batch_size`` fixes the global batch instead, whatever the number of processes: the loop then
    derives ``grad_accum_steps = global_batch_size / (batch_size * processes)`` (M3D's 8 GPUs x 32 = 256
    on one GPU: 8 micro-batches of 32 per step). ``gradient_checkpointing`` recomputes activations in the
    backward pass instead of storing them (less memory, ~30 % more compute). ``ddp_find_unused_parameters``
    lets DDP (several processes) train a model whose batches may leave a part without gradient: stage 2's
    seg module gets none from a micro-batch without a mask.
    ``max_steps`` counts optimizer steps and wins over ``epochs`` when set. ``module_learning_rates``
    gives named submodules their own learning rate (``{"seg_module": 1e-3}``: every parameter with a
    ``seg_module`` in its dotted name); the rest train at ``learning_rate``.
    """

    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # None: batch_size x processes x grad_accum_steps
    gradient_checkpointing: bool = False
    ddp_find_unused_parameters: bool = False
    # "auto": the launch config's, else bf16 where the GPU has it; "no", "fp16", "bf16" win over it
    mixed_precision: str = "auto"
    max_grad_norm: float | None = 1.0
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    log_every: int = 10
    num_workers: int = 0
    seed: int = 42
    module_learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.global_batch_size is not None and (
            not isinstance(self.global_batch_size, int) or self.global_batch_size < 1
        ):
            raise ValueError(
                f"global_batch_size must be a positive integer or None, got {self.global_batch_size!r}"
            )
        rates = dict(self.module_learning_rates or {})
        for module, rate in rates.items():
            try:
                rates[module] = float(rate)
            except (TypeError, ValueError):
                raise ValueError(f"module_learning_rates[{module!r}] = {rate!r} is not a number") from None
        object.__setattr__(self, "module_learning_rates", rates)

    @classmethod
    def from_scale(cls, scale: str, stage: str, **overrides: Any) -> TrainConfig:
        """Section ``train_<stage>`` of preset ``scale`` with ``overrides`` (None values are ignored)."""
        return section_config(cls, scale, f"train_{stage}", **overrides)
