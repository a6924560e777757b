"""Stage 1 of M3D: align the projector, so that the frozen LLM can read the frozen vision encoder's tokens.

M3D calls this stage "pretrain" (``--tune_mm_mlp_adapter True``): the spatial pooling projector learns to
turn ViT patch tokens into LLM input embeddings, on the same data as M3D (captions + closed VQA + open VQA
of the training split, mixed in proportion to their sizes). What trains and what does not:

- ``mm_projector``: trained;
- the rows of the tokens this course adds (``<im_patch>``, ``<bx_start>``, ``<bx_end>``, ``[SEG]``) in the
  input embedding and the LM head: trained through a gradient mask that zeroes every other row. M3D trains
  the WHOLE input embedding matrix here; we deliberately keep the LLM's own rows frozen so that every
  weight the LLM came with stays bit-identical (and stage 2 starts from the real LLM). In practice only
  the LM-head rows move in this stage: ``<im_patch>`` embeddings are always replaced by image features,
  and box/SEG tokens appear only in stage-2 data;
- the LLM and the vision tower: ``requires_grad=False``. The shared loop puts the whole model in train
  mode; that changes nothing for them because neither has dropout (MONAI ViT built with rate 0, LLM
  configs with attention dropout 0) nor batch norm.

What it leaves in ``out_dir``: ``model/`` (``m3d_lite.models.load_lamed`` reads it; stage 2 starts from
it), ``metrics.jsonl``, ``run.json`` and ``checkpoints/`` from the training loop.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset

from m3d_lite.config import TrainConfig
from m3d_lite.data.datasets import CaptionDataset, InstructCollator, VQADataset, mix_datasets
from m3d_lite.models.lamed import build_lamed, save_lamed
from m3d_lite.models.tokenizer import M3D_TOKENS
from m3d_lite.train.clip import TRAIN_KEYS
from m3d_lite.train.loop import TrainResult, save_artifact, train


def find_vision_encoder(path: str | os.PathLike | None) -> Path | None:
    """The stage-0 vision encoder folder: ``path`` itself, or ``path/vision_encoder`` for a run folder.

    None means a randomly initialised ViT (for tests), with a warning: the projector then aligns noise.
    """
    if path is None:
        warnings.warn(
            "no vision encoder given: stage 1 runs on a RANDOM ViT (fine for tests only)", stacklevel=3
        )
        return None
    folder = Path(path)
    return folder / "vision_encoder" if (folder / "vision_encoder").is_dir() else folder


def alignment_data(
    data_dir: str | os.PathLike,
    split: str,
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    chat_template: bool = True,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    augment: bool = False,
) -> Dataset:
    """M3D's stage-1 data: captions, closed VQA and open VQA of ``split`` (each VQA row twice), mixed by
    :func:`~m3d_lite.data.datasets.mix_datasets` (``weights=None``: in proportion to their sizes);
    ``augment=True``: M3D's training augmentation of the volumes (stage 2; M3D's stage 1 has none)."""
    args = (data_dir, split, tokenizer, num_image_tokens, max_length)
    common = {"seed": seed, "chat_template": chat_template, "augment": augment}
    tasks = [
        CaptionDataset(*args, **common),
        VQADataset(*args, closed=True, **common),
        VQADataset(*args, closed=False, **common),
    ]
    return mix_datasets(tasks, weights, seed=seed)


def embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and LM head weights of ``model``, once each (one when they are tied)."""
    weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    return list({id(w): w for w in weights}.values())


def freeze_for_alignment(model: nn.Module, new_token_ids: Sequence[int]) -> list[Any]:
    """Freeze all of ``model`` but ``mm_projector`` and the embedding rows of ``new_token_ids``.

    The rows are trained through a gradient hook that zeroes the gradient of every other row; with no
    weight decay on them AdamW then leaves those rows bit-identical. Returns the hook handles: call
    ``handle.remove()`` on each when training is over.
    """
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    handles = []
    for weight in embedding_weights(model):
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        mask[list(new_token_ids)] = 1
        weight.requires_grad_(True)
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def train_align(
    scale: str,
    data_dir: str | os.PathLike,
    vision_encoder: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    llm: str | None = None,
    task_weights: Sequence[float] | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[dict[str, float]], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Stage 1 at ``scale``: train the projector (+ new token rows) of a LaMed model built on the stage-0
    encoder ``vision_encoder`` (a ``vision_encoder/`` folder or the run folder holding it; None: random)
    and the LLM ``llm`` (None: the preset's), on the ``train`` split of ``data_dir``; save ``out_dir/model/``.

    ``overrides`` go to the ``train_align`` section when they name a :class:`TrainConfig` field
    (``learning_rate=5e-4``), else to the model (see ``build_lamed``). ``task_weights`` mixes captions,
    closed and open VQA (None: by size, as M3D). ``resume=True`` continues the run in ``out_dir``.
    """
    cfg = TrainConfig.from_scale(scale, "align", **{k: v for k, v in overrides.items() if k in TRAIN_KEYS})
    model_overrides = {k: v for k, v in overrides.items() if k not in TRAIN_KEYS}
    if cfg.weight_decay:
        raise ValueError(
            f"train_align needs weight_decay 0 (got {cfg.weight_decay}): AdamW's decay would shrink the "
            "frozen rows of an untied LM head, which must stay bit-identical (M3D uses 0 too)"
        )
    encoder = find_vision_encoder(vision_encoder)
    set_seed(cfg.seed)  # the projector's (and, without an encoder, the ViT's) random initialisation
    model, tokenizer = build_lamed(scale, vision_encoder=encoder, llm=llm, **model_overrides)
    handles = freeze_for_alignment(model, tokenizer.convert_tokens_to_ids(list(M3D_TOKENS)))
    config = model.config
    dataset = alignment_data(
        data_dir,
        "train",
        tokenizer,
        config.proj_out_num,
        config.model_max_length,
        config.chat_template,
        cfg.seed,
        task_weights,
    )
    settings = {
        "stage": "align",
        "scale": scale,
        "llm": config.llm_name,
        "vision_encoder": encoder and str(encoder),
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
        settings={**settings, "task_weights": task_weights, **model_overrides},
    )
    for handle in handles:
        handle.remove()
    save_artifact(Path(out_dir) / "model", lambda folder: save_lamed(result.model, tokenizer, folder))
    return result
