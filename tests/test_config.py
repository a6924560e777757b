"""Scale presets load, overrides apply, and mistakes are named."""

import pytest

from m3d_lite.config import SCALES, DataConfig, TrainConfig
from m3d_lite.models.lora import LoraSettings


@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_has_a_data_section_with_m3d_depth(scale):
    cfg = DataConfig.from_scale(scale)
    assert cfg.image_shape[0] == 32 and len(cfg.raw_shape) == 3 and cfg.num_volumes > 0


def test_overrides_apply_and_none_is_ignored():
    cfg = DataConfig.from_scale("ci", num_volumes=5, seed=None)
    assert cfg.num_volumes == 5 and cfg.seed == DataConfig.from_scale("ci").seed


def test_unknown_key_and_scale_are_named():
    with pytest.raises(KeyError, match="num_volume.*expected some of"):
        DataConfig.from_scale("ci", num_volume=3)
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        DataConfig.from_scale("huge")


@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_has_stage2_sections(scale):
    assert LoraSettings.from_scale(scale).r > 0
    assert TrainConfig.from_scale(scale, "instruct").weight_decay == 0.0


def test_paper_stage2_is_m3ds():
    """M3D_FACTS 2.1: LoRA r 16, alpha 32, dropout 0.05; Phi-3 finetune 5 epochs, 8 per GPU, lr 5e-5, bf16."""
    assert LoraSettings.from_scale("paper") == LoraSettings(r=16, alpha=32, dropout=0.05)
    cfg = TrainConfig.from_scale("paper", "instruct")
    assert (cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.warmup_ratio) == (5, 8, 5e-5, 0.03)
    assert cfg.mixed_precision == "auto"  # the launch config's: bf16 in every GPU config, as M3D
