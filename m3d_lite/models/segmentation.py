"""M3D's promptable 3D mask decoder (SegVol's, M3D_FACTS 1.7): a volume and a prompt vector -> mask logits.

``SegModule(images B x 1 x D x H x W, prompts B x embed_dim) -> B x 1 x D x H x W`` logits. In LaMed the
prompt is the ``[SEG]`` state mapped by ``seg_projector``; here it is any vector of width ``embed_dim``.

- ``image_encoder``: the 3D ViT of :mod:`m3d_lite.models.vision` without its CLS token (SegVol builds
  MONAI's ``ViT`` with ``classification=False``); its tokens go back onto the patch grid, B x C x d x h x w.
- ``prompt_encoder``: the random Fourier positional encoding of the grid (a fixed Gaussian 3 x C/2 buffer,
  sin and cos -> C channels), ``no_mask_embed`` as the dense prompt, the prompt as the one sparse token.
- ``mask_decoder``: the output tokens [IoU, ``num_mask_tokens`` mask tokens] + the sparse token go through
  SAM's two-way transformer with the image; the image is upscaled x4 (ConvT C -> C/4, LayerNorm, GELU,
  ConvT C/4 -> C/8, GELU); each mask token's 3-layer MLP ("hypernetwork") gives C/8 weights, and a mask is
  their dot product with the upscaled image, plus the text-alignment term (Linear C -> C/8 of the prompt
  dotted with the same map). Mask 0 is kept (M3D: ``multimask_output=False``) and resized trilinearly to
  the input size.

From MONAI: the ViT, and (from VISTA3D, ``monai.networks.nets.vista3d``) SAM's ``TwoWayTransformer`` and
the hypernetwork ``MLP``. Written here: the positional encoding (MONAI's VISTA3D one orders the axes
differently from SegVol and fails once the module is cast to bf16: float32 coordinates times a bf16 buffer),
the prompt encoder's text path and the mask decoder around the transformer.

State-dict keys follow SegVol/M3D (``model.seg_module.`` prefix inside a LaMed checkpoint):

- kept: ``image_encoder.*`` (MONAI ViT names, no ``cls_token``);
  ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``, ``prompt_encoder.no_mask_embed.weight``;
  ``mask_decoder.iou_token.weight``, ``mask_decoder.mask_tokens.weight``;
  ``mask_decoder.transformer.{layers.{i}.*, final_attn_token_to_image.*, norm_final_attn.*}``;
  ``mask_decoder.output_upscaling.{0,1,3}.*``, ``mask_decoder.output_hypernetworks_mlps.{k}.layers.{0-2}.*``;
  ``mask_decoder.txt_align_upscaled_embedding.*``.
- renamed: ``mask_decoder.transformer.layers.{i}.mlp.lin1/lin2`` (SAM) are ``mlp.linear1/linear2`` (MONAI).
- dropped (M3D never uses them; unused parameters would also break DDP): ``prompt_encoder.point_embeddings.
  {0-3}``, ``prompt_encoder.not_a_point_embed``, ``prompt_encoder.mask_downscaling.*`` (in SegVol a 2D
  stack that cannot take a 3D mask anyway) and ``mask_decoder.iou_prediction_head.*`` (the IoU token stays:
  it attends with the others and so shapes mask 0). Mapping official weights = drop these, rename ``lin``.
- kept but idle: hypernetworks 1..3 feed only masks 1..3, which M3D throws away; they get zero gradients,
  in M3D as here, and exist so that the official weights load.

Two details differ from a plain SAM: SegVol's upscaling LayerNorm normalises over channels AND space (its
weight is C/4 x 2d x 2h x 2w, so the decoder is tied to one grid), and the grid PE encodes a cell as
(h, d, w) coordinates, SegVol's order (its ``x`` is the second axis).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from monai.losses import DiceLoss
from monai.networks.nets.vista3d import MLP, TwoWayTransformer
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from m3d_lite.config import load_preset
from m3d_lite.models.vision import VisionConfig, ViT3D, own_fields


@strict
class SegConfig(PreTrainedConfig):
    """The segmentation module's sizes; the defaults are M3D's (SegVol's ViT-B at 32 x 256 x 256).

    ``image_size`` .. ``use_sdpa`` shape the image encoder exactly as :class:`VisionConfig` does; its width
    ``hidden_size`` is also the decoder's width and the prompt's (``embed_dim``). ``decoder_*`` shape the
    two-way transformer (M3D: depth 2, 8 heads, MLP 2048), whose cross-attentions work at
    ``hidden_size / attention_downsample``. ``num_mask_tokens``: SegVol's 3 multimask outputs + 1.
    """

    model_type = "m3d_seg"

    image_size: list[int] | tuple[int, ...] = (32, 256, 256)
    patch_size: list[int] | tuple[int, ...] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    use_sdpa: bool = True
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample: int = 2
    num_mask_tokens: int = 4

    def __post_init__(self, **kwargs: Any) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        VisionConfig(**self.vision_fields())  # raises on a bad geometry or head count
        if self.hidden_size % 8:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 8 (upscaling to C/8)")
        cross_dim = self.hidden_size // self.attention_downsample
        if cross_dim % self.decoder_heads:
            raise ValueError(
                f"hidden_size / attention_downsample = {cross_dim} is not divisible by "
                f"decoder_heads {self.decoder_heads}"
            )
        if self.num_mask_tokens < 1:
            raise ValueError(f"num_mask_tokens must be >= 1, got {self.num_mask_tokens}")
        super().__post_init__(**kwargs)

    def vision_fields(self) -> dict[str, Any]:
        """The fields this config shares with :class:`VisionConfig` (the image encoder's)."""
        return {name: getattr(self, name) for name in own_fields(VisionConfig) - {"in_channels"}}

    @property
    def vision_config(self) -> VisionConfig:
        """The image encoder's config: a 1-channel ViT of this geometry and width."""
        return VisionConfig(**self.vision_fields())

    @property
    def embed_dim(self) -> int:
        """Width of the prompt vector (what the ``[SEG]`` projector must produce): the ViT's width."""
        return self.hidden_size

    @property
    def grid(self) -> tuple[int, int, int]:
        """The patch grid (d, h, w) of the image embedding."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size, strict=True))

    @property
    def upscale_channels(self) -> int:
        """Channels of the x4 upscaled image embedding (and of each hypernetwork's output): C/8."""
        return self.hidden_size // 8

    @classmethod
    def from_scale(cls, scale: str, **overrides: Any) -> SegConfig:
        """The ``segmentation`` section of preset ``scale`` with ``overrides`` (None values are ignored)."""
        preset = load_preset(scale)
        if "segmentation" not in preset:
            raise KeyError(f"preset {scale!r} has no section 'segmentation'; it has {sorted(preset)}")
        values = {**preset["segmentation"], **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(values) - own_fields(cls))
        if unknown:
            where = f"preset {scale!r} section 'segmentation'"
            raise KeyError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(own_fields(cls))}")
        return cls(**values)


class PositionEmbeddingRandom(nn.Module):
    """SAM's random Fourier features of grid positions: ``forward(grid) -> C x d x h x w`` in float32.

    A cell's centre, scaled to [-1, 1] per axis and taken in SegVol's order (h, d, w), is multiplied by a
    fixed 3 x C/2 Gaussian matrix; sin and cos of 2 pi times that give C channels. Computed in float32
    whatever the buffer's dtype: phases reach ~10 rad, where bf16 steps by 0.06.
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_pos_feats))

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        matrix = self.positional_encoding_gaussian_matrix.float()
        d, h, w = ((torch.arange(n, device=matrix.device, dtype=torch.float32) + 0.5) / n for n in grid)
        coords = torch.stack(torch.meshgrid(d, h, w, indexing="ij"), dim=-1)[..., [1, 0, 2]]
        phase = 2 * math.pi * ((2 * coords - 1) @ matrix)
        return torch.cat([phase.sin(), phase.cos()], dim=-1).permute(3, 0, 1, 2)


class PromptEncoder(nn.Module):
    """The text path of SegVol's prompt encoder: ``forward(prompts B x C) -> (sparse B x 1 x C, dense B x C
    x grid)``; ``dense_pe()`` is the 1 x C x grid positional encoding of the image embedding."""

    def __init__(self, embed_dim: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.grid).unsqueeze(0)

    def forward(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(len(prompts), -1, *self.grid)
        return prompts.unsqueeze(1), dense


class MaskDecoder(nn.Module):
    """SegVol's mask decoder: image embedding + prompts -> B x num_mask_tokens x 4d x 4h x 4w mask logits."""

    def __init__(self, config: SegConfig) -> None:
        super().__init__()
        width, up = config.hidden_size, config.upscale_channels
        self.iou_token = nn.Embedding(1, width)
        self.mask_tokens = nn.Embedding(config.num_mask_tokens, width)
        self.transformer = TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=width,
            num_heads=config.decoder_heads,
            mlp_dim=config.decoder_mlp_dim,
            attention_downsample_rate=config.attention_downsample,
        )
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(width, width // 4, kernel_size=2, stride=2),
            nn.LayerNorm((width // 4, *(2 * side for side in config.grid))),
            nn.GELU(),
            nn.ConvTranspose3d(width // 4, up, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(width, width, up, 3) for _ in range(config.num_mask_tokens)
        )
        self.txt_align_upscaled_embedding = nn.Linear(width, up)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        text_embedding: torch.Tensor,
    ) -> torch.Tensor:
        batch, width, *grid = image_embeddings.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        hs, src = self.transformer(image_embeddings + dense_prompt_embeddings, image_pe, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(batch, width, *grid)).flatten(2)
        mask_tokens_out = hs[:, 1 : 1 + len(self.output_hypernetworks_mlps)]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, k]) for k, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        text_align = self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1)
        masks = (hyper_in + text_align) @ upscaled  # (hyper . x) + (text . x) = (hyper + text) . x
        return masks.reshape(batch, -1, *(4 * side for side in grid))


