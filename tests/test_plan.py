"""m3d_lite.plan: exact counts (meta-device models against real ones and against what the training stages
leave trainable), activation formulas against what autograd really saves, ZeRO sharding, the CLI table,
clear errors, and the paper plan offline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from m3d_lite.cli import main
from m3d_lite.models.lamed import LaMedForCausalLM
from m3d_lite.models.segmentation import seg_losses
from m3d_lite.models.vision import VisionConfig
from m3d_lite.plan import (
    GIB,
    Setup,
    bert_activations,
    llm_activations,
    plan_stage,
    seg_activations,
    stage_model,
    vit_activations,
)
from m3d_lite.train.align import train_align
from m3d_lite.train.clip import train_clip
from m3d_lite.train.instruct import train_instruct

CPU = Setup(gpus=0, zero=0, gpu_mem_gib=24)


@pytest.fixture(scope="module")
def trained(phantom8, tmp_path_factory):
    """One step of each real stage at ci (clip -> align -> instruct): the models they leave behind."""
    root = tmp_path_factory.mktemp("plan")
    clip = train_clip("ci", phantom8, root / "clip", max_steps=1, batch_size=4, progress=False)
    align = train_align("ci", phantom8, root / "clip", root / "align", max_steps=1, progress=False)
    instruct = train_instruct("ci", phantom8, root / "align", root / "instruct", max_steps=1, progress=False)
    return {"clip": clip.model, "align": align.model, "instruct": instruct.model}


@pytest.mark.parametrize("stage", ["clip", "align", "instruct"])
def test_counts_equal_the_real_models_the_stages_train(trained, stage):
    model = trained[stage]
    plan = plan_stage(stage, "ci", CPU)
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(p.device.type == "meta" for p in stage_model(stage, "ci").parameters())


def saved_elements(run, module: nn.Module) -> float:
    """fp32 elements autograd keeps for the backward while ``run()`` runs: every distinct storage that is
    not one of ``module``'s parameters, counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values()) / 4


def test_encoder_formulas_match_what_autograd_saves(trained):
    clip = trained["clip"].train()
    vision = VisionConfig(**clip.config.vision_config)
    images = torch.rand(2, 1, *vision.image_size)
    ids = torch.randint(0, 1000, (2, clip.config.max_text_len))
    vit = saved_elements(lambda: clip.vision_encoder(images), clip)
    bert = saved_elements(lambda: clip.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids)), clip)
    assert vit / 2 == pytest.approx(vit_activations(vision, True, CPU, 4), rel=0.03)
    bert_config = clip.text_encoder.config
    assert bert / 2 == pytest.approx(bert_activations(bert_config, ids.shape[1], CPU, 4), rel=0.03)


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_llm_formula_matches_what_autograd_saves(trained, stage):
    model = trained[stage].train()
    lamed = model.get_base_model() if stage == "instruct" else model
    config = lamed.config
    embeds = torch.randn(2, config.model_max_length, config.text_config.hidden_size, requires_grad=True)
    saved = saved_elements(lambda: lamed.language_model(inputs_embeds=embeds), model)
    expected = llm_activations(lamed.language_model, config.text_config, config.model_max_length, CPU, 4)
    assert saved / 2 == pytest.approx(expected, rel=0.03)


def test_seg_formula_matches_what_autograd_saves(trained):
    lamed = trained["instruct"].get_base_model().train()
    config = lamed.config.seg_config
    images = torch.rand(2, 1, *config.image_size)
    targets = (torch.rand_like(images) > 0.5).float()
    prompts = torch.randn(2, config.embed_dim, requires_grad=True)
    saved = saved_elements(lambda: seg_losses(lamed.seg_module(images, prompts), targets), lamed)
    assert saved / 2 == pytest.approx(seg_activations(config, CPU, 4), rel=0.05)


