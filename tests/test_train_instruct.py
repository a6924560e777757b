"""Stage 2 (train_instruct) at ci on a phantom: only LoRA, ViT, projector and embeddings learn, the LLM's own
weights stay bit-identical, the stage-1 weights are really restored, the loss falls, the saved model reloads,
the CLI runs and refuses a missing model. One short run from a hand-made stage-1 model serves most tests."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed
from peft.utils.save_and_load import get_base_model_state_dict
from safetensors.torch import load_file, save_file

from m3d_lite.cli import main as cli_main
from m3d_lite.config import TrainConfig
from m3d_lite.data.datasets import InstructCollator
from m3d_lite.models.lamed import build_lamed, load_lamed, save_lamed
from m3d_lite.models.lora import LoraSettings, apply_lora, load_lamed_lora
from m3d_lite.models.pretrained import load_llm_tokenizer
from m3d_lite.models.tokenizer import M3D_TOKENS, add_m3d_tokens, encode_prompts
from m3d_lite.train.__main__ import main
from m3d_lite.train.align import embedding_weights
from m3d_lite.train.instruct import (
    INSTRUCTION_TASKS,
    SEGMENTATION_TASKS,
    instruction_data,
    load_stage1,
    seg_state_items,
    train_instruct,
    unfreeze_for_instruction,
)

STEPS = 12


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 run folder whose projector and new token rows differ from any fresh build (as if trained),
    so that a stage 2 that did not restore them would be caught."""
    set_seed(1)
    model, tokenizer = build_lamed("ci")
    new_ids = tokenizer.convert_tokens_to_ids(list(M3D_TOKENS))
    with torch.no_grad():
        for parameter in model.mm_projector.parameters():
            parameter.add_(torch.randn_like(parameter))
        for weight in embedding_weights(model):
            weight[new_ids] += torch.randn_like(weight[new_ids])
    run = tmp_path_factory.mktemp("align")
    save_lamed(model, tokenizer, run / "model")
    return run


