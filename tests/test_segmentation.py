"""The mask decoder: shapes at every scale, gradients, M3D's losses, a quick overfit, SegVol's key names."""

import math

import pytest
import torch
from monai.networks.nets.vista3d import PositionEmbeddingRandom as MonaiPositionEmbeddingRandom

from m3d_lite.config import DataConfig
from m3d_lite.models.segmentation import PositionEmbeddingRandom, SegConfig, SegModule, seg_losses


def ci_module(seed: int = 0) -> SegModule:
    torch.manual_seed(seed)
    return SegModule(SegConfig.from_scale("ci"))


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def expected_parameters(c: SegConfig) -> int:
    """Closed-form parameter count of the module as M3D_FACTS 1.7 describes it (without the dropped parts)."""
    width, up, n_masks = c.hidden_size, c.hidden_size // 8, c.num_mask_tokens
    vit_block = 4 * width + 3 * width * width + linear(width, width) + linear(width, c.mlp_dim)
    vit_block += linear(c.mlp_dim, width)
    vit = math.prod(c.grid) * width + linear(math.prod(c.patch_size), width) + c.num_layers * vit_block
    vit += 2 * width  # final LayerNorm; no cls_token

    def attention(downsample: int) -> int:
        inner = width // downsample
        return 3 * linear(width, inner) + linear(inner, width)

    layer = attention(1) + 2 * attention(c.attention_downsample) + 4 * 2 * width
    layer += linear(width, c.decoder_mlp_dim) + linear(c.decoder_mlp_dim, width)
    transformer = c.decoder_depth * layer + attention(c.attention_downsample) + 2 * width
    upscaling = width * (width // 4) * 8 + width // 4 + 2 * (width // 4) * math.prod(2 * s for s in c.grid)
    upscaling += (width // 4) * up * 8 + up
    hyper = n_masks * (2 * linear(width, width) + linear(width, up))
    decoder = (1 + n_masks) * width + transformer + upscaling + hyper + linear(width, up)
    return vit + width + decoder  # + no_mask_embed


def test_ci_output_has_the_input_size_and_the_parameter_count():
    module = ci_module()
    config = module.config
    assert config.grid == (8, 8, 8) and config.embed_dim == 64 and config.upscale_channels == 8
    logits = module(torch.rand(2, 1, 32, 64, 64), torch.randn(2, 64))
    assert logits.shape == (2, 1, 32, 64, 64) and torch.isfinite(logits).all()
    count = sum(p.numel() for p in module.parameters())
    print(f"ci seg module: {count:,} parameters")
    assert count == expected_parameters(config)


def test_paper_shape_on_the_meta_device():
    config = SegConfig.from_scale("paper")
    assert config.to_dict() == SegConfig().to_dict()  # the defaults are M3D's
    with torch.device("meta"):
        module = SegModule(config)
        logits = module(torch.empty(1, 1, 32, 256, 256), torch.empty(1, 768))
    assert logits.shape == (1, 1, 32, 256, 256)
    assert module.mask_decoder.output_upscaling[1].weight.shape == (192, 16, 32, 32)  # M3D_FACTS 1.7
    assert module.mask_decoder.txt_align_upscaled_embedding.weight.shape == (96, 768)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in module.named_children()}
    print(f"paper seg module: {counts} = {sum(counts.values()):,} parameters")
    assert counts["image_encoder"] == 87_389_184 - 768  # M3D's ViT (test_vision) without its CLS
    assert sum(counts.values()) == expected_parameters(config) == 117_049_216


@pytest.mark.parametrize("scale", ["ci", "small", "paper"])
def test_preset_image_size_is_the_data_shape(scale):
    config = SegConfig.from_scale(scale)
    assert config.image_size == DataConfig.from_scale(scale).image_shape


def test_from_scale_overrides_unknown_keys_and_save_load(tmp_path):
    SegConfig.from_scale("ci").save_pretrained(tmp_path)
    assert SegConfig.from_pretrained(tmp_path).image_size == (32, 64, 64)
    assert SegConfig.from_scale("ci", decoder_depth=1, num_layers=None).decoder_depth == 1
    with pytest.raises(KeyError, match="decoder_dept"):
        SegConfig.from_scale("ci", decoder_dept=1)
    with pytest.raises(ValueError, match="decoder_heads 5"):
        SegConfig.from_scale("ci", decoder_heads=5)


def test_the_prompt_steers_the_mask_and_gradients_reach_every_trained_part():
    module = ci_module()
    images = torch.rand(2, 1, 32, 64, 64)
    prompts = torch.randn(2, 64, requires_grad=True)
    logits = module(images, prompts)
    assert not torch.allclose(logits, module(images, torch.randn(2, 64)))
    losses = seg_losses(logits, (images > 0.5).float())
    (losses["dice"] + losses["bce"]).backward()
    assert prompts.grad.abs().sum() > 0
    idle = "mask_decoder.output_hypernetworks_mlps."  # 1..3 feed only masks M3D drops: zero, not None (DDP)
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        if name.startswith(idle) and not name.startswith(idle + "0."):
            assert parameter.grad.abs().sum() == 0, name
        else:
            assert parameter.grad.abs().sum() > 0, name


def test_losses_equal_m3d_formulas():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 4, 5, 6)
    targets = (torch.rand(3, 1, 4, 5, 6) > 0.6).float()
    targets[2] = 0  # an empty mask: M3D's Dice is 1 for it whatever the prediction
    p, g = torch.sigmoid(logits).flatten(1), targets.flatten(1)
    dice = (1 - 2 * (p * g).sum(1) / (p.sum(1) + g.sum(1) + 1)).mean()  # M3D's BinaryDiceLoss
    bce = -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits)))
    losses = seg_losses(logits, targets)
    torch.testing.assert_close(losses["dice"], dice)
    torch.testing.assert_close(losses["bce"], bce.mean())
    assert losses["dice"].ndim == losses["bce"].ndim == 0
    with pytest.raises(ValueError, match=r"\(3, 1, 4, 5, 6\) and \(3, 1, 4, 5\)"):
        seg_losses(logits, targets[..., 0])


