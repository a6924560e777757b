"""Test-session settings that must be in place before torch is imported anywhere."""

import os
from pathlib import Path

import pytest

# Offline, quiet, and polite on a shared 2-core machine: with the default active OpenMP wait, torch's
# threads spin while another process runs and a 0.1 s step can take 2 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def phantom8(tmp_path_factory) -> Path:
    """An 8-volume ci phantom shared by the whole session; read it, never change it (copy it first)."""
    from m3d_lite.data.phantom_dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom8")
    write_phantom_dataset(root, num_volumes=8, scale="ci", seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (the tiny LLMs use it) with M3D's tokens added; read it, never change it."""
    from m3d_lite.models.pretrained import load_llm_tokenizer
    from m3d_lite.models.tokenizer import add_m3d_tokens

    tokenizer = load_llm_tokenizer("tiny-llama")
    add_m3d_tokens(tokenizer)
    return tokenizer
