"""LaMed on tiny LLMs: the splice by mask, count errors, learning through the projector alone, save/load,
the Auto classes, and generation alone vs inside a left-padded batch (tiny Llama and tiny Phi-3)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from m3d_lite.models import (
    IMAGE_TOKEN,
    LaMedForCausalLM,
    build_lamed,
    encode_example,
    encode_prompts,
    load_lamed,
    save_lamed,
)
from m3d_lite.models.vision import VisionConfig, ViT3D, save_vision_encoder

QUESTIONS = ["Describe the scan.", "Which organ holds the lesion, and where in it is the lesion?"]
ANSWERS = ["A cyst in the liver.", "The left kidney, lower pole."]


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """Converted models go to a fresh cache folder, not the user's (SmolLM2's tokenizer: ~5 s once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def one_thread():
    """Two OpenMP threads on 2 cores shared with other jobs run a step 7x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(llm: str = "tiny-llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_lamed("ci", llm=llm, **overrides)


def volumes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 32, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_images_replace_exactly_the_image_token_embeddings():
    model, tokenizer = build()
    assert model.config.proj_out_num == 64 and isinstance(model.language_model, torch.nn.Module)
    batch = encode_prompts(tokenizer, QUESTIONS, model.config.proj_out_num)  # rows of different lengths
    images = volumes(2)
    with torch.no_grad():
        spliced = model.embed_inputs(batch["input_ids"], images)
        features = model.encode_images(images)
        plain = model.get_input_embeddings()(batch["input_ids"])
    is_image = batch["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert features.shape == (2, 64, model.config.text_config.hidden_size)
    assert is_image[0].nonzero()[0] > is_image[1].nonzero()[0]  # left padding moved row 0's image
    for row in range(2):
        assert torch.equal(spliced[row][is_image[row]], features[row])  # in order, at the mask
        assert torch.equal(spliced[row][~is_image[row]], plain[row][~is_image[row]])
    with torch.no_grad():
        logits = model(images=images, **batch).logits
        direct = model.language_model(inputs_embeds=spliced, attention_mask=batch["attention_mask"]).logits
        other = model(images=volumes(2, seed=1), **batch).logits
    assert torch.equal(logits, direct)
    assert not torch.allclose(logits[:, -1], other[:, -1])  # the image matters


def test_a_wrong_image_token_count_names_both_counts():
    model, tokenizer = build()
    batch = encode_prompts(tokenizer, QUESTIONS, num_image_tokens=63)
    with pytest.raises(
        ValueError, match=r"row 0 of input_ids holds 63 <im_patch> tokens but 64 are expected"
    ):
        model(images=volumes(2), **batch)
    with pytest.raises(
        ValueError, match="holds 64 <im_patch> tokens but 0 are expected .no images were given"
    ):
        model(**encode_prompts(tokenizer, QUESTIONS, num_image_tokens=64))
    with pytest.raises(ValueError, match="3 images for 2 rows"):
        model(images=volumes(3), **encode_prompts(tokenizer, QUESTIONS, num_image_tokens=64))


def right_padded(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """A training batch from :func:`encode_example` outputs (what the instruction collator does)."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(row, (0, width - len(row)), value=value) for row in rows])

    return {
        "input_ids": pad([e["input_ids"] for e in examples], pad_id),
        "labels": pad([e["labels"] for e in examples], -100),
        "attention_mask": pad([torch.ones_like(e["input_ids"]) for e in examples], 0),
    }


def test_loss_falls_with_only_the_projector_trainable(one_thread):
    model, tokenizer = build()
    examples = [
        encode_example(tokenizer, q, a, 64, max_length=256) for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    batch = {"images": volumes(2), **right_padded(examples, tokenizer.pad_token_id)}
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mm_projector.")}
    optimizer = torch.optim.AdamW(model.mm_projector.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(10.8, abs=0.3)  # ln(49156): the random LLM knows nothing
    assert losses[-1] < losses[0] - 0.5, losses  # ~10.8 -> ~9.8 in 3 s
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi3"])
def test_save_and_reload_give_identical_logits(llm, tmp_path):
    model, tokenizer = build(llm)
    batch = encode_prompts(tokenizer, QUESTIONS, 64)
    images = volumes(2)
    with torch.no_grad():
        logits = model(images=images, **batch).logits
    save_lamed(model, tokenizer, tmp_path)
    reloaded, tokenizer2 = load_lamed(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code: registered on import
    assert type(auto) is LaMedForCausalLM and type(reloaded.language_model) is type(model.language_model)
    lm = reloaded.language_model
    tied = lm.get_input_embeddings().weight.data_ptr() == lm.get_output_embeddings().weight.data_ptr()
    assert tied == (llm == "tiny-llama") == lm.config.tie_word_embeddings  # SmolLM2 ties, Phi-3 does not
    assert encode_prompts(tokenizer2, QUESTIONS, 64)["input_ids"].tolist() == batch["input_ids"].tolist()
    assert reloaded.generation_config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        for loaded in (reloaded, auto):
            assert torch.equal(loaded(images=images, **batch).logits, logits)


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi3"])
def test_generate_alone_equals_inside_a_left_padded_batch(llm):
    model, tokenizer = build(llm)
    images = volumes(2)
    settings = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batch = model.generate(images, **encode_prompts(tokenizer, QUESTIONS, 64), **settings)
    assert batch.sequences.shape == (2, 6)  # only the new tokens, as with any inputs_embeds generation
    for row, question in enumerate(QUESTIONS):
        alone = model.generate(images[row : row + 1], **encode_prompts(tokenizer, [question], 64), **settings)
        assert alone.sequences[0].tolist() == batch.sequences[row].tolist()
        for step_alone, step_batch in zip(alone.scores, batch.scores, strict=True):
            torch.testing.assert_close(step_alone[0], step_batch[row], atol=1e-4, rtol=0)
    assert not torch.allclose(batch.scores[0][0], batch.scores[0][1], atol=1e-2)  # the rows do differ


def test_build_from_a_stage0_encoder_and_override_the_projector(tmp_path):
    torch.manual_seed(0)
    vit = ViT3D(VisionConfig.from_scale("ci"))
    save_vision_encoder(vit, tmp_path / "vision_encoder")
    model, _ = build(vision_encoder=tmp_path / "vision_encoder", pooling_size=4, max_length=128)
    assert all(
        torch.equal(v, model.vision_tower.vision_tower.state_dict()[k]) for k, v in vit.state_dict().items()
    )
    assert model.config.proj_out_num == 8 and model.config.model_max_length == 128  # 8x8x8 pooled by 4
    with pytest.raises(ValueError, match="set a fresh ViT's shape"):
        build(vision_encoder=tmp_path / "vision_encoder", hidden_size=32)
    with pytest.raises(KeyError, match=r"unknown key\(s\) \['pooling'\]"):
        build(pooling=4)
