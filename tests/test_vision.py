"""The 3D ViT: M3D's geometry and checkpoint layout, the patch embedding spelled out, save and reload."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m3d_lite.models.vision import (
    VisionConfig,
    VisionTower,
    ViT3D,
    load_vision_encoder,
    patchify,
    save_vision_encoder,
)

M3D_KEYS = Path("/work/shared/reference/m3d_paper_scale_keys.json")
M3D_TOWER_PREFIX = "model.vision_tower.vision_tower."


def tiny_config(**overrides) -> VisionConfig:
    values = dict(
        image_size=(8, 8, 8), patch_size=(2, 4, 4), hidden_size=8, mlp_dim=16, num_layers=1, num_heads=2
    )
    return VisionConfig(**{**values, **overrides})


def test_ci_vit_gives_cls_plus_patch_tokens_and_the_tower_drops_the_cls():
    torch.manual_seed(0)
    config = VisionConfig.from_scale("ci")
    assert config.grid == (8, 8, 8) and config.num_patches == 512
    images = torch.rand(2, 1, *config.image_size)
    tower = VisionTower(config)
    tokens = tower.vision_tower(images)
    assert tokens.shape == (2, 1 + 512, 64)
    assert torch.equal(tower(images), tokens[:, 1:])
    assert (tower.hidden_size, tower.grid, tower.num_patches) == (64, (8, 8, 8), 512)


def m3d_vit_layout(hidden=768, mlp=3072, tokens=2048, patch_dim=1024, layers=12) -> dict[str, list[int]]:
    """Key -> shape of M3D's ``pretrained_ViT.bin`` (M3D_STATE_DICT.md, vision tower table)."""
    layout = {
        "cls_token": [1, 1, hidden],
        "patch_embedding.position_embeddings": [1, tokens, hidden],
        "patch_embedding.patch_embeddings.1.weight": [hidden, patch_dim],
        "patch_embedding.patch_embeddings.1.bias": [hidden],
        "norm.weight": [hidden],
        "norm.bias": [hidden],
    }
    for i in range(layers):
        block = {
            "mlp.linear1.weight": [mlp, hidden],
            "mlp.linear1.bias": [mlp],
            "mlp.linear2.weight": [hidden, mlp],
            "mlp.linear2.bias": [hidden],
            "norm1.weight": [hidden],
            "norm1.bias": [hidden],
            "attn.out_proj.weight": [hidden, hidden],
            "attn.out_proj.bias": [hidden],
            "attn.qkv.weight": [3 * hidden, hidden],
            "norm2.weight": [hidden],
            "norm2.bias": [hidden],
        }
        layout.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return layout


def test_paper_vit_has_m3d_checkpoint_keys_shapes_and_87m_parameters():
    with torch.device("meta"):  # no memory, no init: builds the 87 M model in milliseconds
        tower = VisionTower(VisionConfig.from_scale("paper"))
    ours = {k: list(v.shape) for k, v in tower.vision_tower.state_dict().items()}
    assert ours == m3d_vit_layout()  # 138 tensors: pretrained_ViT.bin loads into tower.vision_tower as is
    assert all(
        k.startswith("vision_tower.") for k in tower.state_dict()
    )  # -> model.vision_tower.vision_tower.*
    assert sum(p.numel() for p in tower.parameters()) == 87_389_184
    assert tower.num_patches == 2048


@pytest.mark.skipif(
    not M3D_KEYS.exists(), reason="M3D's observed key list is only on the course's build machines"
)
def test_the_layout_is_the_one_observed_in_m3d_lamed():
    entries = json.loads(M3D_KEYS.read_text())["lamed_phi3"]
    observed = {k[len(M3D_TOWER_PREFIX) :]: s for k, s, _ in entries if k.startswith(M3D_TOWER_PREFIX)}
    assert observed == m3d_vit_layout()


def test_patch_embedding_is_patchify_then_linear_plus_position():
    torch.manual_seed(0)
    config = tiny_config(in_channels=2)
    vit = ViT3D(config)
    images = torch.randn(3, 2, 8, 8, 8)
    patches = patchify(images, config.patch_size)
    assert patches.shape == (3, 4 * 2 * 2, 2 * 4 * 4 * 2)
    # token (d, h, w) = (1, 0, 1) of the 4 x 2 x 2 grid is raster index 5; its vector is (p1 p2 p3 c)
    block = images[1, :, 2:4, 0:4, 4:8]
    assert torch.equal(patches[1, 1 * 4 + 0 * 2 + 1], block.permute(1, 2, 3, 0).reshape(-1))
    linear = vit.patch_embedding.patch_embeddings[1]
    expected = patches @ linear.weight.T + linear.bias + vit.patch_embedding.position_embeddings
    torch.testing.assert_close(vit.patch_embedding(images), expected)


def test_sdpa_attention_equals_the_explicit_softmax():
    torch.manual_seed(0)
    explicit = ViT3D(tiny_config(use_sdpa=False, num_layers=2))
    fused = ViT3D(tiny_config(use_sdpa=True, num_layers=2))
    fused.load_state_dict(explicit.state_dict())
    images = torch.rand(2, 1, 8, 8, 8)
    torch.testing.assert_close(fused(images), explicit(images), atol=1e-5, rtol=1e-5)


def test_saved_vision_encoder_reloads_into_a_tower_with_identical_tokens(tmp_path):
    torch.manual_seed(0)
    vit = ViT3D(tiny_config())
    folder = save_vision_encoder(vit, tmp_path / "vision_encoder")
    assert set(load_file(folder / "model.safetensors")) == set(vit.state_dict())
    images = torch.rand(2, 1, 8, 8, 8)
    tower = VisionTower.from_pretrained(folder)
    assert tower.config.to_dict() == vit.config.to_dict()
    assert torch.equal(tower(images), vit(images)[:, 1:])
    assert torch.equal(load_vision_encoder(folder)(images), vit(images))


def test_mistakes_are_named(tmp_path):
    with pytest.raises(ValueError, match="expects images B x 1 x 8 x 8 x 8, got"):
        ViT3D(tiny_config())(torch.rand(1, 1, 8, 8, 4))
    with pytest.raises(ValueError, match="not divisible by patch"):
        tiny_config(image_size=(8, 8, 6))
    with pytest.raises(KeyError, match="hiden_size.*expected some of"):
        VisionConfig.from_scale("ci", hiden_size=32)
    with pytest.raises(FileNotFoundError, match="no vision encoder in"):
        load_vision_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected model.safetensors and config.json"):
        VisionTower.from_pretrained(tmp_path)
