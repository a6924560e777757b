"""The shared training loop on a toy regression model: learning, metrics, checkpoints, exact resume,
gradient accumulation and the global batch, precision, gradient checkpointing (on a real LaMed), the
consolidated final model, the paper presets and launch configs, and a real two-process ``accelerate launch``
on CPU (:func:`accelerate_launch`, also used by ``test_launch.py``).

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
from accelerate.commands.launch import launch_command_parser
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from m3d_lite.config import TrainConfig
from m3d_lite.io import atomic_dir
from m3d_lite.models.lamed import build_lamed
from m3d_lite.models.lora import LoraSettings, apply_lora
from m3d_lite.models.tokenizer import encode_example
from m3d_lite.train.instruct import unfreeze_for_instruction
from m3d_lite.train.loop import (
    STATE_FILE,
    enable_gradient_checkpointing,
    parameter_groups,
    resolve_mixed_precision,
    train,
)

LAUNCH_CONFIGS = Path(__file__).resolve().parents[1] / "m3d_lite" / "configs" / "accelerate"
EIGHT = ("zero2", "zero3", "fsdp")  # the sharding 8-GPU launch configs: 8gpu_<name>.yaml
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


def accelerate_launch(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` (a script and its arguments, or ``-m module ...``) as two gloo
    processes on the CPU, the way ENVIRONMENT.md found to work with accelerate 1.15."""
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
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


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


