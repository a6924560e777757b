"""The one training loop of every stage (CLIP, projector alignment, LoRA instruction tuning, segmentation).

A stage hands over a model whose ``forward(**batch)`` returns an object with ``.loss``, a dataset, a
collate function and a :class:`~m3d_lite.config.TrainConfig`; the loop does the rest on ``accelerate``, so
the same call runs in a notebook (one process) and under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3
or FSDP; the launch configs are in ``m3d_lite/configs/accelerate/``):

- AdamW on the parameters with ``requires_grad`` (freezing is the stage's job), weight decay on the
  weights of Linear and Conv layers only, cosine schedule with linear warm-up, gradient clipping;
- mixed precision and gradient accumulation from the config (:func:`resolve_mixed_precision`,
  :func:`accumulation_steps`: a ``global_batch_size`` stays the same on 1 or 8 processes); every batch is
  full (``drop_last``), as a contrastive loss needs; gradient checkpointing when the config asks for it;
- a seeded shuffle whose order in epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees exactly
  the batches the uninterrupted run would have seen: train N steps == train N/2, stop, resume, train to N;
- checkpoints ``out_dir/checkpoints/step_<N>/`` (``accelerator.save_state`` + ``trainer_state.json``)
  that appear whole or not at all; the last :data:`KEEP_CHECKPOINTS` are kept;
- metrics as JSON lines in ``out_dir/metrics.jsonl``, a progress bar and log lines on rank 0 only.

The caller saves the final model: :class:`TrainResult` hands it back unwrapped and whole (ZeRO-3 and FSDP
shard the weights over the processes; :func:`consolidate` gathers them into a plain copy of the model, so
saving and LoRA merging never see a partitioned tensor, M3D issue #59), and :func:`save_artifact` writes it
on the main process into a folder that appears whole or not at all.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from m3d_lite.config import TrainConfig
from m3d_lite.io import atomic_dir, save_json, save_text

logger = get_logger(__name__)

KEEP_CHECKPOINTS = 2
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


@dataclass
class TrainResult:
    """What a run produced: where, how far, the last logged loss, and the trained model, unwrapped and with
    all its weights (on every process; on the main process only when ZeRO-3 or FSDP sharded them)."""

    out_dir: Path
    steps: int
    final_loss: float | None
    metrics_path: Path
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)


@dataclass
class Position:
    """Where a run stands: optimizer steps done, and the data position (epoch, batches of it consumed)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss: float | None = None


class LossWindow:
    """Mean loss and throughput over the micro-batches since the last log line."""

    def __init__(self, device: torch.device, samples_per_batch: int) -> None:
        self.total = torch.zeros((), device=device)
        self.samples_per_batch = samples_per_batch
        self.reset()

    def reset(self) -> None:
        self.total.zero_()
        self.batches, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.batches += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.batches

    def samples_per_s(self) -> float:
        return self.batches * self.samples_per_batch / (time.perf_counter() - self.start)


def resolve_mixed_precision(value: str) -> str:
    """The precision of a run whose config says ``value``: ``"no"``, ``"fp16"`` and ``"bf16"`` as given (the
    preset wins over a launch config); ``"auto"`` takes the launch config's (``accelerate launch`` passes it
    on as ``ACCELERATE_MIXED_PRECISION``), and without a launcher ``"bf16"`` on a CUDA device that
    supports it, else ``"no"``."""
    if value != "auto":
        return value
    if launched := os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return launched
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def accumulation_steps(cfg: TrainConfig, processes: int) -> int:
    """Micro-batches per optimizer step: ``cfg.grad_accum_steps``, or, when ``cfg.global_batch_size`` is set,
    the number that keeps that global batch on ``processes`` processes (M3D's 256 = 32 x 8 GPUs is 32 x 1 x 8
    on one GPU). A global batch that ``batch_size x processes`` does not divide is an error saying which
    sizes would."""
    if cfg.global_batch_size is None:
        return cfg.grad_accum_steps
    per_micro_step = cfg.batch_size * processes
    steps, rest = divmod(cfg.global_batch_size, per_micro_step)
    if rest or not steps:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of batch_size {cfg.batch_size} x "
            f"{processes} process(es) = {per_micro_step}: choose a batch_size that divides "
            f"{cfg.global_batch_size} / {processes}, or a global_batch_size that is a multiple of "
            f"{per_micro_step}"
        )
    if cfg.grad_accum_steps not in (1, steps):
        raise ValueError(
            f"grad_accum_steps {cfg.grad_accum_steps} contradicts global_batch_size {cfg.global_batch_size} "
            f"(= batch_size {cfg.batch_size} x {processes} process(es) x {steps}): leave "
            "grad_accum_steps at 1, it is derived from the global batch"
        )
    return steps


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing in every part of ``model`` that has it: transformers'
    ``activation_checkpointing_enable`` flags the LLM's (or BERT's) layers and every module with a
    ``gradient_checkpointing`` attribute, such as the 3D ViTs of the vision tower and the seg module
    (``ViT3D``). Non-reentrant checkpointing: frozen inputs (LoRA on a frozen LLM) still pass gradients."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing=True, but {type(model).__name__} cannot checkpoint its activations "
            "(it is not a transformers model with supports_gradient_checkpointing); set it to false"
        )
    enable(activation_checkpointing_kwargs={"use_reentrant": False})


