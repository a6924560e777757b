"""M3D's 3D vision encoder: MONAI's ViT on 1 x D x H x W volumes, with a CLS token and no head.

``ViT3D`` is MONAI's ``ViT`` built exactly as M3D builds it (M3D_FACTS 1.2): "perceptron" patch
embedding (cut the volume into pd x ph x pw blocks, flatten each block, one Linear), learnable position
embedding, a CLS token put in front after the position embedding, pre-LN blocks with a bias-free qkv,
dropout 0. Its state-dict keys are exactly those of M3D's ``pretrained_ViT.bin`` (``cls_token``,
``patch_embedding.position_embeddings``, ``blocks.{i}.attn.qkv.weight``, ``norm.weight``, ...), so the
official weights load with a plain ``load_state_dict``. ``VisionTower`` is what the LLM sees: the patch
tokens without the CLS, like M3D's ``ViT3DTower`` with ``vision_select_feature="patch"``.

Paper scale: 1x32x256x256, patch 4x16x16 -> 8x16x16 = 2048 tokens of width 768, 87.4 M parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from huggingface_hub.dataclasses import strict
from monai.networks.nets import ViT
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from m3d_lite.config import load_preset
from m3d_lite.io import atomic_path

WEIGHTS_NAME = "model.safetensors"


@strict
class VisionConfig(PreTrainedConfig):
    """Geometry and width of the 3D ViT; the defaults are M3D's (paper scale).

    ``use_sdpa`` switches MONAI's attention to ``torch.nn.functional.scaled_dot_product_attention``
    (MONAI calls it ``use_flash_attention``): the same numbers up to float error (dropout is 0), about 3x
    faster at ci scale on a 2-core CPU, and on a GPU free to use fused kernels that never store the
    heads x 2049 x 2049 attention matrix. M3D ran the explicit softmax(QK^T / sqrt(d)) V; set it False to
    compare.
    """

    model_type = "m3d_vit"

    image_size: list[int] | tuple[int, ...] = (32, 256, 256)
    patch_size: list[int] | tuple[int, ...] = (4, 16, 16)
    in_channels: int = 1
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    use_sdpa: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.image_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"image_size {self.image_size} and patch_size {self.patch_size} must be D, H, W")
        for size, patch in zip(self.image_size, self.patch_size, strict=True):
            if size % patch:
                raise ValueError(f"image_size {self.image_size} is not divisible by patch {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        super().__post_init__(**kwargs)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid (D/pd, H/ph, W/pw): the token order is this grid in raster order, D slowest."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size, strict=True))

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (without the CLS)."""
        d, h, w = self.grid
        return d * h * w

    @classmethod
    def from_scale(cls, scale: str, **overrides: Any) -> VisionConfig:
        """The ``vision`` section of preset ``scale`` with ``overrides`` (None values are ignored)."""
        values = {**load_preset(scale)["vision"], **{k: v for k, v in overrides.items() if v is not None}}
        known = own_fields(cls)
        unknown = sorted(set(values) - known)
        if unknown:
            where = f"preset {scale!r} section 'vision'"
            raise KeyError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)


def own_fields(cls: type[PreTrainedConfig]) -> set[str]:
    """Field names a config class adds to transformers' ``PreTrainedConfig`` (the keys a preset may set)."""
    return set(cls.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__)


