"""M3D-CLIP (stage 0): a 3D ViT and a text encoder trained to agree on which report belongs to which scan.

As in M3D (M3D_FACTS 1.3): the CLS token of each tower goes through a Linear projection
(``mm_vision_proj``, ``mm_language_proj``) and is L2-normalised; the loss is the symmetric InfoNCE
``(CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2`` over the GLOBAL batch. M3D projects
every token and then takes the CLS; projecting only the CLS gives the same numbers for less work.
M3D projects 768 -> 768 on both sides; here both sides go to ``embed_dim`` (the ViT width unless set), so a
64-wide ViT and the 384-wide MiniLM meet in one space.

Text pooling (``config.text_pooling``): ``"cls"`` is M3D's (BERT's CLS was pretrained to summarise the
sentence); ``"mean"`` averages the token states over the attention mask, which is how MiniLM was trained
(small scale) and what lets a random tiny BERT (ci scale) learn at all: its CLS state barely depends on the
text at initialisation, so image and text embeddings start collapsed and the loss sits at ln(batch).

Temperature (``config.temperature``), both learnable and initialised at ln(1/0.07) = 2.659:
- ``"m3d"``: logits = logit_scale * cos, the raw parameter multiplied as is (no exp, no clamp), faithfully
  M3D. Its effective initial inverse temperature is therefore 2.66, not OpenAI CLIP's 14.3.
- ``"standard"``: logits = min(exp(logit_scale), 100) * cos, as OpenAI CLIP (initially 14.3).

Several processes: every process all-gathers the image and text embeddings WITH gradients and computes
the same global N x N logits with labels arange(N), as M3D does (``gather_loss=True, local_loss=False``),
so the loss on every rank equals the one-process loss on the concatenated batch. Each rank back-propagates
that same loss; the gather's backward sums the R copies into each rank's own embeddings and DDP's gradient
average divides by R again, so the parameter gradients also equal the one-process ones. All ranks need the
same local batch size (accelerate's ``even_batches=True`` default guarantees it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import ModelOutput

from m3d_lite.config import load_preset
from m3d_lite.models.pretrained import TINY_BERT, load_text_tokenizer, resolve_pretrained
from m3d_lite.models.vision import VisionConfig, ViT3D, own_fields, save_vision_encoder

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_INVERSE_TEMPERATURE = 100.0
BERT_BASE_NAMES = ("bert-base-uncased", "google-bert/bert-base-uncased")
TEMPERATURES = ("m3d", "standard")
TEXT_POOLINGS = ("cls", "mean")


def vision_config_dict(config: VisionConfig) -> dict[str, Any]:
    """The ViT's own fields as plain JSON values (what ``M3DClipConfig.vision_config`` holds)."""
    fields = own_fields(VisionConfig)
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in sorted(config.to_dict().items()) if k in fields
    }


def text_config_dict(text_model: str, max_text_len: int) -> dict[str, Any]:
    """The config of text tower ``text_model`` as a dict.

    ``"tiny-bert"`` and bert-base-uncased (whose config is transformers' ``BertConfig()`` default) are built
    here, so that ci- and paper-scale configs need no Hub; other names are read with ``AutoConfig``.
    """
    if text_model in BERT_BASE_NAMES:
        config = BertConfig()
    elif text_model == TINY_BERT:
        config = BertConfig(
            vocab_size=30522,  # MiniLM's uncased WordPiece vocabulary, whose tokenizer it uses
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=max(512, max_text_len),
        )
    else:
        config = AutoConfig.from_pretrained(resolve_pretrained(text_model))
    if config.max_position_embeddings < max_text_len:
        raise ValueError(
            f"text model {text_model!r} has {config.max_position_embeddings} positions, "
            f"fewer than max_text_len {max_text_len}"
        )
    return config.to_diff_dict()