def weightless_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters live on the meta device (no memory), tied ones still tied:
    the frame :func:`consolidate` loads the trained weights into. Buffers are copied as they are (small)."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def consolidate(accelerator: Accelerator, prepared: nn.Module, frame: nn.Module) -> nn.Module:
    """The trained ``prepared`` model as a plain module: ``frame`` (:func:`weightless_copy` of it before
    ``prepare``) holding its full weights, from ``accelerator.get_state_dict``, which gathers what ZeRO-3 and
    FSDP partitioned. Every process must call it. The gathered weights (bf16 under ZeRO-3) are cast back to
    the frame's dtypes, and the frame's own buffers follow them to their device. Where the gathered dict is
    empty (the other processes of a ZeRO-3 / FSDP run, which never save) the unwrapped, still sharded model
    comes back instead."""
    state = accelerator.get_state_dict(prepared)
    if not state:
        return accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    names_of: dict[int, list[str]] = {}
    for name, parameter in frame.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    dtypes = {name: tensor.dtype for name, tensor in frame.state_dict().items()}
    frame.load_state_dict({name: t.to(dtypes.get(name, t.dtype)) for name, t in state.items()}, assign=True)
    for first, *tied in names_of.values():  # assign=True gave each name its own Parameter: tie them again
        for name in tied:
            module, _, attribute = name.rpartition(".")
            setattr(frame.get_submodule(module), attribute, frame.get_parameter(first))
    return frame.to(next(iter(state.values())).device)


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    learning_rate: float,
    module_learning_rates: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: decay on Linear/Conv weights, none on the rest; the
    learning rate of ``module_learning_rates`` for the parameters of a submodule it names, else
    ``learning_rate``.

    Biases, norm scales, embedding tables, position embeddings, CLS tokens and scalars such as CLIP's
    ``logit_scale`` are not shrunk towards zero (the practice of minGPT and HF's Trainer): decaying them
    only hurts. A weight tied to an embedding (e.g. an LM head) counts as an embedding. A submodule is
    named by one component of the parameter names (``seg_module`` matches
    ``base_model.model.seg_module.mask_decoder.*``); a name that matches no trainable parameter is an
    error, as a misspelt one would otherwise train at the wrong rate unnoticed.
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)}
    decayed -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    rates = module_learning_rates or {}

    def rate(name: str) -> float:
        return next((lr for module, lr in rates.items() if module in name.split(".")), learning_rate)

    unmatched = sorted(m for m in rates if not any(m in name.split(".") for name, _ in trainable))
    if unmatched:
        raise ValueError(
            f"module_learning_rates names {unmatched}, which hold no trainable parameter of "
            f"{type(model).__name__}; its trainable top-level parts are "
            f"{sorted({name.split('.')[0] for name, _ in trainable})}"
        )
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in trainable:
        decay = weight_decay if id(p) in decayed else 0.0
        groups.setdefault((rate(name), decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": decay} for (lr, decay), ps in groups.items()]


def count_steps(cfg: TrainConfig, batches_per_epoch: int, max_steps: int | None = None) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``cfg.max_steps``, else ``cfg.epochs`` epochs.

    An epoch ends with an optimizer step even when its batches do not fill the last accumulation
    (``accelerate`` syncs at the end of the data), so one epoch is ``ceil(batches / grad_accum_steps)``.
    """
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum_steps)
    return max_steps or cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``out_dir`` (``checkpoints/step_<N>/`` with a state file), oldest first."""
    root = Path(out_dir) / "checkpoints"
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def save_checkpoint(accelerator: Accelerator, out_dir: Path, position: Position) -> Path:
    """Save model, optimizer, scheduler and every process's RNG states as ``step_<N>/``, atomically.

    All processes write into ``.tmp_step_<N>/``; the main process adds the state file, renames the folder
    (an atomic step on one file system) and deletes all but the last :data:`KEEP_CHECKPOINTS`.
    """
    root = out_dir / "checkpoints"
    final, tmp = root / f"step_{position.step}", root / f".tmp_step_{position.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_json(tmp / STATE_FILE, dataclasses.asdict(position))
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_artifact(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Run ``write(folder)`` on the main process only, atomically into ``path`` (see :func:`atomic_dir`).

    Every process returns after the folder is in place, so a launched run can go on to read it.
    """
    state = PartialState()
    if state.is_main_process:
        with atomic_dir(path) as tmp:
            write(tmp)
    state.wait_for_everyone()
    return Path(path)


def prepare_out_dir(accelerator: Accelerator, out_dir: Path, resume: bool) -> Path | None:
    """Make ``out_dir`` ready for a fresh or resumed run; return the checkpoint to resume from.

    A resumed run needs a complete checkpoint. A fresh run starts afresh, as nanoGPT's does: it deletes
    the checkpoints of an earlier run in the same folder (with a warning), so that two runs never mix.
    Left-over ``.tmp_*`` folders of an interrupted save are removed either way.
    """
    checkpoints = checkpoint_dirs(out_dir)
    where = out_dir / "checkpoints"
    if resume and not checkpoints:
        raise FileNotFoundError(
            f"resume=True but {where} holds no complete checkpoint (step_<N>/ with {STATE_FILE}); "
            "start without resume, or point out_dir at the folder of the run to continue"
        )
    if accelerator.is_main_process:
        if not resume and where.exists():
            if checkpoints:
                logger.warning(
                    f"starting afresh: deleting {where} of an earlier run (resume=True continues it)"
                )
            shutil.rmtree(where)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in where.glob(".tmp_*"):
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return checkpoints[-1] if resume else None


def check_settings(accelerator: Accelerator, out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Record what defines the run in ``out_dir/run.json``; a resumed run must match it key for key.

    Resuming with another batch size, learning rate or model shape would silently continue a different
    run (or fail deep inside ``load_state``); this names the keys that differ instead.
    """
    path = out_dir / RUN_FILE
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
    if resume and path.is_file():
        recorded = json.loads(path.read_text())
        differ = sorted(k for k in recorded.keys() | settings.keys() if recorded.get(k) != settings.get(k))
        if differ:
            changes = ", ".join(f"{k}: {recorded.get(k)!r} then, {settings.get(k)!r} now" for k in differ)
            raise ValueError(f"{path}: resume with the settings the run started with ({changes})")
    elif not resume and accelerator.is_main_process:
        save_json(path, settings)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metric lines written after ``step`` (by a run that died after its last checkpoint)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    save_text(path, "".join(line for line in lines if json.loads(line)["step"] <= step))


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (precision, gradient-accumulation and dataloader
    bookkeeping), keeping the process group: a run that stopped mid-epoch must not leak into the next."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def make_accelerator(cfg: TrainConfig, out_dir: Path) -> Accelerator:
    """An ``Accelerator`` for ``cfg``: precision by :func:`resolve_mixed_precision`, micro-batches per step
    by :func:`accumulation_steps` for the processes it finds.

    The shared accelerate state is reset first so that one notebook can run stages with different
    precisions (accelerate otherwise refuses a second, different ``Accelerator`` in one process).
    """
    reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        project_dir=str(out_dir),
        # the order of epoch e is drawn from a generator seeded with seed + e: reproducible after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # the scheduler counts optimizer steps; we step it ourselves
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)
        ],
    )
    accelerator.gradient_accumulation_steps = accumulation_steps(cfg, accelerator.num_processes)
    return accelerator


