"""Stage 1 (train_align) at ci on a phantom: loss falls, frozen weights stay bit-identical, the model reloads
and generates, the CLI runs. One 30-step run (random ViT, tiny-llama) serves most tests."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed

from m3d_lite.config import TrainConfig
from m3d_lite.data.datasets import InstructCollator
from m3d_lite.models.lamed import build_lamed, load_lamed
from m3d_lite.models.tokenizer import M3D_TOKENS, encode_prompts
from m3d_lite.models.vision import VisionConfig, ViT3D, save_vision_encoder
from m3d_lite.train.__main__ import main
from m3d_lite.train.align import alignment_data, embedding_weights, freeze_for_alignment, train_align

STEPS = 30


@pytest.fixture(scope="module")
def root(phantom8):
    return phantom8


@pytest.fixture(scope="module")
def before():
    """The model train_align starts from: the same seed, the same build."""
    set_seed(TrainConfig.from_scale("ci", "align").seed)
    return build_lamed("ci")


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    with pytest.warns(UserWarning, match="RANDOM ViT"):
        result = train_align("ci", root, None, out, max_steps=STEPS, progress=False)
    return result


def fixed_batch(root, tokenizer, model) -> dict[str, torch.Tensor]:
    config = model.config
    data = alignment_data(root, "train", tokenizer, config.proj_out_num, config.model_max_length)
    return InstructCollator(tokenizer)([data[i] for i in range(0, len(data), len(data) // 8)][:8])


@torch.no_grad()
def loss_on(model, batch) -> float:
    return model.eval()(**batch).loss.item()


def test_loss_falls(root, run, before):
    model, tokenizer = before
    batch = fixed_batch(root, tokenizer, model)
    start, end = loss_on(model, batch), loss_on(run.model, batch)
    assert end < start - 0.02, f"loss on a fixed batch: {start:.4f} before, {end:.4f} after {STEPS} steps"
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, STEPS + 1, 5))
    assert records[-1]["loss"] == pytest.approx(run.final_loss)


def test_frozen_weights_bit_identical_new_rows_trained(run, before):
    model, tokenizer = before
    start, end = model.state_dict(), run.model.state_dict()
    assert start.keys() == end.keys()
    new_ids = tokenizer.convert_tokens_to_ids(list(M3D_TOKENS))
    embedding_names = {
        n for n, p in model.named_parameters() if any(p is w for w in embedding_weights(model))
    }
    for name, value in start.items():
        if name.startswith("mm_projector."):
            assert not torch.equal(value, end[name]), f"{name} did not train"
        elif name in embedding_names or name == "language_model.lm_head.weight":
            old = torch.ones(len(value), dtype=torch.bool)
            old[new_ids] = False
            assert torch.equal(value[old], end[name][old]), f"{name}: an old row changed"
            assert not torch.isclose(value[new_ids], end[name][new_ids]).all(dim=1).any(), f"{name}: new rows"
        else:
            assert torch.equal(value, end[name]), f"{name} changed but is frozen"
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == embedding_names | {n for n in trainable if n.startswith("mm_projector.")}
    assert not any(w._backward_hooks for w in embedding_weights(run.model))  # the gradient masks are gone


def test_untied_lm_head_rows_are_masked_too():
    """tiny-phi3 has an LM head of its own: both matrices keep their old rows after an AdamW step."""
    set_seed(0)
    model, tokenizer = build_lamed("ci", llm="tiny-phi3")
    weights = embedding_weights(model)
    assert len(weights) == 2
    start = [w.detach().clone() for w in weights]
    handles = freeze_for_alignment(model, tokenizer.convert_tokens_to_ids(list(M3D_TOKENS)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    batch = encode_prompts(tokenizer, ["Describe the scan."], model.config.proj_out_num)
    model(images=torch.rand(1, 1, 32, 64, 64), labels=batch["input_ids"], **batch).loss.backward()
    optimizer.step()
    for handle in handles:
        handle.remove()
    new_ids = sorted(tokenizer.convert_tokens_to_ids(list(M3D_TOKENS)))
    for before, after in zip(start, weights, strict=True):
        assert torch.equal(before[: new_ids[0]], after[: new_ids[0]])
    assert not torch.equal(start[1][new_ids], weights[1][new_ids])  # the LM head's new rows learn


def test_saved_model_reloads_and_generates(root, run):
    model, tokenizer = load_lamed(run.out_dir / "model")
    batch = fixed_batch(root, tokenizer, model)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, run.model.eval()(**batch).logits)
    prompts = encode_prompts(tokenizer, ["Describe the findings of this CT scan."], model.config.proj_out_num)
    new = model.generate(images=batch["images"][:1], **prompts, max_new_tokens=6, do_sample=False)
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 6
    assert isinstance(tokenizer.decode(new[0], skip_special_tokens=True), str)


def test_weight_decay_is_refused(root, tmp_path):
    with pytest.raises(ValueError, match="weight_decay 0"):
        train_align("ci", root, None, tmp_path, weight_decay=0.1)


def test_cli_runs_on_a_stage0_folder(root, tmp_path, capsys):
    clip_run = tmp_path / "clip"
    save_vision_encoder(ViT3D(VisionConfig.from_scale("ci")), clip_run / "vision_encoder")
    out = tmp_path / "align"
    argv = ["align", "--data", str(root), "--vision", str(clip_run), "--out", str(out), "--max-steps", "2"]
    assert main([*argv, "--set", "log_every=1"]) == 0
    assert "2 steps in" in capsys.readouterr().out
    assert main([*argv, "--set", "log_every=1", "--resume"]) == 0  # the same settings: done at once
    assert "2 steps in" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()
    settings = json.loads((out / "run.json").read_text())
    assert settings["stage"] == "align" and settings["vision_encoder"] == str(clip_run / "vision_encoder")
    assert main([*argv, "--set", "weight_decay=0.1"]) == 2
