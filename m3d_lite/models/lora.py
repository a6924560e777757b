"""LoRA (peft) on the LLM inside a LaMed model: which layers, how the adapter is saved, read and merged.

Which layers: every ``nn.Linear`` of ``language_model`` but its LM head (:func:`lora_targets`), found by
walking the LLM, so one rule serves every architecture: Llama's ``q/k/v/o_proj``, ``gate/up/down_proj``;
Phi-3's fused ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``. This is M3D's rule ("every Linear
whose name does not contain vision_tower / mm_projector / embed_tokens / lm_head / seg_*"), found by
looking inside the LLM instead of by name: the ViT, projector and seg module are never targets.

How peft wraps: ``get_peft_model`` on the WHOLE LaMed model, with the targets as full module names
(``language_model.model.layers.0.self_attn.q_proj``, ...), so no name can match a layer of the ViT. The
result is a ``PeftModel`` around the LaMed model: calling it, ``.generate(images=..., input_ids=...)``,
``.config`` and ``.device`` reach the LaMed model unchanged, the training loop trains it like any model,
and ``merge_and_unload`` gives a plain :class:`~m3d_lite.models.lamed.LaMedForCausalLM` back.

A saved LoRA model (:func:`save_lamed_lora`) is one folder of two parts::

    base/      a LaMed folder (save_lamed): config, safetensors, tokenizer. Every weight that is not
               LoRA: the LLM's own (frozen) weights and what stage 2 trains in full (ViT, projector,
               embeddings, LM head)
    adapter/   the LoRA A/B matrices, peft's format (adapter_config.json, adapter_model.safetensors)

``load_lamed(folder/base)`` alone would give the model WITHOUT its LoRA update; :func:`load_lamed_lora`
reads both, and :func:`export_merged` writes the merged model as a plain LaMed folder (``load_lamed`` and
``AutoModelForCausalLM.from_pretrained`` read it). M3D instead saves the whole PEFT-wrapped state dict
(``model_with_lora.bin``), which only its merge script can read back [M3D issue #53].
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.save_and_load import get_base_model_state_dict
from torch import nn
from transformers import PreTrainedTokenizerBase

from m3d_lite.config import section_config
from m3d_lite.io import atomic_dir
from m3d_lite.models.lamed import LaMedForCausalLM, load_lamed, save_lamed

BASE_DIR = "base"
ADAPTER_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """Section ``lora`` of a preset: rank ``r``, scale ``alpha`` (the update is ``alpha / r * B @ A``) and
    dropout on the LoRA input. M3D: r 16, alpha 32, dropout 0.05, no bias."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05

    @classmethod
    def from_scale(cls, scale: str, **overrides: Any) -> LoraSettings:
        """Section ``lora`` of preset ``scale`` with ``overrides`` (None values are ignored)."""
        return section_config(cls, scale, "lora", **overrides)


def lora_targets(model: LaMedForCausalLM) -> list[str]:
    """Full names (in ``model``) of every ``nn.Linear`` of the LLM except its LM head, in module order."""
    head = model.language_model.get_output_embeddings()
    return [
        f"language_model.{name}"
        for name, module in model.language_model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    ]


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence transformers 5's FutureWarning that peft's wrapping triggers on every call (it asks for
    ``is_gradient_checkpointing``); a message for peft's developers, noise in a course notebook."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def apply_lora(model: LaMedForCausalLM, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` in a ``PeftModel`` with a fresh LoRA adapter on :func:`lora_targets`.

    peft freezes every weight but the adapter's; A is random (seed torch first), B is zero, so the
    wrapped model computes exactly what ``model`` did until it trains. ``model`` itself is changed in
    place (its target Linears become LoRA layers around the original ones).
    """
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model),
        bias="none",
    )
    with quiet_peft():
        return get_peft_model(model, config)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that have ``requires_grad`` (a tied weight once)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def find_model_dir(path: str | os.PathLike, marker: str, what: str) -> Path:
    """The model folder of ``path``: ``path/model`` for a run folder that holds one, else ``path``; it must
    hold ``marker`` (a file or folder), or the error names ``path`` and says it expected ``what``."""
    folder = Path(path)
    if (folder / "model" / marker).exists():
        folder = folder / "model"
    if not (folder / marker).exists():
        raise FileNotFoundError(f"{path}: no {marker} in it nor in its model/; expected {what}")
    return folder


def save_lamed_lora(model: PeftModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Save a LoRA-wrapped LaMed model as ``path/base/`` + ``path/adapter/`` (see the module docstring)."""
    path = Path(path)
    base = model.get_base_model()
    base.save_pretrained(path / BASE_DIR, state_dict=get_base_model_state_dict(model))
    tokenizer.save_pretrained(path / BASE_DIR)
    model.save_pretrained(path / ADAPTER_DIR, save_embedding_layers=False)  # the embeddings are in base/
    return path


def load_lamed_lora(path: str | os.PathLike, **kwargs: Any) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Read a folder written by :func:`save_lamed_lora` (or the run folder holding it as ``model/``):
    ``(PeftModel around LaMed, tokenizer)``, frozen; ``kwargs`` go to ``from_pretrained`` (``dtype``, ...)."""
    folder = find_model_dir(path, ADAPTER_DIR, f"a LoRA model folder ({BASE_DIR}/ + {ADAPTER_DIR}/)")
    base, tokenizer = load_lamed(folder / BASE_DIR, **kwargs)
    with quiet_peft():
        return PeftModel.from_pretrained(base, folder / ADAPTER_DIR), tokenizer


def merge_lora(model: PeftModel) -> LaMedForCausalLM:
    """Fold the adapter into the LLM's weights (W + alpha / r * B @ A) and return the plain LaMed model.

    ``model`` is used up: its LoRA layers are replaced by merged Linears. A non-finite merged weight is
    an error (peft's ``safe_merge``) rather than a broken checkpoint.
    """
    return model.merge_and_unload(safe_merge=True)


def export_merged(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge the LoRA model in ``model_dir`` (a stage-2 run folder or its ``model/``) and write it to
    ``out_dir`` as a plain LaMed folder (safetensors + tokenizer), atomically: ``load_lamed`` and, after
    ``import m3d_lite.models``, ``AutoModelForCausalLM.from_pretrained`` read it."""
    model, tokenizer = load_lamed_lora(model_dir)
    merged = merge_lora(model)
    with atomic_dir(out_dir) as tmp:
        save_lamed(merged, tokenizer, tmp)
    return Path(out_dir)