def test_a_few_adam_steps_fit_one_volume():
    module = ci_module()
    image = torch.rand(1, 1, 32, 64, 64)
    target = torch.zeros(1, 1, 32, 64, 64)
    target[..., 8:24, 16:40, 20:44] = 1
    prompt = torch.randn(1, 64)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    totals = []
    for _ in range(8):
        losses = seg_losses(module(image, prompt), target)
        total = losses["dice"] + losses["bce"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    print("dice + bce:", " ".join(f"{t:.3f}" for t in totals))
    assert totals[-1] < totals[0] - 0.1


def test_segvol_key_names():
    keys = set(ci_module().state_dict())
    official = [
        "image_encoder.patch_embedding.position_embeddings",
        "image_encoder.patch_embedding.patch_embeddings.1.weight",
        "image_encoder.blocks.0.attn.qkv.weight",
        "image_encoder.norm.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.no_mask_embed.weight",
        "mask_decoder.iou_token.weight",
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
        "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight",
        "mask_decoder.transformer.norm_final_attn.weight",
        "mask_decoder.output_upscaling.0.weight",
        "mask_decoder.output_upscaling.1.weight",
        "mask_decoder.output_upscaling.3.weight",
        "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
        "mask_decoder.txt_align_upscaled_embedding.weight",
    ]
    assert set(official) <= keys
    assert "mask_decoder.transformer.layers.0.mlp.linear1.weight" in keys  # SegVol: mlp.lin1
    dropped = (
        "cls_token",
        "iou_prediction_head",
        "point_embeddings",
        "not_a_point_embed",
        "mask_downscaling",
    )
    assert not [key for key in keys if any(part in key for part in dropped)]


def test_positional_encoding_is_monais_with_segvols_axis_order():
    torch.manual_seed(0)
    ours = PositionEmbeddingRandom(8)
    monai = MonaiPositionEmbeddingRandom(8)
    monai.positional_encoding_gaussian_matrix.copy_(ours.positional_encoding_gaussian_matrix[[1, 0, 2]])
    torch.testing.assert_close(ours((2, 3, 4)), monai((2, 3, 4)))
    assert ours.to(torch.bfloat16)((2, 3, 4)).dtype == torch.float32


def test_bf16_module_runs():
    module = ci_module().to(torch.bfloat16)
    logits = module(
        torch.rand(1, 1, 32, 64, 64, dtype=torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16)
    )
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_clear_errors_for_wrong_image_or_prompt_size():
    module = ci_module()
    with pytest.raises(ValueError, match=r"B x 1 x 32 x 64 x 64 .*got \(1, 1, 32, 128, 128\)"):
        module(torch.rand(1, 1, 32, 128, 128), torch.randn(1, 64))
    with pytest.raises(ValueError, match=r"1 x 64 .*got \(1, 32\)"):
        module(torch.rand(1, 1, 32, 64, 64), torch.randn(1, 32))