@pytest.fixture(scope="module")
def run(phantom8, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct")
    return train_instruct("ci", phantom8, stage1, out, max_steps=STEPS, progress=False)


def fixed_batch(root, tokenizer, model) -> dict[str, torch.Tensor]:
    config = model.config
    data = instruction_data(root, "train", tokenizer, config.proj_out_num, config.model_max_length)
    return InstructCollator(tokenizer)([data[i] for i in range(0, len(data), len(data) // 8)][:8])


@torch.no_grad()
def loss_on(model, batch) -> float:
    return model.eval()(**batch).loss.item()


def expected_trainable(model) -> set[str]:
    """What M3D trains in stage 2, named independently of the code under test."""
    lamed = "base_model.model."
    embeddings = {f"{lamed}language_model.model.embed_tokens.weight"}
    if model.get_base_model().config.text_config.tie_word_embeddings is False:
        embeddings.add(f"{lamed}language_model.lm_head.weight")
    return embeddings | {
        name
        for name, _ in model.named_parameters()
        if ".lora_A." in name
        or ".lora_B." in name
        or name.startswith((f"{lamed}vision_tower.", f"{lamed}mm_projector."))
    }


def test_instruction_data_mixes_seven_tasks_by_size_or_weight(phantom8):
    tokenizer = load_llm_tokenizer("tiny-llama")
    add_m3d_tokens(tokenizer)
    args = (phantom8, "train", tokenizer, 64, 256)
    data = instruction_data(*args, augment=True)
    tasks = [type(task).__name__ for task in data.datasets]
    assert tasks == ["CaptionDataset", *["VQADataset"] * 2, *["RECDataset"] * 2, *["REGDataset"] * 2]
    assert len(INSTRUCTION_TASKS) == len(tasks)
    assert [task.closed for task in data.datasets[1:3]] == [True, False]
    assert [task.description for task in data.datasets[3:]] == [False, True, False, True]
    assert all(task.augment for task in data.datasets)  # M3D augments every task in training
    only_rec = instruction_data(*args, weights=[0, 0, 0, 1, 1, 0, 0])
    rec_items = range(data.cumulative_sizes[2], data.cumulative_sizes[4])
    assert len(only_rec) == len(data) and set(only_rec.indices) <= set(rec_items)
    with_seg = instruction_data(*args, segmentation=True)
    seg_tasks = [type(task).__name__ for task in with_seg.datasets[len(tasks) :]]
    assert seg_tasks == ["SegTaskDataset", "SegTaskDataset", "RefSegDataset"]
    assert len(SEGMENTATION_TASKS) == len(seg_tasks)
    assert with_seg.cumulative_sizes[: len(tasks)] == data.cumulative_sizes  # the first seven stay in place


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi3"])  # tied / untied LM head
def test_only_lora_vision_projector_and_embeddings_get_gradients(llm):
    set_seed(0)
    model, tokenizer = build_lamed("ci", llm=llm)
    model = apply_lora(model, LoraSettings.from_scale("ci"))
    trainable = unfreeze_for_instruction(model)
    assert set(trainable) == expected_trainable(model)
    prompts = encode_prompts(tokenizer, ["Describe the scan."], model.config.proj_out_num)
    model(images=torch.rand(1, 1, 32, 64, 64), labels=prompts["input_ids"], **prompts).loss.backward()
    got_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got_grad == set(trainable), f"grads on {sorted(got_grad ^ set(trainable))[:5]}"


def test_stage1_weights_are_restored_and_a_partial_checkpoint_is_refused(stage1, tmp_path):
    saved = load_file(stage1 / "model" / "model.safetensors")
    model, _ = load_stage1(stage1)
    loaded = model.state_dict()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), f"{name} was not restored from stage 1"
    assert any(name.startswith("mm_projector.") for name in saved)
    assert "language_model.model.embed_tokens.weight" in saved
    broken = tmp_path / "model"
    save_lamed(model, load_lamed(stage1 / "model")[1], broken)
    save_file(
        {k: v for k, v in saved.items() if not k.startswith("mm_projector.")}, broken / "model.safetensors"
    )
    with pytest.raises(ValueError, match="missing_keys.*mm_projector"):
        load_stage1(broken)


def test_stage2_starts_from_stage1_and_moves_it_little(run, stage1):
    """A projector/new row re-initialised instead of restored would be far off: Adam moves a weight by
    about the learning rate per step (at most ~3x), so STEPS steps stay within a small band."""
    saved = load_file(stage1 / "model" / "model.safetensors")
    trained = get_base_model_state_dict(run.model)
    tokenizer = load_lamed(stage1 / "model")[1]
    new_ids = tokenizer.convert_tokens_to_ids(list(M3D_TOKENS))
    band = 3 * TrainConfig.from_scale("ci", "instruct").learning_rate * STEPS
    for name, value in saved.items():
        if name.startswith("mm_projector.") or name.endswith("embed_tokens.weight"):
            rows = value[new_ids] if name.endswith("embed_tokens.weight") else value
            moved = trained[name][new_ids] if name.endswith("embed_tokens.weight") else trained[name]
            assert (moved - rows).abs().max() <= band, f"{name} is not the stage-1 weight"


def test_llm_weights_bit_identical_the_rest_trained(run, stage1):
    start, end = load_file(stage1 / "model" / "model.safetensors"), get_base_model_state_dict(run.model)
    for name, value in start.items():
        if name.endswith("embed_tokens.weight") or name.startswith(("vision_tower.", "mm_projector.")):
            assert not torch.equal(value, end[name]), f"{name} did not train"
        else:
            assert name.startswith("language_model."), name
            assert torch.equal(value, end[name]), f"{name} is an LLM weight under LoRA but changed"
    lora_b = [p for n, p in run.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every adapter learned


def test_loss_falls(phantom8, stage1, run):
    before, tokenizer = load_lamed(stage1 / "model")
    batch = fixed_batch(phantom8, tokenizer, before)
    start, end = loss_on(before, batch), loss_on(run.model, batch)
    assert end < start - 0.2, f"loss on a fixed batch: {start:.4f} before, {end:.4f} after {STEPS} steps"
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 12]
    assert records[-1]["loss"] == pytest.approx(run.final_loss)


def test_saved_model_reloads_and_generates(phantom8, run):
    model, tokenizer = load_lamed_lora(run.out_dir)
    batch = fixed_batch(phantom8, tokenizer, model)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, run.model.eval()(**batch).logits)
    prompts = encode_prompts(tokenizer, ["Describe the findings of this CT scan."], model.config.proj_out_num)
    new = model.generate(images=batch["images"][:1], **prompts, max_new_tokens=6, do_sample=False)
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 6


def test_stage2_adds_and_trains_a_seg_module_on_seg_tasks(phantom8, stage1, run):
    model, tokenizer = load_lamed_lora(run.out_dir)
    base = model.get_base_model()
    assert load_stage1(stage1)[0].seg_module is None and base.seg_module is not None  # added in stage 2
    settings = json.loads((run.out_dir / "run.json").read_text())
    assert settings["segmentation"] is True and settings["seg_encoder_from_vision"] is True
    assert settings["seg_state_norm"] is True
    config = base.config
    data = instruction_data(
        phantom8, "train", tokenizer, config.proj_out_num, config.model_max_length, segmentation=True
    )
    refseg = data.datasets[-1]
    batch = InstructCollator(tokenizer)([refseg[0], refseg[1]])
    with torch.no_grad():
        output = model.eval()(**batch)
    assert output.seg_logits.shape == (2, 1, *config.seg_config.image_size) and output.dice_loss < 1


def test_seg_state_norm_is_fitted_on_the_stage1_seg_states(phantom8, stage1, run):
    before, tokenizer = load_stage1(stage1)
    items = list(seg_state_items(phantom8, tokenizer, before.config, count=9))
    assert len(items) == 9
    assert {"seg_mask" in item and "mask_id" in item for item in items} == {True, False}  # organs and RefSeg
    assert all((item["input_ids"] == before.config.seg_token_id).any() for item in items)
    seed = TrainConfig.from_scale("ci", "instruct").seed
    states = before.seg_states(
        seg_state_items(phantom8, tokenizer, before.config, seed=seed)
    )  # the 64 it used
    standardized = load_lamed_lora(run.out_dir)[0].get_base_model().seg_state_norm(states)
    torch.testing.assert_close(standardized.mean(0), torch.zeros(states.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardized.std(0), torch.ones(states.shape[1]), atol=1e-4, rtol=1e-4)


def test_cli_trains_resumes_and_exports(phantom8, stage1, tmp_path, capsys):
    out = tmp_path / "instruct"
    argv = ["instruct", "--data", str(phantom8), "--model", str(stage1 / "model"), "--out", str(out)]
    argv += ["--max-steps", "2", "--set", "log_every=1", "--set", "r=4"]
    assert main(argv) == 0
    assert "2 steps in" in capsys.readouterr().out
    assert main([*argv, "--resume"]) == 0  # the same settings: done at once
    settings = json.loads((out / "run.json").read_text())
    assert settings["stage"] == "instruct" and settings["model"] == str((stage1 / "model").resolve())
    assert settings["lora"]["r"] == 4
    assert cli_main(["export", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_cli_refuses_a_missing_model_and_an_unknown_key(phantom8, tmp_path, capsys):
    argv = ["train", "instruct", "--data", str(phantom8), "--out", str(tmp_path / "out")]
    assert cli_main([*argv, "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "config.json" in err and "align" in err
    assert not (tmp_path / "out").exists()
    assert main(["instruct", *argv[2:], "--model", str(tmp_path), "--set", "rank=4"]) == 2
    assert "rank" in capsys.readouterr().err