def test_memory_shards_as_zero_says():
    one, eight = (plan_stage("instruct", "paper", Setup(gpus=n, zero=3)) for n in (1, 8))
    assert one.weights == 2 * one.parameters and eight.weights == one.weights / 8
    assert eight.optimizer == 12 * eight.trainable / 8 and eight.gradients == 2 * eight.trainable / 8
    zero2 = plan_stage("instruct", "paper", Setup(gpus=8, zero=2))
    assert zero2.weights == 2 * zero2.parameters and zero2.gradients == 2 * zero2.trainable / 8
    ddp = plan_stage("instruct", "paper", Setup(gpus=8, zero=0))  # fp32 weights + autocast's bf16 copies
    assert ddp.weights > 4 * ddp.parameters and ddp.gradients == 2 * 4 * ddp.trainable
    assert ddp.optimizer == 8 * ddp.trainable and ddp.total > zero2.total


def test_checkpointing_and_sdpa_change_activations_only():
    base = plan_stage("align", "paper", Setup())
    checkpointed = plan_stage("align", "paper", Setup(gradient_checkpointing=True))
    explicit = plan_stage("align", "paper", Setup(sdpa=False))
    assert checkpointed.activations < base.activations / 2 < explicit.activations
    assert checkpointed.flops_per_sample > base.flops_per_sample
    assert checkpointed.weights == base.weights and explicit.optimizer == base.optimizer


def test_paper_plan_is_offline_and_fits_m3d_setting():
    phi3 = {s: plan_stage(s, "paper", Setup(gpus=8, gpu_mem_gib=80)) for s in ("clip", "align", "instruct")}
    assert all(p.fits for p in phi3.values()) and all(p.hours > 1 for p in phi3.values())
    assert phi3["instruct"].parameters == pytest.approx(4.07e9, rel=0.01)  # Phi-3-mini 3.8 B + ViT + SegVol
    llama = plan_stage("align", "paper", Setup(), llm="llama2")
    assert llama.parameters == pytest.approx(phi3["align"].parameters + 2.9e9, rel=0.02)  # Llama-2-7B: 6.7 B
    lamed = stage_model("align", "paper", llm="llama2")
    assert isinstance(lamed, LaMedForCausalLM) and lamed.config.text_config.vocab_size == 32004
    assert not plan_stage("instruct", "paper", Setup(gpus=8, gpu_mem_gib=16)).fits


def test_cli_prints_a_table_naming_each_stage(capsys):
    assert main(["plan", "--scale", "paper", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "8 GPU(s) x 80 GiB, DeepSpeed ZeRO-2" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert {"clip", "align", "instruct"} <= set(rows)
    assert all(rows[stage][-2] == "yes" for stage in ("clip", "align", "instruct"))
    assert main(["plan", "--scale", "paper", "--gpu-mem", "12", "--stages", "instruct"]) == 1
    assert "NO" in capsys.readouterr().out


def test_ci_on_cpu_estimates_resident_memory(capsys):
    assert main(["plan", "--scale", "ci", "--gpu-mem", "24"]) == 0  # --gpus defaults to 0 below paper
    out = capsys.readouterr().out
    assert "CPU, 24 GiB RAM" in out and " fp32 " in out
    plan = plan_stage("align", "ci", CPU)
    assert 0.5 * GIB < plan.total < 3 * GIB and plan.seconds_per_step > 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (dict(gpus=-1), "gpus must be >= 0"),
        (dict(gpus=0, zero=2), "ZeRO-2 shards over GPUs"),
        (dict(zero=4), "ZeRO stage 0, 1, 2 or 3, got 4"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(gpu_mem_gib=0), "gpu_mem_gib must be > 0"),
    ],
)
def test_bad_settings_are_refused_by_name(setup, message):
    with pytest.raises(ValueError, match=message):
        Setup(**setup)


def test_bad_flags_give_clear_errors(capsys):
    assert main(["plan", "--scale", "ci", "--zero", "2"]) == 2
    assert "ZeRO-2 shards over GPUs" in capsys.readouterr().err
    assert main(["plan", "--llm", "no-such/llm"]) == 2
    assert "'no-such/llm' is not available offline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--zero", "5"])
    assert "invalid choice: 5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        stage_model("train", "ci")
