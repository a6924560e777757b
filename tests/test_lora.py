"""LoRA on LaMed's LLM (models.lora): targets derived from the LLM, merge == unmerged, save/reload, export.
Tiny random models built in place; no training (the adapter's B is drawn at random so that it matters)."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

import m3d_lite.models  # noqa: F401  (registers LaMed with the Auto classes)
from m3d_lite.models.lamed import LaMedForCausalLM, build_lamed, load_lamed
from m3d_lite.models.lora import (
    ADAPTER_DIR,
    BASE_DIR,
    LoraSettings,
    apply_lora,
    export_merged,
    load_lamed_lora,
    lora_targets,
    merge_lora,
    save_lamed_lora,
    trainable_parameter_names,
)
from m3d_lite.models.tokenizer import encode_prompts

LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PHI3 = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # Phi-3 fuses q/k/v and gate/up


@pytest.fixture(scope="module")
def adapted():
    """tiny-llama with an adapter whose B is random (a fresh one is zero: merging would prove nothing)."""
    set_seed(0)
    model, tokenizer = build_lamed("ci")
    model = apply_lora(model, LoraSettings.from_scale("ci"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def inputs(adapted):
    model, tokenizer = adapted
    questions = ["Describe the findings of this CT scan.", "Which organ is abnormal?"]
    prompts = encode_prompts(tokenizer, questions, model.config.proj_out_num)
    return {"images": torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0)), **prompts}


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def tokens(model, inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize(("llm", "leaves"), [("tiny-llama", LLAMA), ("tiny-phi3", PHI3)])
def test_targets_are_every_llm_linear_but_the_lm_head(llm, leaves):
    set_seed(0)
    model, _ = build_lamed("ci", llm=llm)
    targets = lora_targets(model)
    layers = model.config.text_config.num_hidden_layers
    assert {name.rsplit(".", 1)[-1] for name in targets} == leaves
    assert len(targets) == len(set(targets)) == layers * len(leaves)
    assert all(name.startswith("language_model.model.layers.") for name in targets)  # no ViT, head, projector


def test_apply_lora_trains_only_the_adapter_and_starts_as_the_model():
    set_seed(0)
    model, tokenizer = build_lamed("ci", llm="tiny-phi3")
    prompts = encode_prompts(tokenizer, ["Describe the scan."], model.config.proj_out_num)
    batch = {"images": torch.rand(1, 1, 32, 64, 64), **prompts}
    before, targets = logits(model.eval(), batch), lora_targets(model)
    wrapped = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)).eval()
    names = trainable_parameter_names(wrapped)
    assert all(".lora_A." in n or ".lora_B." in n for n in names) and len(names) == 2 * len(targets)
    assert torch.equal(logits(wrapped, batch), before)  # B = 0: the adapter adds nothing yet


def test_merged_model_equals_the_adapted_one(adapted, inputs):
    model, tokenizer = adapted
    unmerged, unmerged_tokens = logits(model, inputs), tokens(model, inputs)
    with model.disable_adapter():
        assert not torch.allclose(logits(model, inputs), unmerged, atol=1e-3)  # the adapter matters
    merged = merge_lora(copy.deepcopy(model))  # merging uses the model up; the fixture's stays whole
    assert type(merged) is LaMedForCausalLM
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, inputs), unmerged, atol=1e-5, rtol=0)
    assert torch.equal(tokens(merged, inputs), unmerged_tokens)


def test_saved_adapter_reloads_to_the_same_outputs(adapted, inputs, tmp_path):
    model, tokenizer = adapted
    with torch.no_grad():  # a weight stage 2 trains in full must travel in base/
        model.get_base_model().mm_projector.projector[0].bias.add_(0.5)
    save_lamed_lora(model, tokenizer, tmp_path / "model")
    assert (tmp_path / "model" / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (tmp_path / "model" / BASE_DIR / "model.safetensors").is_file()
    reloaded, _ = load_lamed_lora(tmp_path)  # the run folder holding model/ works too
    original, again = model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original), "a weight changed on the round trip"
    assert torch.equal(logits(reloaded.eval(), inputs), logits(model, inputs))
    assert torch.equal(tokens(reloaded, inputs), tokens(model, inputs))


def test_export_writes_a_plain_checkpoint_that_both_loaders_read(adapted, inputs, tmp_path):
    model, tokenizer = adapted
    save_lamed_lora(model, tokenizer, tmp_path / "model")
    out = export_merged(tmp_path / "model", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("adapter*")) and not list(tmp_path.glob(".merged*"))  # atomic: no leftovers
    plain, _ = load_lamed(out)
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain) is type(auto) is LaMedForCausalLM
    expected = logits(model, inputs)
    for loaded in (plain, auto):
        torch.testing.assert_close(logits(loaded.eval(), inputs), expected, atol=1e-5, rtol=0)
    assert torch.equal(tokens(plain, inputs), tokens(model, inputs))


def test_export_of_a_folder_without_adapter_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no adapter"):
        export_merged(tmp_path, tmp_path / "merged")