class SegModule(nn.Module):
    """M3D's ``seg_module``: ``forward(images B x 1 x D x H x W, prompts B x embed_dim) -> B x 1 x D x H x W``
    mask logits (mask 0 of the decoder, resized trilinearly from the 4x patch grid to the input size)."""

    def __init__(self, config: SegConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ViT3D(config.vision_config)
        del self.image_encoder.cls_token  # SegVol's ViT has classification=False: patch tokens only
        self.prompt_encoder = PromptEncoder(config.embed_dim, config.grid)
        self.mask_decoder = MaskDecoder(config)

    def init_encoder_from(self, vit: ViT3D) -> None:
        """Copy a trained ViT (the LaMed vision tower, i.e. the stage-0 CLIP encoder) into the image
        encoder, all but its CLS token. M3D starts from SegVol's pretrained encoder instead; without those
        weights a CLIP-trained ViT of the same geometry is a far better start than a random one."""
        ours = {k: v for k, v in self.config.vision_fields().items() if k != "use_sdpa"}  # no weights
        theirs = {name: getattr(vit.config, name) for name in ours}
        if ours != theirs:
            differ = {name: (theirs[name], ours[name]) for name in sorted(ours) if ours[name] != theirs[name]}
            raise ValueError(
                f"cannot initialise the seg image encoder from a ViT of another geometry or width: "
                f"(ViT, seg encoder) differ in {differ}"
            )
        weights = {k: v for k, v in vit.state_dict().items() if k != "cls_token"}
        self.image_encoder.load_state_dict(weights, strict=True)

    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        expected = (1, *self.config.image_size)
        if images.ndim != 5 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"SegModule expects images B x {' x '.join(map(str, expected))} (its config's image_size), "
                f"got {tuple(images.shape)}"
            )
        if prompts.shape != (len(images), self.config.embed_dim):
            raise ValueError(
                f"SegModule expects prompts B x embed_dim = {len(images)} x {self.config.embed_dim} "
                f"(one per image, as wide as the ViT), got {tuple(prompts.shape)}"
            )
        tokens = self.image_encoder(images)  # B x N x C, raster order over the grid (D slowest)
        image_embeddings = tokens.transpose(1, 2).reshape(len(images), -1, *self.config.grid)
        sparse, dense = self.prompt_encoder(prompts)
        image_pe = self.prompt_encoder.dense_pe().to(image_embeddings.dtype)
        masks = self.mask_decoder(image_embeddings, image_pe, sparse, dense, prompts)
        return F.interpolate(masks[:, :1], size=self.config.image_size, mode="trilinear", align_corners=False)


_dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1.0, batch=False, reduction="mean")


def seg_losses(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """M3D's segmentation losses of B x 1 x D x H x W ``logits`` against 0/1 ``targets``: scalar ``dice``
    and ``bce``, computed in float32.

    ``dice`` is M3D's ``BinaryDiceLoss`` through MONAI: per sample 1 - 2 sum(p g) / (sum p + sum g + 1) with
    p = sigmoid(logits), then the batch mean. M3D adds the smoothing 1 to the denominator only
    (``smooth_nr=0``), so an empty target costs 1 whatever the prediction; M3D only scores rows with a mask.
    ``bce`` is ``BCEWithLogits`` averaged over all voxels. (M3D also maps targets of -1 to 0; ours have none.)
    """
    if logits.shape != targets.shape or logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(
            f"seg_losses expects logits and targets both B x 1 x D x H x W, "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    logits, targets = logits.float(), targets.float()
    return {"dice": _dice(logits, targets), "bce": F.binary_cross_entropy_with_logits(logits, targets)}


AutoConfig.register("m3d_seg", SegConfig, exist_ok=True)