def patchify(images: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Cut ``images`` (B x C x D x H x W) into patch vectors: B x N x (pd*ph*pw*C).

    Tokens run over the patch grid in raster order (D slowest); inside a vector the order is
    (p1 p2 p3 c), channel fastest: exactly what MONAI's "perceptron" embedding feeds its Linear.
    """
    pd, ph, pw = patch_size
    return rearrange(images, "b c (d p1) (h p2) (w p3) -> b (d h w) (p1 p2 p3 c)", p1=pd, p2=ph, p3=pw)


class ViT3D(ViT):
    """M3D's 3D ViT (MONAI's ``ViT``): ``forward(images B x C x D x H x W) -> B x (1+N) x hidden``, CLS first.

    Built with ``classification=True`` for the CLS token; the classification head MONAI adds then is
    deleted (M3D never uses it), and so are the cross-attention parts that recent MONAI builds in every
    block even without cross-attention (a ``norm_cross_attn`` LayerNorm in 1.6): unused parameters would
    break DDP and would not match M3D's checkpoint.

    ``forward`` is MONAI's, less the list of per-block outputs that nothing reads, plus activation
    checkpointing: with ``gradient_checkpointing`` set (transformers' ``activation_checkpointing_enable`` on
    the model holding this ViT sets it, with ``_gradient_checkpointing_func``) each block's activations are
    recomputed in the backward pass instead of stored: 2049 tokens x 12 blocks at paper scale.
    """

    gradient_checkpointing = False

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            in_channels=config.in_channels,
            img_size=config.image_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            proj_type="perceptron",
            pos_embed_type="learnable",
            classification=True,
            dropout_rate=0.0,
            spatial_dims=3,
            qkv_bias=False,
        )
        del self.classification_head
        for block in self.blocks:
            del block.norm_cross_attn
            block.cross_attn = nn.Identity()  # already so in MONAI 1.6; a parameterised block before
            block.attn.use_flash_attention = config.use_sdpa  # MONAI's ViT does not pass this switch on
        self.config = config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.config.in_channels, *self.config.image_size)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            shape = " x ".join(map(str, expected))
            raise ValueError(f"ViT3D expects images B x {shape}, got {tuple(images.shape)}")
        tokens = self.patch_embedding(images)
        if hasattr(self, "cls_token"):  # the seg module's encoder has none (SegVol's classification=False)
            tokens = torch.cat((self.cls_token.expand(len(tokens), -1, -1), tokens), dim=1)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                tokens = self._gradient_checkpointing_func(block, tokens)
            else:
                tokens = block(tokens)
        return self.norm(tokens)


class VisionTower(nn.Module):
    """The LLM's view of a volume: ``forward(images) -> B x N x hidden`` patch tokens (CLS dropped).

    Holds the ViT as ``vision_tower``, so that inside a LaMed model the keys read
    ``model.vision_tower.vision_tower.*`` as in M3D's checkpoints.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = ViT3D(config)
        self.hidden_size = config.hidden_size
        self.grid = config.grid
        self.num_patches = config.num_patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(images)[:, 1:]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VisionTower:
        """A tower around the ViT that :func:`save_vision_encoder` wrote to folder ``path``."""
        weights = read_vision_weights(path)
        tower = cls(VisionConfig.from_pretrained(path))
        tower.vision_tower.load_state_dict(weights)
        return tower


def save_vision_encoder(vit: ViT3D, path: str | os.PathLike) -> Path:
    """Write ``vit`` to folder ``path``: ``config.json`` + ``model.safetensors``.

    The weight keys are those of M3D's ``pretrained_ViT.bin`` (no prefix).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    vit.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return folder


def read_vision_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ViT state dict in folder ``path`` (written by :func:`save_vision_encoder`)."""
    folder = Path(path)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no vision encoder in {folder}: expected {WEIGHTS_NAME} and config.json "
            "(written by save_vision_encoder, e.g. by `m3d-lite train clip` in OUT/vision_encoder/)"
        )
    return load_file(str(folder / WEIGHTS_NAME))


def load_vision_encoder(path: str | os.PathLike) -> ViT3D:
    """Load the ViT saved by :func:`save_vision_encoder` (strict: every key must match)."""
    weights = read_vision_weights(path)
    vit = ViT3D(VisionConfig.from_pretrained(path))
    vit.load_state_dict(weights)
    return vit


AutoConfig.register("m3d_vit", VisionConfig, exist_ok=True)
