"""The [SEG] pathway of LaMed at ci: the seg loss trains the decoder, the seg projector and LoRA; generation
decodes a mask from the state that generated [SEG] (also as the first new token); save/load keeps it."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from m3d_lite.models import build_lamed, encode_example, encode_prompts, load_lamed, save_lamed
from m3d_lite.models.lora import LoraSettings, apply_lora
from m3d_lite.models.segmentation import SegConfig

QUESTION, ANSWER = "Can you segment the liver?", "It is [SEG]."


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def build(segmentation: bool = True):
    torch.manual_seed(0)
    return build_lamed("ci", llm="tiny-llama", segmentation=segmentation)


def seg_batch(model, tokenizer, answers=(ANSWER, "No mask here.")):
    """Two right-padded rows (row 0 holds [SEG]), their images and masks (row 0: a cube, row 1: none)."""
    rows = [
        encode_example(tokenizer, QUESTION, a, model.config.proj_out_num, 256)["input_ids"] for a in answers
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((2, width), tokenizer.pad_token_id)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], attention_mask[i, : len(row)] = row, 1
    masks = torch.zeros(2, 1, 32, 64, 64)
    masks[0, :, 8:20, 16:40, 20:44] = 1
    images = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {
        "images": images,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "seg_masks": masks,
    }


def test_seg_loss_alone_reaches_decoder_projector_and_lora():
    model, tokenizer = build()
    wrapped = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    for part in (model.seg_module, model.seg_projector):
        part.requires_grad_(True)
    output = wrapped(**seg_batch(model, tokenizer))
    assert output.seg_logits.shape == (1, 1, 32, 64, 64)  # only row 0 has a mask and a [SEG]
    assert output.seg_prompts.shape == (1, model.config.seg_config.embed_dim)
    torch.testing.assert_close(output.loss, output.lm_loss + output.dice_loss + output.bce_loss)
    (output.dice_loss + output.bce_loss).backward()
    grads = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
    reached = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert any(".seg_projector." in n for n in reached)
    assert any(".seg_module.mask_decoder." in n for n in reached)
    assert any(".seg_module.image_encoder." in n for n in reached)
    assert any("lora_B" in n for n in reached)  # through the [SEG] hidden state into the LLM
    assert not any("lora_A" in n for n in reached)  # B = 0 at the start: A's gradient is exactly 0


def test_rows_without_mask_or_seg_get_no_seg_loss():
    model, tokenizer = build()
    batch = seg_batch(model, tokenizer, answers=("No mask here.", "Nothing either."))
    output = model(**batch)
    assert output.seg_logits is None and output.dice_loss is None  # row 0 has a mask but no [SEG]
    plain = model(**{k: v for k, v in batch.items() if k != "seg_masks"})
    torch.testing.assert_close(output.loss, plain.loss)
    without, _ = build(segmentation=False)
    with pytest.raises(ValueError, match="seg_masks were given, but this model has no seg module"):
        without(**seg_batch(without, tokenizer))


class ForceFirst(LogitsProcessor):
    """Greedy decoding that must start with ``token`` in the rows of ``rows``."""

    def __init__(self, token: int, rows: list[int]):
        self.token, self.rows, self.calls = token, rows, 0

    def __call__(self, input_ids, scores):
        if self.calls == 0:
            for row in self.rows:
                scores[row] = float("-inf")
                scores[row, self.token] = 0.0
        self.calls += 1
        return scores


def test_generate_decodes_a_mask_for_a_seg_generated_first():
    model, tokenizer = build()
    model.eval()
    seg_id = model.config.seg_token_id
    images = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(3))
    prompts = encode_prompts(tokenizer, [QUESTION, QUESTION], model.config.proj_out_num)
    ids, seg_logits = model.generate(
        images,
        **prompts,
        seg_enable=True,
        max_new_tokens=3,
        do_sample=False,
        logits_processor=LogitsProcessorList([ForceFirst(seg_id, rows=[0])]),
    )
    assert ids[0, 0] == seg_id and seg_id not in ids[1].tolist()
    assert seg_logits.shape == (2, 1, 32, 64, 64) and torch.isinf(seg_logits[1]).all()
    with torch.no_grad():  # by hand: the prompt's last state predicted the [SEG]
        hidden = model(images=images, **prompts, output_hidden_states=True).hidden_states[-1][:, -1]
        expected = model.seg_module(images[:1], model.seg_projector(hidden[:1]))
    torch.testing.assert_close(seg_logits[:1], expected, atol=1e-4, rtol=1e-4)
    plain = model.generate(images, **prompts, max_new_tokens=3, do_sample=False)
    assert plain.shape == (2, 3)  # without seg_enable: the ids alone, as before


def test_add_seg_module_then_save_and_reload(tmp_path):
    model, tokenizer = build(segmentation=False)
    assert model.seg_module is None
    model.add_seg_module(SegConfig.from_scale("ci"))
    save_lamed(model, tokenizer, tmp_path / "model")
    reloaded, _ = load_lamed(tmp_path / "model")
    assert isinstance(reloaded.config.seg_config, SegConfig) and reloaded.seg_module is not None
    batch = seg_batch(model, tokenizer)
    with torch.no_grad():
        a, b = model.eval()(**batch), reloaded.eval()(**batch)
    torch.testing.assert_close(b.seg_logits, a.seg_logits, atol=1e-5, rtol=0)  # float rounding only
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already has a seg module"):
        model.add_seg_module(SegConfig.from_scale("ci"))


def test_seg_state_norm_is_fitted_on_seg_states_used_and_saved(tmp_path):
    model, tokenizer = build(segmentation=False)
    model.add_seg_module(SegConfig.from_scale("ci"), state_norm=True)
    assert model.config.seg_state_norm and model.seg_state_norm is not None
    batch = seg_batch(model, tokenizer, answers=(ANSWER, "The liver: [SEG]."))
    batch["seg_masks"][1] = batch["seg_masks"][0]  # both rows decode a mask
    items = [
        {"images": batch["images"][i], "input_ids": row[mask.bool()], "image_path": f"scan{i}"}
        for i, (row, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True))
    ]
    states = model.seg_states(items)
    with torch.no_grad():  # by hand: the states that predict [SEG], one row at a time
        for i, item in enumerate(items):
            hidden = model(
                images=item["images"][None], input_ids=item["input_ids"][None], output_hidden_states=True
            )
            seg_at = (item["input_ids"] == model.config.seg_token_id).nonzero().item()
            torch.testing.assert_close(states[i], hidden.hidden_states[-1][0, seg_at - 1])
    model.seg_state_norm.fit(states)
    with torch.no_grad():
        prompts = model.eval()(**batch).seg_prompts
    torch.testing.assert_close(prompts, model.seg_projector(model.seg_state_norm(states)))
    save_lamed(model, tokenizer, tmp_path / "model")
    reloaded, _ = load_lamed(tmp_path / "model")
    assert reloaded.config.seg_state_norm
    for name in ("mean", "std"):
        assert torch.equal(getattr(reloaded.seg_state_norm, name), getattr(model.seg_state_norm, name))
    no_seg = items[1]["input_ids"].masked_fill(items[1]["input_ids"] == model.config.seg_token_id, 0)
    with pytest.raises(ValueError, match="scan1: this item's answer holds no \\[SEG\\] token"):
        model.seg_states([items[0], {**items[1], "input_ids": no_seg}])
