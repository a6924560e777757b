"""M3D's tokens, mean-initialised embedding rows, prompts in both formats, exact label masks, truncation."""

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from m3d_lite.models import (
    IMAGE_TOKEN,
    SEG_TOKEN,
    add_m3d_tokens,
    build_prompt,
    encode_example,
    encode_prompts,
    resize_with_mean_init,
)
from m3d_lite.models.pretrained import SMOLLM2_VOCAB, load_llm, load_llm_tokenizer, tiny_llm_config
from m3d_lite.models.tokenizer import M3D_TOKENS, encode_prompt, join_prompt_answer

NUM_IMAGE_TOKENS = 8
QUESTION = "What is the abnormality in the liver?"
ANSWER = "A. A simple cyst in the right lobe."


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """Converted models go to a fresh cache folder, not the user's (SmolLM2's tokenizer: ~5 s once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = load_llm_tokenizer("tiny-llama")
    add_m3d_tokens(tokenizer)
    return tokenizer


def test_m3d_tokens_are_added_once_and_seg_survives_decoding(tokenizer, tmp_path):
    ids = add_m3d_tokens(tokenizer)  # a second call adds nothing
    assert list(ids) == list(M3D_TOKENS) and list(ids.values()) == list(
        range(SMOLLM2_VOCAB, SMOLLM2_VOCAB + 4)
    )
    assert len(tokenizer) == SMOLLM2_VOCAB + 4
    text = f"{IMAGE_TOKEN * 2}Where? It is {SEG_TOKEN}. <bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end>"
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert encoded.count(ids[IMAGE_TOKEN]) == 2 and ids[SEG_TOKEN] in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == (
        f"Where? It is {SEG_TOKEN}. [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]"
    )
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False).input_ids == encoded


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3"])  # tied (as SmolLM2) and untied (as Phi-3)
def test_new_rows_are_the_mean_of_the_old_rows(name, tokenizer):
    torch.manual_seed(0)
    model = load_llm(name)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    resize_with_mean_init(model, tokenizer)
    after_in, after_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert after_in.shape[0] == after_out.shape[0] == len(tokenizer) == model.config.vocab_size
    assert (after_in.data_ptr() == after_out.data_ptr()) == model.config.tie_word_embeddings
    for before, after in ((before_in, after_in), (before_out, after_out)):
        assert torch.equal(after[:SMOLLM2_VOCAB], before)
        torch.testing.assert_close(after[SMOLLM2_VOCAB:], before.mean(0).expand(4, -1))


def test_a_matrix_with_spare_rows_is_not_shrunk(tokenizer):
    """Phi-3's case: 32064 rows for 32011 tokens, so the new ids land in existing (padding) rows."""
    torch.manual_seed(0)
    config = Phi3Config(**{**tiny_llm_config("tiny-phi3").to_dict(), "vocab_size": SMOLLM2_VOCAB + 10})
    model = Phi3ForCausalLM(config)
    before = model.get_input_embeddings().weight.detach().clone()
    resize_with_mean_init(model, tokenizer)
    after = model.get_input_embeddings().weight
    assert after.shape[0] == SMOLLM2_VOCAB + 10
    torch.testing.assert_close(
        after[SMOLLM2_VOCAB : SMOLLM2_VOCAB + 4], before[:SMOLLM2_VOCAB].mean(0).expand(4, -1)
    )
    assert torch.equal(after[SMOLLM2_VOCAB + 4 :], before[SMOLLM2_VOCAB + 4 :])
    with pytest.raises(ValueError, match="call add_m3d_tokens"):
        resize_with_mean_init(model, load_llm_tokenizer("tiny-llama"))  # a tokenizer without the tokens


def test_chat_format_masks_exactly_the_prompt(tokenizer):
    example = encode_example(tokenizer, QUESTION, ANSWER, NUM_IMAGE_TOKENS, max_length=256)
    ids, labels = example["input_ids"], example["labels"]
    prompt = encode_prompt(tokenizer, QUESTION, NUM_IMAGE_TOKENS)
    assert ids[: len(prompt)].tolist() == prompt and (labels[: len(prompt)] == -100).all()
    assert torch.equal(labels[len(prompt) :], ids[len(prompt) :])  # answer + EOS, all supervised
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[len(prompt) :]) == ANSWER + tokenizer.eos_token
    # the whole sample is the LLM's own chat format: user = image tokens + question, assistant = answer
    turns = [
        {"role": "user", "content": IMAGE_TOKEN * NUM_IMAGE_TOKENS + QUESTION},
        {"role": "assistant", "content": ANSWER},
    ]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(turns, tokenize=False).removesuffix("\n")


def test_raw_format_is_m3ds(tokenizer):
    example = encode_example(
        tokenizer, QUESTION, ANSWER, NUM_IMAGE_TOKENS, max_length=256, chat_template=False
    )
    text = tokenizer.decode(example["input_ids"])
    assert text == IMAGE_TOKEN * NUM_IMAGE_TOKENS + QUESTION + " " + ANSWER + tokenizer.eos_token
    supervised = example["input_ids"][example["labels"] != -100]
    assert tokenizer.decode(supervised) == " " + ANSWER + tokenizer.eos_token
    assert build_prompt(tokenizer, QUESTION, 2, chat_template=False) == IMAGE_TOKEN * 2 + QUESTION


def test_truncation_cuts_the_answer_never_the_image_tokens(tokenizer):
    prompt_length = len(encode_prompt(tokenizer, QUESTION, NUM_IMAGE_TOKENS))
    long_answer = "The liver shows many small cysts. " * 20
    example = encode_example(tokenizer, QUESTION, long_answer, NUM_IMAGE_TOKENS, max_length=prompt_length + 5)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == prompt_length + 5 and (ids == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 8
    assert (labels != -100).sum() == 5 and ids[-1] != tokenizer.eos_token_id  # cut answer: no EOS
    assert tokenizer.decode(ids[-5:]) == tokenizer.decode(
        tokenizer(long_answer, add_special_tokens=False).input_ids[:5]
    )
    with pytest.raises(ValueError, match=rf"the prompt alone is {prompt_length} tokens .* max_length is 40"):
        encode_example(tokenizer, QUESTION, ANSWER, NUM_IMAGE_TOKENS, max_length=40)


def test_prompt_batches_are_left_padded(tokenizer):
    questions = ["Describe the scan.", QUESTION]
    batch = encode_prompts(tokenizer, questions, NUM_IMAGE_TOKENS)
    rows = [encode_prompt(tokenizer, q, NUM_IMAGE_TOKENS) for q in questions]
    short, width = len(rows[0]), len(rows[1])
    assert batch["input_ids"].shape == (2, width) and short < width
    assert (
        batch["input_ids"][0, width - short :].tolist() == rows[0]
        and batch["input_ids"][1].tolist() == rows[1]
    )
    assert batch["attention_mask"].tolist() == [[0] * (width - short) + [1] * short, [1] * width]
    assert (batch["input_ids"][0, : width - short] == tokenizer.pad_token_id).all()


def test_join_prompt_answer_masks_the_prompt_and_cuts_the_answer_tail():
    joined = join_prompt_answer([1, 7, 7, 3], [20, 21, 2], max_length=6)
    assert joined["input_ids"].tolist() == [1, 7, 7, 3, 20, 21]
    assert joined["labels"].tolist() == [-100, -100, -100, -100, 20, 21]
    with pytest.raises(ValueError, match="the prompt alone is 4 tokens .* max_length is 4"):
        join_prompt_answer([1, 7, 7, 3], [20], max_length=4)
