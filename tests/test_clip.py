"""M3D-CLIP: the loss by hand, both temperatures, learning, save/reload, MiniLM offline, and two processes."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers import AutoModel

from m3d_lite.models import (
    M3DClipConfig,
    M3DClipModel,
    VisionTower,
    build_clip,
    clip_loss,
    load_clip,
    save_clip,
)
from m3d_lite.models.pretrained import minilm_folder

M3D_KEYS = Path("/work/shared/reference/m3d_paper_scale_keys.json")
REPORTS = [
    "A 3 cm cyst in the liver.",
    "Normal spleen. No free fluid.",
    "Calcified stone in the left kidney.",
    "Solid mass in the pancreatic head.",
    "Cyst in the right kidney, simple.",
    "The aorta is not dilated.",
    "Hypodense lesion of the spleen.",
    "Two small liver cysts and a renal stone.",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Two OpenMP threads spin-wait when other jobs share the 2 cores (20x slower); one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blocky_volumes(n: int, seed: int = 0) -> torch.Tensor:
    """Random volumes with structure (4 x 4 x 4 random blocks), 1 x 32 x 64 x 64 like the ci data."""
    low = torch.rand(n, 1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(32, 64, 64), mode="nearest")


def ci_batch(tokenizer, n: int = 8) -> dict[str, torch.Tensor]:
    text = tokenizer(REPORTS[:n], padding=True, return_tensors="pt")
    return {"images": blocky_volumes(n), "input_ids": text.input_ids, "attention_mask": text.attention_mask}


def test_symmetric_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(4, 5), dim=-1), F.normalize(torch.randn(4, 5), dim=-1)
    logits = 3.0 * images @ texts.T
    rows = [-math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[i])) for i in range(4)]
    cols = [-math.log(math.exp(logits[j, j]) / sum(math.exp(v) for v in logits[:, j])) for j in range(4)]
    assert clip_loss(logits).item() == pytest.approx((sum(rows) / 4 + sum(cols) / 4) / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("temperature", "initial", "at_five"),
    [("m3d", math.log(1 / 0.07), 5.0), ("standard", 1 / 0.07, 100.0)],  # exp(5) = 148 is clamped at 100
)
def test_temperature_variants(temperature, initial, at_five):
    torch.manual_seed(0)
    model, tokenizer = build_clip("ci", temperature=temperature)
    model.eval()
    batch = ci_batch(tokenizer, n=3)
    assert model.inverse_temperature().item() == pytest.approx(initial, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
        out = model(**batch)
    cosines = out.image_embeds @ out.text_embeds.T
    torch.testing.assert_close(out.logits_per_image, at_five * cosines)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))


def test_loss_falls_when_training_on_8_fixed_pairs(one_thread):
    torch.manual_seed(0)
    model, tokenizer = build_clip("ci")
    batch = ci_batch(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.95 * math.log(8)  # chance level at the start
    assert losses[-1] < 0.75 * math.log(8)


def test_save_and_load_give_identical_embeddings_and_tokens(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_clip("ci")
    batch = ci_batch(tokenizer, n=2)
    folder = save_clip(model.eval(), tokenizer, tmp_path / "clip")
    loaded, loaded_tokenizer = load_clip(folder)
    assert loaded_tokenizer(REPORTS).input_ids == tokenizer(REPORTS).input_ids
    with torch.no_grad():
        before, after = model(**batch), loaded.eval()(**batch)
    assert torch.equal(before.image_embeds, after.image_embeds)
    assert torch.equal(before.text_embeds, after.text_embeds)
    assert json.loads((folder / "config.json").read_text())["text_config"]["hidden_size"] == 64
    assert type(AutoModel.from_pretrained(folder)) is M3DClipModel


def test_saved_vision_encoder_gives_the_tower_identical_tokens(tmp_path):
    torch.manual_seed(0)
    model, _ = build_clip("ci")
    folder = model.save_vision_encoder(tmp_path / "vision_encoder")
    assert set(load_file(folder / "model.safetensors")) == set(model.vision_encoder.state_dict())
    images = blocky_volumes(2)
    with torch.no_grad():
        assert torch.equal(VisionTower.from_pretrained(folder)(images), model.vision_encoder(images)[:, 1:])


def test_minilm_text_tower_loads_offline_and_mean_pooling_ignores_padding():
    model, tokenizer = build_clip("ci", text_model="minilm")
    package = AutoModel.from_pretrained(str(minilm_folder()))
    word_embeddings = "embeddings.word_embeddings.weight"
    assert torch.equal(
        model.text_encoder.state_dict()[word_embeddings], package.state_dict()[word_embeddings]
    )
    assert (model.mm_language_proj.in_features, model.config.embed_dim, model.config.text_pooling) == (
        384,
        64,
        "mean",
    )
    model.eval()
    alone = tokenizer(REPORTS[:1], return_tensors="pt")
    padded = tokenizer(REPORTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        embeds = model.encode_text(padded.input_ids, padded.attention_mask)
        torch.testing.assert_close(model.encode_text(alone.input_ids, alone.attention_mask), embeds[:1])
    assert embeds.shape == (2, 64)


def test_paper_scale_clip_has_m3d_layout():
    with torch.device("meta"):  # bert-base-uncased's config is BertConfig(): no Hub, no weights
        model = M3DClipModel(M3DClipConfig.from_scale("paper"))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes["mm_vision_proj.weight"] == shapes["mm_language_proj.weight"] == [768, 768]
    assert shapes["logit_scale"] == [] and model.config.temperature == "m3d"
    assert (
        sum(p.numel() for p in model.parameters()) == 198_052_609 - 590_592
    )  # M3D-CLIP without BERT's pooler
    if M3D_KEYS.exists():  # the key list observed on M3D's own classes (course build machines only)
        entries = json.loads(M3D_KEYS.read_text())["m3d_clip"]
        m3d = {
            k.replace("language_encoder.", "text_encoder."): s for k, s, _ in entries if ".pooler." not in k
        }
        assert shapes == m3d


def test_config_overrides_go_to_their_section_and_mistakes_are_named():
    config = M3DClipConfig.from_scale("ci", hidden_size=32, num_heads=2, temperature="m3d", embed_dim=16)
    assert (
        config.vision_config["hidden_size"] == 32 and config.temperature == "m3d" and config.embed_dim == 16
    )
    assert M3DClipConfig.from_scale("ci").embed_dim == 64  # the ViT width by default
    with pytest.raises(KeyError, match="temprature.*expected some of"):
        M3DClipConfig.from_scale("ci", temprature="m3d")
    with pytest.raises(ValueError, match="temperature 'hot' is not one of"):
        M3DClipConfig.from_scale("ci", temperature="hot")


def check_two_processes(state, config, batch, reference_loss, reference_grads, out_dir):
    """One rank: the DDP-wrapped model on its half of the batch; write how far it is from one process."""
    os.environ["OMP_NUM_THREADS"] = (
        "1"  # a forked child must not re-enter the parent's OpenMP pool (it hangs)
    )
    torch.set_num_threads(1)
    # a forked child inherits the parent's accelerate singletons: an Accelerator made earlier in this test
    # session would leave it believing it is one non-distributed process (no DDP, no gradient averaging)
    AcceleratorState._reset_state(reset_partial_state=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = M3DClipModel(config)
    model.load_state_dict(state)
    model.eval()  # no dropout: the two runs must see the same network
    accelerator = Accelerator(cpu=True)
    ddp_model = accelerator.prepare(model)
    out = ddp_model(**{k: v.chunk(world)[rank] for k, v in batch.items()})
    accelerator.backward(out.loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    report = {
        "loss_diff": abs(out.loss.item() - reference_loss),
        "grad_diff": max((grads[n] - g).abs().max().item() for n, g in reference_grads.items()),
        "logits_shape": list(out.logits_per_image.shape),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def test_two_processes_give_the_one_process_loss_and_gradients(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, tokenizer = build_clip("ci")
    model.eval()
    batch = ci_batch(tokenizer)
    out = model(**batch)  # one process, global batch of 8
    out.loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    args = (model.state_dict(), model.config, batch, out.loss.item(), reference_grads, str(tmp_path))
    debug_launcher(check_two_processes, args=args, num_processes=2)  # 2 x 4 samples, gloo
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["logits_shape"] == [8, 8]
        assert report["loss_diff"] < 1e-5 and report["grad_diff"] < 1e-5