@strict
class M3DClipConfig(PreTrainedConfig):
    """M3D-CLIP's settings: ViT geometry, text tower (name + full config, so no Hub is needed to rebuild it),
    ``max_text_len`` in tokens, ``temperature`` ("m3d" | "standard") and ``text_pooling`` ("cls" | "mean"),
    see the module docstring, and ``embed_dim`` of the shared space (None -> the ViT width). Defaults are
    M3D's paper setting."""

    model_type = "m3d_clip"

    vision_config: dict | None = None
    text_model: str = "bert-base-uncased"
    text_config: dict | None = None
    max_text_len: int = 512
    temperature: str = "m3d"
    text_pooling: str = "cls"
    embed_dim: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        for name, allowed in (("temperature", TEMPERATURES), ("text_pooling", TEXT_POOLINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"clip config: {name} {getattr(self, name)!r} is not one of {allowed}")
        if self.vision_config is None:
            self.vision_config = vision_config_dict(VisionConfig())
        if self.text_config is None:
            self.text_config = text_config_dict(self.text_model, self.max_text_len)
        if self.embed_dim is None:
            self.embed_dim = self.vision_config["hidden_size"]
        super().__post_init__(**kwargs)

    @classmethod
    def from_scale(cls, scale: str, **overrides: Any) -> M3DClipConfig:
        """Sections ``vision`` and ``clip`` of preset ``scale``; an override goes to whichever section owns
        its key (e.g. ``hidden_size=32`` or ``temperature="m3d"``); None values are ignored."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        vision_keys = own_fields(VisionConfig)
        clip_keys = own_fields(cls) - {"vision_config", "text_config"}
        unknown = sorted(set(overrides) - vision_keys - clip_keys)
        if unknown:
            known = sorted(vision_keys | clip_keys)
            raise KeyError(f"clip config: unknown key(s) {unknown}; expected some of {known}")
        vision = VisionConfig.from_scale(scale, **{k: v for k, v in overrides.items() if k in vision_keys})
        clip = {**load_preset(scale)["clip"], **{k: v for k, v in overrides.items() if k in clip_keys}}
        return cls(vision_config=vision_config_dict(vision), **clip)


@dataclass
class M3DClipOutput(ModelOutput):
    """``loss`` and the global logits (N x N over all processes); the embeddings are this process's own."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the autograd path to each piece.

    Uses ``_functional_collectives.all_gather_single``, the replacement that torch 2.13's deprecation
    warning for ``torch.distributed.nn.all_gather`` names (same numbers, autograd included, no warning).
    One process (or no process group) returns ``x`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return funcol.all_gather_single(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is (image i, text i); mean of the image->text and text->image CE."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


class M3DClipModel(PreTrainedModel):
    """ViT3D + text encoder + two projections + a learnable temperature (see the module docstring)."""

    config_class = M3DClipConfig
    main_input_name = "images"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True  # the ViT's blocks and the text encoder's layers

    def __init__(self, config: M3DClipConfig) -> None:
        super().__init__(config)
        self.vision_encoder = ViT3D(VisionConfig(**config.vision_config))
        # no pooler: M3D never uses it, and parameters without gradients break DDP
        text_config = AutoConfig.for_model(**config.text_config)
        self.text_encoder = AutoModel.from_config(text_config, add_pooling_layer=False)
        self.mm_vision_proj = nn.Linear(self.vision_encoder.config.hidden_size, config.embed_dim)
        self.mm_language_proj = nn.Linear(text_config.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep every module's own initialisation, as M3D did under transformers 4 (MONAI's truncated normal
        for the patch and position embeddings, zeros for the CLS, PyTorch's defaults elsewhere); transformers
        5's default would redraw every Linear from N(0, 0.02)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """B x 1 x D x H x W volumes -> B x E unit vectors (projected CLS token)."""
        return F.normalize(self.mm_vision_proj(self.vision_encoder(images)[:, 0]), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B x L token ids -> B x E unit vectors (projected CLS token, or masked mean of the tokens)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(self.mm_language_proj(pooled), dim=-1)

    def inverse_temperature(self) -> torch.Tensor:
        """Factor on the cosines: ``logit_scale`` ("m3d") or ``min(exp(logit_scale), 100)`` ("standard")."""
        if self.config.temperature == "m3d":
            return self.logit_scale
        return self.logit_scale.exp().clamp(max=MAX_INVERSE_TEMPERATURE)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> M3DClipOutput:
        image_embeds = self.encode_image(images)
        text_embeds = self.encode_text(input_ids, attention_mask)
        all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        logits_per_image = self.inverse_temperature() * all_images @ all_texts.T
        return M3DClipOutput(
            loss=clip_loss(logits_per_image),
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    def save_vision_encoder(self, path: str | os.PathLike) -> Path:
        """Write the ViT alone (config.json + model.safetensors) for the later stages' ``VisionTower``."""
        return save_vision_encoder(self.vision_encoder, path)


def load_pretrained_text_encoder(model: M3DClipModel) -> None:
    """Copy the pretrained weights of ``model.config.text_model`` into ``model.text_encoder``."""
    pretrained = AutoModel.from_pretrained(resolve_pretrained(model.config.text_model))
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("pooler.")}
    model.text_encoder.load_state_dict(state)


def build_clip(scale: str, **overrides: Any) -> tuple[M3DClipModel, PreTrainedTokenizerBase]:
    """A fresh M3D-CLIP at ``scale`` (random ViT, pretrained text tower unless tiny-bert) + tokenizer."""
    model = M3DClipModel(M3DClipConfig.from_scale(scale, **overrides))
    if model.config.text_model != TINY_BERT:
        load_pretrained_text_encoder(model)
    return model, load_text_tokenizer(model.config.text_model)


def save_clip(model: M3DClipModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Save model and tokenizer into one self-contained folder that :func:`load_clip` reads offline."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def load_clip(path: str | os.PathLike) -> tuple[M3DClipModel, PreTrainedTokenizerBase]:
    """Read a folder written by :func:`save_clip`: ``(model, tokenizer)``."""
    return M3DClipModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


AutoConfig.register("m3d_clip", M3DClipConfig, exist_ok=True)
AutoModel.register(M3DClipConfig, M3DClipModel, exist_ok=True)
