"""M3D's multimodal projector: the ViT's patch tokens become a few "image tokens" of the LLM's width.

``spp`` (M3D's default, "spatial pooling perceiver"; M3D_FACTS 1.4) has no attention and no learned
queries: the N = d*h*w patch tokens go back onto their 3D grid, ``avg_pool3d`` averages p x p x p blocks,
the pooled grid is flattened in the same raster order (D slowest), and a token-wise MLP
(Linear-GELU-Linear; ``layer_type="linear"``: one Linear) maps each token to the LLM's width.
Paper: 8 x 16 x 16 = 2048 tokens -> 4 x 8 x 8 = 256 image tokens; ci and small: 8 x 8 x 8 -> 4 x 4 x 4 = 64.

``linear`` is M3D's other option: one Linear on all N tokens, no pooling (2048 image tokens at paper scale).

The number of image tokens (``proj_out_num``) follows from the grid and the pooling; nobody sets it by hand.
State-dict keys are M3D's (``projector.0.*``, ``projector.2.*`` for spp; ``weight``, ``bias`` for linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3d_lite.config import section_config

PROJECTOR_TYPES = ("spp", "linear")
LAYER_TYPES = ("mlp", "linear")


@dataclass(frozen=True)
class ProjectorConfig:
    """Section ``projector`` of a preset: which projector, its token-wise layers, and the pooling size.

    M3D's names for the same settings: ``mm_projector_type``, ``proj_layer_type``, ``proj_pooling_size``.
    M3D's "linear" layer type stacks ``proj_layer_num`` Linears without activation, which compose to one
    linear map; here it is one Linear.
    """

    projector_type: str = "spp"
    layer_type: str = "mlp"
    pooling_size: int = 2

    def __post_init__(self) -> None:
        for name, allowed in (("projector_type", PROJECTOR_TYPES), ("layer_type", LAYER_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"projector config: {name} {getattr(self, name)!r} is not one of {allowed}")
        if self.pooling_size < 1:
            raise ValueError(f"projector config: pooling_size must be >= 1, got {self.pooling_size}")

    @classmethod
    def from_scale(cls, scale: str, **overrides: Any) -> ProjectorConfig:
        """Section ``projector`` of preset ``scale`` with ``overrides`` (None values are ignored)."""
        return section_config(cls, scale, "projector", **overrides)

    def out_num(self, grid: tuple[int, ...]) -> int:
        """Number of image tokens this projector makes from a ViT with patch grid ``grid``."""
        if self.projector_type == "linear":
            return math.prod(grid)
        return math.prod(pooled_grid(grid, self.pooling_size))


def pooled_grid(grid: tuple[int, ...], pooling_size: int) -> tuple[int, ...]:
    """The grid after ``avg_pool3d(pooling_size)``; every side must be divisible (else tokens are dropped)."""
    if any(side % pooling_size for side in grid):
        raise ValueError(f"patch grid {tuple(grid)} is not divisible by pooling_size {pooling_size}")
    return tuple(side // pooling_size for side in grid)


def spatial_pool(tokens: torch.Tensor, grid: tuple[int, int, int], pooling_size: int) -> torch.Tensor:
    """B x N x C patch tokens on a ``grid`` (N = d*h*w, raster order, D slowest) -> B x N' x C tokens of the
    grid average-pooled by ``pooling_size`` in every direction, in the same raster order."""
    batch, num, channels = tokens.shape
    if num != math.prod(grid):
        raise ValueError(f"expected {math.prod(grid)} patch tokens (grid {tuple(grid)}), got {num}")
    volume = tokens.transpose(1, 2).reshape(batch, channels, *grid)
    # pooled in float32: PyTorch has no bf16 avg_pool3d on CPU, and a float32 mean is exact enough anyway
    pooled = F.avg_pool3d(volume.float(), kernel_size=pooling_size, stride=pooling_size)
    return pooled.to(tokens.dtype).flatten(2).transpose(1, 2)


def token_layers(in_dim: int, out_dim: int, layer_type: str) -> nn.Sequential:
    """The token-wise map to the LLM width: Linear-GELU-Linear ("mlp", M3D's) or one Linear ("linear")."""
    if layer_type == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, out_dim))


class SpatialPoolingProjector(nn.Module):
    """M3D's "spp": B x N x C patch tokens -> B x proj_out_num x out_dim (see the module docstring)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int, int],
        pooling_size: int = 2,
        layer_type: str = "mlp",
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.pooling_size = pooling_size
        self.proj_out_num = math.prod(pooled_grid(self.grid, pooling_size))
        self.projector = token_layers(in_dim, out_dim, layer_type)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projector(spatial_pool(tokens, self.grid, self.pooling_size))


class LinearProjector(nn.Linear):
    """M3D's "linear" projector: one Linear on every patch token (``proj_out_num`` = N, no pooling)."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int, int]) -> None:
        super().__init__(in_dim, out_dim)
        self.proj_out_num = math.prod(grid)


def build_projector(
    config: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int, int]
) -> SpatialPoolingProjector | LinearProjector:
    """The projector ``config`` asks for, from ViT width ``in_dim`` and patch grid ``grid`` to ``out_dim``."""
    if config.projector_type == "linear":
        return LinearProjector(in_dim, out_dim, grid)
    return SpatialPoolingProjector(in_dim, out_dim, grid, config.pooling_size, config.layer_type)
