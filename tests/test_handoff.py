"""Notebook hand-offs: a later notebook finds the earlier run next to its OUTPUT_DIR or says why not."""

import pytest
import torch

from m3d_lite.course.handoff import stage0_encoder, stage1_run
from m3d_lite.models.vision import VisionConfig, ViT3D, save_vision_encoder


def test_stage0_encoder_found_missing_or_of_another_scale(tmp_path, capsys):
    out_dir = tmp_path / "runs" / "03_projector_alignment"
    assert stage0_encoder("", out_dir, "ci") is None and "the ViT is RANDOM" in capsys.readouterr().out
    torch.manual_seed(0)
    clip_run = tmp_path / "runs" / "02_clip_pretraining" / "clip"
    save_vision_encoder(ViT3D(VisionConfig.from_scale("ci")), clip_run / "vision_encoder")
    assert stage0_encoder("", out_dir, "ci") == clip_run / "vision_encoder"
    with pytest.raises(ValueError, match=r"trained on \[32, 64, 64\] volumes, scale small has \[32, 128"):
        stage0_encoder("", out_dir, "small")
    with pytest.raises(FileNotFoundError, match="nowhere: no vision_encoder in it"):
        stage0_encoder(tmp_path / "nowhere", out_dir, "ci")


def test_stage1_run_refuses_a_given_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="empty: no model/config.json in it"):
        stage1_run(tmp_path / "empty", tmp_path / "out", "ci", tmp_path)
