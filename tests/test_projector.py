"""The projector: spp equals a hand-made block average, sizes follow from the grid, M3D's key names."""

import pytest
import torch

from m3d_lite.models import (
    LinearProjector,
    ProjectorConfig,
    SpatialPoolingProjector,
    VisionConfig,
    build_projector,
)
from m3d_lite.models.projector import spatial_pool


@pytest.mark.parametrize(
    ("scale", "grid", "tokens"),
    [("ci", (8, 8, 8), 64), ("small", (8, 8, 8), 64), ("paper", (8, 16, 16), 256)],
)
def test_preset_token_counts_follow_from_the_grid(scale, grid, tokens):
    vision = VisionConfig.from_scale(scale)
    config = ProjectorConfig.from_scale(scale)
    assert vision.grid == grid and config.out_num(vision.grid) == tokens
    projector = build_projector(config, vision.hidden_size, 32, vision.grid)
    assert isinstance(projector, SpatialPoolingProjector) and projector.proj_out_num == tokens


def test_spp_equals_a_manual_block_average_then_the_mlp():
    torch.manual_seed(0)
    grid, pool, channels = (4, 4, 6), 2, 3
    projector = SpatialPoolingProjector(channels, 5, grid, pooling_size=pool)
    tokens = torch.randn(2, 4 * 4 * 6, channels)
    on_grid = tokens.reshape(2, 4, 4, 6, channels)  # raster order, D slowest: token (d, h, w)
    manual = torch.stack(
        [
            on_grid[:, d : d + pool, h : h + pool, w : w + pool].mean(dim=(1, 2, 3))
            for d in range(0, 4, pool)
            for h in range(0, 4, pool)
            for w in range(0, 6, pool)
        ],
        dim=1,
    )
    assert manual.shape == (2, 12, channels)
    torch.testing.assert_close(projector(tokens), projector.projector(manual))
    linear, gelu, _ = projector.projector  # M3D's Linear-GELU-Linear, keys projector.0 / projector.2
    assert isinstance(linear, torch.nn.Linear) and isinstance(gelu, torch.nn.GELU)
    assert sorted(projector.state_dict()) == [
        f"projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")
    ]


def test_layer_type_linear_and_the_linear_projector():
    spp = build_projector(ProjectorConfig(layer_type="linear"), 8, 16, (2, 4, 4))
    assert spp(torch.randn(3, 32, 8)).shape == (3, 4, 16) and len(spp.projector) == 1
    linear = build_projector(ProjectorConfig(projector_type="linear"), 8, 16, (2, 4, 4))
    assert isinstance(linear, LinearProjector) and linear.proj_out_num == 32
    assert linear(torch.randn(3, 32, 8)).shape == (3, 32, 16)
    assert sorted(linear.state_dict()) == ["bias", "weight"]  # M3D's mm_projector.weight / .bias


def test_bad_settings_and_inputs_are_named():
    with pytest.raises(ValueError, match=r"patch grid \(8, 8, 6\) is not divisible by pooling_size 4"):
        SpatialPoolingProjector(8, 8, (8, 8, 6), pooling_size=4)
    with pytest.raises(ValueError, match="projector_type 'qformer' is not one of"):
        ProjectorConfig(projector_type="qformer")
    with pytest.raises(ValueError, match=r"expected 512 patch tokens \(grid \(8, 8, 8\)\), got 513"):
        SpatialPoolingProjector(8, 8, (8, 8, 8))(torch.randn(1, 513, 8))  # the CLS was not dropped


def test_spatial_pool_averages_blocks_in_raster_order():
    tokens = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 32, 1)  # grid (2, 4, 4), value = index
    pooled = spatial_pool(tokens, (2, 4, 4), 2)
    # block (0, 0, 0) holds indices {0, 1, 4, 5, 16, 17, 20, 21}; blocks run with w fastest
    assert pooled.flatten().tolist() == [10.5, 12.5, 18.5, 20.5]
    with pytest.raises(ValueError, match=r"expected 32 patch tokens \(grid \(2, 4, 4\)\), got 31"):
        spatial_pool(tokens[:, 1:], (2, 4, 4), 2)