def train(
    model: nn.Module,
    train_dataset: Dataset,
    collate_fn: Callable[[list[Any]], dict[str, Any]],
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    log_fn: Callable[[dict[str, float]], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_dataset`` for :func:`count_steps` optimizer steps; see the module docstring.

    ``batch_size`` in ``cfg`` is per process. The values derived from ``cfg`` and the launch (processes,
    accumulation steps, global batch, precision) are recorded under ``"derived"`` in ``out_dir/run.json``.
    ``resume=True`` continues from the latest checkpoint in
    ``out_dir`` at the exact data position (and returns at once when that run had finished).
    ``log_fn(record)`` is called on the main process with every metrics record, e.g. to draw a live curve.
    ``settings`` (JSON values) are what else defines the run, e.g. stage, scale and model overrides: they
    are recorded with ``cfg`` in ``out_dir/run.json``, and a resume must repeat them.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    accelerator = make_accelerator(cfg, out_dir)
    run_cfg = dataclasses.replace(
        cfg,
        grad_accum_steps=accelerator.gradient_accumulation_steps,
        mixed_precision=accelerator.mixed_precision,
    )
    derived = {
        "processes": accelerator.num_processes,
        "grad_accum_steps": run_cfg.grad_accum_steps,
        "global_batch_size": cfg.batch_size * accelerator.num_processes * run_cfg.grad_accum_steps,
        "mixed_precision": run_cfg.mixed_precision,
    }
    checkpoint = prepare_out_dir(accelerator, out_dir, resume)
    recorded = {**dataclasses.asdict(cfg), **(settings or {}), "derived": derived}
    check_settings(accelerator, out_dir, recorded, resume)
    logger.info(f"run settings derived from the config and the launch: {derived}")
    cfg = run_cfg
    set_seed(cfg.seed)

    loader = DataLoader(
        train_dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    # accelerate shards full batches round-robin and drops the ones that do not fill every process
    batches_per_epoch = len(loader) // accelerator.num_processes
    if batches_per_epoch == 0:
        raise ValueError(
            f"{len(train_dataset)} training samples make no full batch of {cfg.batch_size} per process "
            f"x {accelerator.num_processes} process(es): lower batch_size or add data"
        )
    total_steps = count_steps(cfg, batches_per_epoch, max_steps)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    frame = weightless_copy(model)
    groups = parameter_groups(model, cfg.weight_decay, cfg.learning_rate, cfg.module_learning_rates)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    metrics_path = out_dir / METRICS_FILE
    position = Position()
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        position = Position(**json.loads((checkpoint / STATE_FILE).read_text()))
        logger.info(f"resumed from {checkpoint} at step {position.step} of {total_steps}")
        if accelerator.is_main_process:
            keep_metrics_until(metrics_path, position.step)
    elif accelerator.is_main_process:
        metrics_path.unlink(missing_ok=True)

    bar = tqdm(
        total=total_steps,
        initial=position.step,
        desc=f"train {type(accelerator.unwrap_model(model)).__name__}",
        disable=not (progress and accelerator.is_main_process),
    )
    window = LossWindow(accelerator.device, samples_per_batch=cfg.batch_size * accelerator.num_processes)
    while position.step < total_steps:
        loader.set_epoch(position.epoch)
        skip = position.batch_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            window.add(loss)
            position.batch_in_epoch += 1
            if position.batch_in_epoch == batches_per_epoch:
                position.epoch, position.batch_in_epoch = position.epoch + 1, 0
            if not accelerator.sync_gradients:
                continue
            position.step += 1
            bar.update(1)
            last = position.step == total_steps
            if position.step % cfg.log_every == 0 or last:
                position.loss = accelerator.reduce(window.mean(), "mean").item()
                record = {
                    "step": position.step,
                    "epoch": round(position.epoch + position.batch_in_epoch / batches_per_epoch, 4),
                    "loss": position.loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window.samples_per_s(),
                    "seconds": time.perf_counter() - start,
                }
                window.reset()
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{position.loss:.4f}")
                    logger.info(json.dumps(record))
                    if log_fn is not None:
                        log_fn(record)
            if (cfg.save_every and position.step % cfg.save_every == 0) or last:
                save_checkpoint(accelerator, out_dir, position)
            if last:
                break
    bar.close()
    accelerator.wait_for_everyone()
    trained = consolidate(accelerator, model, frame)
    reset_accelerate_state()
    return TrainResult(
        out_dir=out_dir,
        steps=position.step,
        final_loss=position.loss,
        metrics_path=metrics_path,
        seconds=time.perf_counter() - start,
        model=trained,
    )
