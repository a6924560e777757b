"""Stage 2 of M3D: multi-task instruction tuning, LoRA on the LLM and the rest of the model trained in full.

It starts from the stage-1 model (``<align run>/model/``), ALL of it: the projector and the new token rows
trained in stage 1 are restored and checked (:func:`load_stage1`). M3D means to do the same but its
stage 2 rebinds a local variable instead of loading the stage-1 embeddings, so only its projector
survives (M3D_FACTS 1.9). What trains (M3D's choice, :func:`unfreeze_for_instruction`):

- LoRA adapters on every Linear of the LLM (see ``m3d_lite.models.lora``); the LLM's own weights stay
  bit-identical;
- in full: the vision tower, the projector, the input embeddings and the LM head (one matrix when they
  are tied, as in SmolLM2 and tiny-llama), and the seg module (added here to a stage-1 model without one)
  (:data:`FULLY_TRAINED`).

Data (:func:`instruction_data`): the tasks of stage 1 (captions, closed VQA, open VQA), REC/REG on
M3D-Seg and, for a model with a seg module, segmentation on M3D-Seg and M3D-RefSeg, with M3D's training
augmentation, mixed in proportion to their sizes as M3D does, or by explicit ``task_weights``.

What it leaves in ``out_dir``: ``model/`` = ``base/`` + ``adapter/`` (read by
``m3d_lite.models.lora.load_lamed_lora``; ``m3d-lite export`` merges it into a plain LaMed folder),
``metrics.jsonl``, ``run.json`` and ``checkpoints/`` from the training loop.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from peft import PeftModel
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from m3d_lite.config import TrainConfig
from m3d_lite.data.datasets import InstructCollator, mix_datasets
from m3d_lite.data.position import position_datasets
from m3d_lite.data.seg_data import segmentation_datasets
from m3d_lite.models.lamed import LaMedConfig, LaMedForCausalLM, load_lamed, split_overrides
from m3d_lite.models.lora import (
    LoraSettings,
    apply_lora,
    find_model_dir,
    save_lamed_lora,
    trainable_parameter_names,
)
from m3d_lite.models.segmentation import SegConfig
from m3d_lite.train.align import alignment_data, embedding_weights
from m3d_lite.train.clip import TRAIN_KEYS
from m3d_lite.train.loop import TrainResult, save_artifact, train

# LaMed parts trained in full in stage 2, as in M3D; a part the model does not have (yet) is skipped
FULLY_TRAINED = ("vision_tower", "mm_projector", "seg_projector", "seg_module")
# the tasks of instruction_data, in its order (the order of task_weights); with segmentation=True the
# SEGMENTATION_TASKS follow, so the indices of the first seven stay valid
INSTRUCTION_TASKS = ("caption", "closed VQA", "open VQA", "REC", "REC description", "REG", "REG description")
SEGMENTATION_TASKS = ("seg", "seg description", "referring seg")


def load_stage1(path: str | os.PathLike) -> tuple[LaMedForCausalLM, PreTrainedTokenizerBase]:
    """The stage-1 model in ``path`` (an ``align`` run folder or its ``model/``) and its tokenizer, with a
    check that the checkpoint filled EVERY weight: a missing, unexpected or reshaped key is an error that
    names them, never a silently re-initialised projector or embedding (M3D's stage-2 bug)."""
    folder = find_model_dir(path, "config.json", "the model/ folder of an `align` run (or that run folder)")
    (model, info), tokenizer = load_lamed(folder, output_loading_info=True)
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = {kind: sorted(map(str, info[kind])) for kind in kinds if info[kind]}
    if problems:
        raise ValueError(f"{folder}: the stage-1 checkpoint does not match the model it builds: {problems}")
    return model, tokenizer


def instruction_data(
    data_dir: str | os.PathLike,
    split: str,
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    chat_template: bool = True,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    augment: bool = False,
    segmentation: bool = False,
) -> Dataset:
    """M3D's stage-2 tasks of ``split``, mixed by :func:`~m3d_lite.data.datasets.mix_datasets`.

    Tasks, named by :data:`INSTRUCTION_TASKS` in the order ``weights`` follows: captions, closed VQA, open
    VQA (stage 1's data, each VQA row twice), then REC by class, REC by description, REG by class, REG by
    description (M3D's ``MultiPosDataset``, 4 samples per image-class pair of M3D-Seg). ``segmentation=True``
    appends :data:`SEGMENTATION_TASKS`: segmentation by class and by description (2 samples per pair) and
    referring segmentation on M3D-RefSeg (M3D's ``MultiSegDataset``, which its released code leaves out);
    their items hold ``"seg_mask"``, so only a model with a seg module can take those batches.
    ``weights=None`` mixes the tasks in proportion to their sizes, as M3D does: the result is then a
    ``ConcatDataset`` whose ``datasets`` are the tasks. A weight of 0 leaves a task out. ``augment=True``
    gives every volume M3D's training augmentation. A new task is one more entry of ``tasks`` and of the
    task names.
    """
    # without weights, alignment_data is the ConcatDataset of its three tasks: take them one by one
    stage1 = alignment_data(
        data_dir, split, tokenizer, num_image_tokens, max_length, chat_template, seed, augment=augment
    )
    tasks = [
        *stage1.datasets,
        *position_datasets(
            data_dir, split, tokenizer, num_image_tokens, max_length, seed, chat_template, augment
        ),
    ]
    if segmentation:
        tasks += segmentation_datasets(
            data_dir, split, tokenizer, num_image_tokens, max_length, seed, chat_template, augment
        )
    return mix_datasets(tasks, weights, seed=seed)


def seg_state_items(
    data_dir: str | os.PathLike, tokenizer: Any, config: LaMedConfig, count: int = 64, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """``count`` training items whose answer holds ``[SEG]``, in equal parts from the seg tasks of
    :func:`instruction_data` (by class, by description, referring), drawn with ``seed``, without
    augmentation: what a fresh ``seg_state_norm`` is fitted on (``config``: the model's)."""
    tasks = segmentation_datasets(
        data_dir, "train", tokenizer, config.proj_out_num, config.model_max_length, seed, config.chat_template
    )
    rng = random.Random(seed)
    for k, task in enumerate(tasks):
        wanted = count * (k + 1) // len(tasks) - count * k // len(tasks)
        for index in rng.sample(range(len(task)), len(task)):
            if wanted == 0:
                break
            item = task[index]
            if (item["input_ids"] == config.seg_token_id).any():
                wanted -= 1
                yield item


def unfreeze_for_instruction(model: PeftModel) -> list[str]:
    """On top of the LoRA adapter (all that ``apply_lora`` leaves trainable), train the parts of
    :data:`FULLY_TRAINED` the model has and the input and output embeddings in full; return the names of
    every trainable parameter. Nothing else of the LLM trains."""
    lamed = model.get_base_model()
    for name in FULLY_TRAINED:
        part = getattr(lamed, name, None)
        if part is not None:
            part.requires_grad_(True)
    for weight in embedding_weights(lamed):
        weight.requires_grad_(True)
    return trainable_parameter_names(model)


def train_instruct(
    scale: str,
    data_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task_weights: Sequence[float] | None = None,
    augment: bool = True,
    segmentation: bool = True,
    seg_encoder_from_vision: bool = True,
    seg_state_norm: bool = True,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[dict[str, float]], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Stage 2 at ``scale``: LoRA instruction tuning of the stage-1 model in ``model_dir`` (an ``align`` run
    folder or its ``model/``) on the ``train`` split of ``data_dir``; save ``out_dir/model/``.

    ``overrides`` go to the ``train_instruct`` section when they name a :class:`TrainConfig` field
    (``learning_rate=1e-4``), to the ``lora`` section when they name a :class:`LoraSettings` field
    (``r=32``); any other key is an error. ``task_weights`` mixes the tasks of :func:`instruction_data`
    (None: by size, as M3D); ``augment=False`` turns off M3D's training augmentation of the volumes.
    ``segmentation=True`` gives a stage-1 model without one a fresh seg module (the preset's
    ``segmentation`` section; M3D adds its SegVol module at this stage too) and adds the seg tasks to the
    mix; ``False`` is M3D's HEAD, whose seg data is commented out. The fresh seg module's image encoder
    starts from the vision tower (the stage-0 CLIP encoder; M3D starts from SegVol's weights) unless
    ``seg_encoder_from_vision=False``; ``seg_state_norm=True`` (not in M3D) standardises the ``[SEG]`` states
    before the seg projector, with statistics measured on 64 seg items of the stage-1 model
    (:func:`seg_state_items`). The preset's ``module_learning_rates`` give the seg parts, trained
    from scratch, a higher learning rate than the LLM's adapters. ``resume=True`` continues the run in
    ``out_dir``.
    """
    lora_keys = {f.name for f in dataclasses.fields(LoraSettings)}
    groups = split_overrides(overrides, {"train": TRAIN_KEYS, "lora": lora_keys})
    cfg = TrainConfig.from_scale(scale, "instruct", **groups["train"])
    lora = LoraSettings.from_scale(scale, **groups["lora"])
    model, tokenizer = load_stage1(model_dir)
    stage1 = str(Path(model.name_or_path).resolve())
    set_seed(cfg.seed)  # the seg module's initialisation and LoRA's A matrices
    if segmentation and model.seg_module is None:
        model.add_seg_module(
            SegConfig.from_scale(scale),
            encoder_from_vision=seg_encoder_from_vision,
            state_norm=seg_state_norm,
        )
        if seg_state_norm:  # 64 forward passes of the LLM: on this process's GPU where there is one
            items = seg_state_items(data_dir, tokenizer, model.config, seed=cfg.seed)
            # not PartialState().device: a PartialState made here, before the loop's Accelerator, broke
            # notebook 07's 2-process CPU launch (its processes raced on the checkpoint folder)
            if torch.cuda.is_available():
                model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            model.seg_state_norm.fit(model.seg_states(items, progress=progress))
    model = apply_lora(model, lora)
    unfreeze_for_instruction(model)
    config = model.config
    dataset = instruction_data(
        data_dir,
        "train",
        tokenizer,
        config.proj_out_num,
        config.model_max_length,
        config.chat_template,
        cfg.seed,
        task_weights,
        augment,
        segmentation,
    )
    settings = {
        "stage": "instruct",
        "scale": scale,
        "llm": config.llm_name,
        "model": stage1,
        "lora": dataclasses.asdict(lora),
        "task_weights": task_weights,
        "augment": augment,
        "segmentation": segmentation,
        "seg_encoder_from_vision": seg_encoder_from_vision,
        "seg_state_norm": seg_state_norm,
    }
    result = train(
        model,
        dataset,
        InstructCollator(tokenizer),
        cfg,
        out_dir,
        resume=resume,
        max_steps=max_steps,
        progress=progress,
        log_fn=log_fn,
        settings=settings,
    )
    save_artifact(Path(out_dir) / "model", lambda folder: save_lamed_lora(result.model, tokenizer, folder))
    return result