def test_a_global_batch_is_kept_by_accumulating_and_recorded(tmp_path):
    """global_batch_size 8 from batch 4 on one process = 2 micro-batches per step = batch 8 at once."""
    whole = run(tmp_path / "whole", max_steps=7)
    kept = run(tmp_path / "kept", max_steps=7, batch_size=4, global_batch_size=8)
    for a, b in zip(whole.model.state_dict().values(), kept.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    derived = json.loads((tmp_path / "kept" / "run.json").read_text())["derived"]
    assert derived == {"processes": 1, "grad_accum_steps": 2, "global_batch_size": 8, "mixed_precision": "no"}
    with pytest.raises(
        ValueError, match="global_batch_size 10 is not a multiple of batch_size 4 x 1 process"
    ):
        run(tmp_path / "bad", batch_size=4, global_batch_size=10)
    with pytest.raises(ValueError, match="grad_accum_steps 4 contradicts global_batch_size 8"):
        run(tmp_path / "bad", batch_size=4, global_batch_size=8, grad_accum_steps=4)
    with pytest.raises(ValueError, match="global_batch_size must be a positive integer"):
        toy_config(global_batch_size=0)


def test_precision_auto_takes_the_launch_configs_and_a_preset_value_wins(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` passes on
    assert resolve_mixed_precision("auto") == "fp16"
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"


class TiedToy(nn.Module):
    """An embedding and an output layer sharing one weight (as SmolLM2's), a frozen layer and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mid = nn.Embedding(10, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight
        self.mid.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.cross_entropy(self.head(self.mid(self.embed(x)) * self.scale), y))


def test_the_final_model_is_consolidated_into_a_plain_copy_with_its_ties(tmp_path):
    start = TiedToy()
    data = [{"x": torch.tensor(i % 10), "y": torch.tensor((3 * i) % 10)} for i in range(16)]
    result = train(start, data, default_collate, toy_config(batch_size=4), tmp_path, progress=False)
    model = result.model
    assert isinstance(model, TiedToy) and model is not start
    assert model.head.weight is model.embed.weight  # still one parameter
    assert not any(p.is_meta for p in model.parameters()) and model.scale.item() == 0.5
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in start.parameters()]
    assert not torch.equal(model.embed.weight, TiedToy().embed.weight)  # trained
    assert torch.equal(model.mid.weight, TiedToy().mid.weight)  # frozen


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients():
    """LaMed at ci with LoRA and a seg module: the LLM's layers and both 3D ViTs (vision tower, seg encoder)
    run each block twice per step (forward, then again in the backward), for the same loss and gradients."""
    torch.manual_seed(0)
    lamed, tokenizer = build_lamed("ci", segmentation=True)
    model = apply_lora(lamed, LoraSettings(r=4, alpha=8, dropout=0.0))
    unfreeze_for_instruction(model)
    example = encode_example(tokenizer, "Segment the liver.", "It is [SEG].", lamed.config.proj_out_num, 256)
    masks = torch.zeros(1, 1, 32, 64, 64)
    masks[..., 8:20, 16:40, 20:44] = 1
    batch = {
        "images": torch.rand(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0)),
        "input_ids": example["input_ids"][None],
        "labels": example["labels"][None],
        "seg_masks": masks,
    }
    blocks = [
        lamed.vision_tower.vision_tower.blocks[0],
        lamed.seg_module.image_encoder.blocks[-1],
        lamed.language_model.model.layers[0].mlp,  # transformers checkpoints a layer's forward, not its hooks
    ]
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        calls[:] = [0] * len(blocks)
        torch.manual_seed(1)  # the seg projector's dropout draws the same mask
        loss = model.train()(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_gradients()
    assert calls == [1, 1, 1]
    enable_gradient_checkpointing(model)
    checkpointed_loss, checkpointed_grads = loss_and_gradients()
    assert calls == [2, 2, 2]
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    assert checkpointed_grads.keys() == grads.keys() and any("seg_module.image_encoder" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_on_a_model_without_it_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="ToyRegressor cannot checkpoint its activations"):
        run(tmp_path, gradient_checkpointing=True)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [  # M3D_FACTS 2.1: epochs, per-GPU batch, x 8 GPUs, lr, weight decay (LaMed/script/*.sh; Phi-3 finetune)
        ("clip", (100, 32, 256, 1e-4, 0.1)),
        ("align", (3, 16, 128, 1e-4, 0.0)),
        ("instruct", (5, 8, 64, 5e-5, 0.0)),
    ],
)
def test_paper_presets_are_m3ds_schedule_with_its_global_batch(stage, expected):
    cfg = TrainConfig.from_scale("paper", stage)
    got = (cfg.epochs, cfg.batch_size, cfg.global_batch_size, cfg.learning_rate, cfg.weight_decay)
    assert got == expected
    assert (cfg.warmup_ratio, cfg.grad_accum_steps, cfg.max_grad_norm, cfg.seed) == (0.03, 1, 1.0, 42)
    assert cfg.mixed_precision == "auto" and cfg.gradient_checkpointing is False


def test_weight_decay_spares_biases_norms_and_embeddings():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    model[2].requires_grad_(False)
    groups = {g["weight_decay"]: g for g in parameter_groups(model, 0.1, 1e-3)}
    assert groups[0.1]["params"] == [model[1].weight]
    assert groups[0.0]["params"] == [model[0].weight, model[1].bias]
    assert {g["lr"] for g in groups.values()} == {1e-3}


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
    """Read by accelerate's own loader; every DeepSpeed/FSDP key is an option of `accelerate launch` (a
    misspelt one would be dropped silently); ZeRO-3 and FSDP gather full weights for the final save."""
    expected = {
        "cpu.yaml": ("NO", 1, "no"),
        "1gpu.yaml": ("NO", 1, "bf16"),
        "8gpu_ddp.yaml": ("MULTI_GPU", 8, "bf16"),
        "8gpu_zero2.yaml": ("DEEPSPEED", 8, "bf16"),
        "8gpu_zero3.yaml": ("DEEPSPEED", 8, "bf16"),
        "8gpu_fsdp.yaml": ("FSDP", 8, "bf16"),
    }
    assert sorted(p.name for p in LAUNCH_CONFIGS.glob("*.yaml")) == sorted(expected)
    options = {action.dest for action in launch_command_parser()._actions}
    for name, values in expected.items():
        config = load_config_from_file(str(LAUNCH_CONFIGS / name))
        assert (config.distributed_type, config.num_processes, config.mixed_precision) == values
        assert set(config.deepspeed_config) | set(config.fsdp_config) <= options, name
    zero2, zero3, fsdp = (load_config_from_file(str(LAUNCH_CONFIGS / f"8gpu_{n}.yaml")) for n in EIGHT)
    assert (zero2.deepspeed_config["zero_stage"], zero3.deepspeed_config["zero_stage"]) == (2, 3)
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True  # LoRA: frozen and trained weights in one unit
    assert fsdp.fsdp_config["fsdp_activation_checkpointing"] is False  # TrainConfig.gradient_checkpointing


def test_two_cpu_processes_match_one_process_with_the_global_batch(tmp_path):
    """Two gloo ranks with batch 4 see together what one process with batch 8 sees, so weights agree."""
    out = tmp_path / "ddp"
    accelerate_launch(__file__, str(out))
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
