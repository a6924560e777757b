"""The shared training loop on a toy regression model: learning, metrics, checkpoints, exact resume,
gradient accumulation, and a real two-process ``accelerate launch`` on CPU.

This file is also the script that the two-process test launches:
``accelerate launch ... tests/test_train_loop.py OUT_DIR`` trains the toy model and saves its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from m3d_lite.config import TrainConfig
from m3d_lite.io import atomic_dir
from m3d_lite.train.loop import STATE_FILE, parameter_groups, resolve_mixed_precision, train

LAUNCH_CONFIGS = Path(__file__).resolve().parents[1] / "m3d_lite" / "configs" / "accelerate"
METRIC_KEYS = {"step", "epoch", "loss", "lr", "samples_per_s", "seconds"}


class ToyRegressor(nn.Module):
    """A 2-layer MLP fitting y = w . x; ``forward(**batch)`` returns ``.loss`` like a HF model."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.mse_loss(self.net(x).squeeze(-1), y))


def toy_dataset(n: int = 40) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def toy_config(**overrides) -> TrainConfig:
    values = dict(
        batch_size=8,
        learning_rate=1e-2,
        max_steps=12,
        warmup_ratio=0.2,
        mixed_precision="no",
        save_every=6,
        log_every=2,
        seed=0,
    )
    return TrainConfig(**{**values, **overrides})


def run(out_dir: Path, dropout: float = 0.0, resume: bool = False, **overrides):
    return train(
        ToyRegressor(dropout),
        toy_dataset(),
        default_collate,
        toy_config(**overrides),
        out_dir,
        resume=resume,
        progress=False,
    )


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_falls_and_every_metrics_line_is_complete(tmp_path):
    result = run(tmp_path, max_steps=40, save_every=20)
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(2, 41, 2))
    assert all(set(r) == METRIC_KEYS for r in records)
    assert records[-1]["loss"] == result.final_loss < records[0]["loss"] / 3
    assert records[-1]["epoch"] == 40 / 5  # 40 samples / batch 8 = 5 steps per epoch
    peak = max(r["lr"] for r in records)
    assert peak <= 1e-2 and records[-1]["lr"] < peak / 10  # warm-up then cosine decay
    assert result.steps == 40 and isinstance(result.model, ToyRegressor)


def test_checkpoints_are_complete_atomic_and_only_the_last_two_kept(tmp_path):
    run(tmp_path, max_steps=13, save_every=4)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_12", "step_13"]  # 4, 8 pruned; 13 = the end
    names = {p.name for p in (folder / "step_13").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", STATE_FILE} <= names
    state = json.loads((folder / "step_13" / STATE_FILE).read_text())
    assert state["step"] == 13 and (state["epoch"], state["batch_in_epoch"]) == (2, 3)


def test_stop_and_resume_gives_identical_weights(tmp_path):
    """12 steps straight == 6 steps, crash (mid-epoch, mid-save, after logging step 8), resume to 12."""
    straight = run(tmp_path / "straight", dropout=0.1)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_6", resumed_dir / "checkpoints" / "step_6")
    (resumed_dir / "checkpoints" / ".tmp_step_12").mkdir()  # a save that was interrupted
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed_dir / "metrics.jsonl").write_text("".join(lines[:4]))  # logged up to step 8 before dying
    resumed = run(resumed_dir, dropout=0.1, resume=True)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.final_loss == straight.final_loss
    assert [r["step"] for r in read_metrics(resumed.metrics_path)] == [2, 4, 6, 8, 10, 12]
    assert not list((resumed_dir / "checkpoints").glob(".tmp*"))


def test_resume_of_a_finished_run_returns_the_trained_model_at_once(tmp_path):
    done = run(tmp_path)
    again = run(tmp_path, resume=True)
    assert again.steps == 12 and again.final_loss == done.final_loss
    for a, b in zip(done.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_needs_a_checkpoint_and_the_same_settings_and_a_fresh_run_starts_afresh(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "checkpoints")):
        run(tmp_path, resume=True)
    run(tmp_path, max_steps=4, save_every=2)
    run(tmp_path, max_steps=1)  # a fresh run starts afresh: the earlier run's checkpoints go
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_1"]
    with pytest.raises(ValueError, match="learning_rate: 0.01 then, 0.02 now"):
        run(tmp_path, max_steps=1, resume=True, learning_rate=2e-2)


