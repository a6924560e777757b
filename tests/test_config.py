"""Scale presets load, overrides apply, and mistakes are named."""

import pytest

from m3d_lite.config import SCALES, DataConfig


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
