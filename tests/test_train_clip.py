"""Stage 0 end to end on a 12-volume phantom: ``train_clip`` and ``python -m m3d_lite.train clip``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m3d_lite.data.phantom_dataset import write_phantom_dataset
from m3d_lite.models.clip import load_clip
from m3d_lite.models.vision import load_vision_encoder
from m3d_lite.train.__main__ import main, parse_overrides
from m3d_lite.train.clip import train_clip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip") / "phantom"
    write_phantom_dataset(root, num_volumes=20, scale="ci", seed=0)  # 16 training pairs: one ci batch
    return root


def test_train_clip_saves_a_model_and_a_vision_encoder_that_reload(data_dir, tmp_path):
    result = train_clip("ci", data_dir, tmp_path, max_steps=6, progress=False)
    assert result.steps == 6 and math.isfinite(result.final_loss)
    steps = [json.loads(line)["step"] for line in result.metrics_path.read_text().splitlines()]
    assert steps == [5, 6]  # the ci preset logs every 5 steps, and at the end
    model, tokenizer = load_clip(tmp_path / "model")
    trained = result.model.state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, trained[name]), name
    assert tokenizer("a liver cyst")["input_ids"][0] == tokenizer.cls_token_id
    vit = load_vision_encoder(tmp_path / "vision_encoder")
    for name, weight in vit.state_dict().items():
        assert torch.equal(weight, trained[f"vision_encoder.{name}"]), name
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["checkpoints", "metrics.jsonl", "model", "run.json", "vision_encoder"]


def test_cli_trains_with_overrides_then_resume_returns_at_once(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "m3d_lite.train", "clip", "--scale", "ci", "--data", str(data_dir)]
    command += [
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--set",
        "hidden_size=32",
        "--set",
        "learning_rate=1e-4",
    ]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 steps in" in done.stdout
    assert json.loads((out / "model" / "config.json").read_text())["vision_config"]["hidden_size"] == 32
    resume = ["clip", "--data", str(data_dir), "--out", str(out), "--max-steps", "2", "--resume"]
    assert main(resume) == 2  # without the run's --set values
    assert "hidden_size: 32 then, None now" in capsys.readouterr().err
    assert main([*resume, "--set", "hidden_size=32", "--set", "learning_rate=1e-4"]) == 0
    assert "2 steps in" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_2"]


def test_cli_errors_name_the_problem(data_dir, tmp_path, capsys):
    assert main(["clip", "--data", str(data_dir), "--out", str(tmp_path), "--resume"]) == 2
    assert str(tmp_path / "checkpoints") in capsys.readouterr().err
    assert main(["clip", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "M3D_Cap.json" in capsys.readouterr().err
    assert (
        main(["clip", "--data", str(data_dir), "--out", str(tmp_path / "y"), "--set", "no_such_key=1"]) == 2
    )
    assert "no_such_key" in capsys.readouterr().err
    assert parse_overrides(["learning_rate=1e-4", "image_size=[32, 64, 64]", "temperature=m3d"]) == {
        "learning_rate": 1e-4,
        "image_size": [32, 64, 64],
        "temperature": "m3d",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["learning_rate"])
