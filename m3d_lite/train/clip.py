"""Stage 0: pretrain M3D-CLIP (3D ViT + text encoder, symmetric InfoNCE) on M3D-Cap image-report pairs.

The same call runs in a notebook and, through ``python -m m3d_lite.train clip``, under ``accelerate launch``
(the loss gathers embeddings across processes, so 8 GPUs x 32 make one 256-pair contrastive batch as in M3D).
What it leaves in ``out_dir``:

- ``model/``: the whole CLIP model and its tokenizer (``m3d_lite.models.load_clip`` reads it, e.g. for the
  retrieval benchmark);
- ``vision_encoder/``: the ViT alone, which the later stages load into their vision tower (M3D's
  ``pretrained_ViT.bin``);
- ``metrics.jsonl`` and ``checkpoints/`` from the training loop.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from m3d_lite.config import TrainConfig
from m3d_lite.data.datasets import CapDataset, ClipCollator
from m3d_lite.models.clip import build_clip, save_clip
from m3d_lite.train.loop import TrainResult, save_artifact, train

TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def train_clip(
    scale: str,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Train M3D-CLIP at ``scale`` on the ``train`` split of ``data_dir``; save it to ``out_dir/model/`` and
    its ViT to ``out_dir/vision_encoder/``.

    ``overrides`` go to the ``train_clip`` section when they name a :class:`TrainConfig` field
    (``learning_rate=5e-4``), else to the model (``hidden_size=32``, ``temperature="m3d"``). ``resume=True``
    continues the run in ``out_dir`` from its latest checkpoint.
    """
    cfg = TrainConfig.from_scale(scale, "clip", **{k: v for k, v in overrides.items() if k in TRAIN_KEYS})
    model_overrides = {k: v for k, v in overrides.items() if k not in TRAIN_KEYS}
    set_seed(cfg.seed)  # the ViT's random initialisation
    model, tokenizer = build_clip(scale, **model_overrides)
    dataset = CapDataset(data_dir, "train", tokenizer, model.config.max_text_len, seed=cfg.seed)
    result = train(
        model,
        dataset,
        ClipCollator(tokenizer),
        cfg,
        out_dir,
        resume=resume,
        max_steps=max_steps,
        progress=progress,
        settings={"stage": "clip", "scale": scale, **model_overrides},
    )
    out = Path(out_dir)
    save_artifact(out / "model", lambda folder: save_clip(result.model, tokenizer, folder))
    save_artifact(out / "vision_encoder", result.model.save_vision_encoder)
    return result