def test_gradient_accumulation_2x4_equals_batch_8(tmp_path):
    whole = run(tmp_path / "whole", max_steps=7)
    accumulated = run(tmp_path / "accumulated", max_steps=7, batch_size=4, grad_accum_steps=2)
    for a, b in zip(whole.model.state_dict().values(), accumulated.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_weight_decay_spares_biases_norms_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    model[2].requires_grad_(False)
    groups = {g["weight_decay"]: g for g in parameter_groups(model, 0.1, 1e-3)}
    assert groups[0.1]["params"] == [model[1].weight]
    assert groups[0.0]["params"] == [model[0].weight, model[1].bias]
    assert {g["lr"] for g in groups.values()} == {1e-3}
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")


def test_module_learning_rates_pick_submodules_by_name():
    model = nn.ModuleDict(
        {"llm": nn.Linear(4, 4), "seg_module": nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))}
    )
    groups = parameter_groups(model, 0.1, 1e-4, {"seg_module": 1e-3})
    by_rate = {(g["lr"], g["weight_decay"]): g["params"] for g in groups}
    seg = model["seg_module"]
    assert by_rate == {
        (1e-4, 0.1): [model["llm"].weight],
        (1e-4, 0.0): [model["llm"].bias],
        (1e-3, 0.1): [seg[0].weight],
        (1e-3, 0.0): [seg[0].bias, seg[1].weight, seg[1].bias],
    }
    seg.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['seg_module'\].*trainable top-level parts are \['llm'\]"):
        parameter_groups(model, 0.1, 1e-4, {"seg_module": 1e-3})


def test_a_module_learning_rate_trains_only_that_module_when_the_rest_has_none(tmp_path):
    start = ToyRegressor().net
    trained = run(tmp_path, learning_rate=0.0, module_learning_rates={"3": 1e-2}).model.net
    assert torch.equal(trained[0].weight, start[0].weight) and torch.equal(trained[0].bias, start[0].bias)
    assert not torch.equal(trained[3].weight, start[3].weight)


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as folder:
        (folder / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as folder:
        (folder / "a").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as folder:
        (folder / "b").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_launch_configs_are_valid_accelerate_configs():
    expected = {
        "cpu.yaml": ("NO", 1, "no"),
        "1gpu.yaml": ("NO", 1, "bf16"),
        "8gpu_ddp.yaml": ("MULTI_GPU", 8, "bf16"),
        "8gpu_deepspeed.yaml": ("DEEPSPEED", 8, "bf16"),
    }
    assert sorted(p.name for p in LAUNCH_CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, values in expected.items():
        config = load_config_from_file(str(LAUNCH_CONFIGS / name))
        assert (config.distributed_type, config.num_processes, config.mixed_precision) == values
        if name == "8gpu_deepspeed.yaml":
            assert config.deepspeed_config["zero_stage"] == 2


def test_two_cpu_processes_match_one_process_with_the_global_batch(tmp_path):
    """Two gloo ranks with batch 4 see together what one process with batch 8 sees, so weights agree."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(LAUNCH_CONFIGS / "cpu.yaml"),
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        __file__,
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]  # one writer: no line twice
    saved = {p.name for p in (out / "checkpoints" / "step_12").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= saved  # every rank saved its RNG states
    single = run(tmp_path / "single")
    for name, weight in torch.load(out / "final.pt").items():
        torch.testing.assert_close(weight, single.model.state_dict()[name], rtol=0, atol=1e-5)


if __name__ == "__main__":
    from accelerate import PartialState

    result = run(Path(sys.argv[1]), batch_size=4)
    if PartialState().is_main_process:
        torch.save(result.model.state_dict(), Path(sys.argv[1]) / "final.pt")
