"""Ask a LaMed model about volumes: a scan file or tensors in, decoded answers (and boxes) out.

The one place where questions become prompts for ``generate`` and new tokens become text; notebooks,
benchmarks, ``m3d-lite infer`` and the evaluation call it instead of repeating those steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from m3d_lite.data.formats import parse_box
from m3d_lite.data.preprocess import PreparedVolume, Volume, Window, prepare_file, save_mask_nifti
from m3d_lite.io import save_npy
from m3d_lite.models.lamed import LaMedForCausalLM, load_lamed
from m3d_lite.models.lora import ADAPTER_DIR, find_model_dir, load_lamed_lora, merge_lora
from m3d_lite.models.tokenizer import encode_prompt, encode_prompts


def load_model(path: str | os.PathLike, **kwargs: Any) -> tuple[LaMedForCausalLM, PreTrainedTokenizerBase]:
    """Any trained LaMed for inference, in eval mode: a stage-2 LoRA folder (``base/`` + ``adapter/``, or
    the run folder holding it as ``model/``) is merged on load; a plain LaMed folder (stage 1, an export,
    a converted checkpoint; or its run folder) is read as it is. ``kwargs`` go to ``from_pretrained``."""
    folder = Path(path)
    if (folder / ADAPTER_DIR).is_dir() or (folder / "model" / ADAPTER_DIR).is_dir():
        model, tokenizer = load_lamed_lora(folder, **kwargs)
        return merge_lora(model).eval(), tokenizer
    folder = find_model_dir(folder, "config.json", "a LaMed model folder (stage 1, stage 2 or an export)")
    model, tokenizer = load_lamed(folder, **kwargs)
    return model.eval(), tokenizer


def _generate(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    images: torch.Tensor,
    questions: Sequence[str],
    max_new_tokens: int,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` on left-padded prompts in the model's own format; greedy unless told otherwise."""
    if images.ndim != 5 or images.shape[0] != len(questions):
        raise ValueError(
            f"images must be B x 1 x D x H x W with B = {len(questions)} questions, got {tuple(images.shape)}"
        )
    config = model.config
    prompts = encode_prompts(tokenizer, list(questions), config.proj_out_num, config.chat_template)
    device = model.device
    prompts = {key: value.to(device) for key, value in prompts.items()}
    generate_kwargs.setdefault("do_sample", False)
    return model.generate(
        images=images.to(device), **prompts, max_new_tokens=max_new_tokens, **generate_kwargs
    )


def _decode(
    tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor, skip_special_tokens: bool
) -> list[str]:
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=skip_special_tokens)
    if not skip_special_tokens:  # keep the box tokens, drop end-of-text and padding
        for token in {tokenizer.eos_token, tokenizer.pad_token} - {None}:
            texts = [text.replace(token, "") for text in texts]
    return [text.strip() for text in texts]


@torch.no_grad()
def generate_answers(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    images: torch.Tensor,
    questions: Sequence[str],
    max_new_tokens: int = 64,
    skip_special_tokens: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """One answer per (volume, question): ``images`` is B x 1 x D x H x W, ``questions`` B strings.

    Greedy by default (``do_sample=False``); other ``generate`` options pass through. The prompts are
    built in the model's own format (``config.chat_template``, ``config.proj_out_num`` image tokens) and
    left-padded; ``skip_special_tokens=False`` keeps ``<bx_start>``/``<bx_end>`` in box answers.
    """
    new_tokens = _generate(model, tokenizer, images, questions, max_new_tokens, **generate_kwargs)
    return _decode(tokenizer, new_tokens, skip_special_tokens)


@torch.no_grad()
def generate_with_masks(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    images: torch.Tensor,
    questions: Sequence[str],
    max_new_tokens: int = 64,
    **generate_kwargs: Any,
) -> tuple[list[str], list[torch.Tensor | None]]:
    """Answers (box tokens kept) and, per answer that holds ``[SEG]``, its mask: a bool 1 x D x H x W
    tensor on the model's grid (sigmoid of the decoder's logits > 0.5, as M3D); None without ``[SEG]``."""
    if model.seg_module is None:
        raise ValueError("this model has no seg module: train stage 2 with segmentation to get masks")
    new_tokens, seg_logits = _generate(
        model, tokenizer, images, questions, max_new_tokens, seg_enable=True, **generate_kwargs
    )
    has_seg = (new_tokens == model.config.seg_token_id).any(1)
    masks = [
        (logits.sigmoid() > 0.5).cpu() if found else None
        for logits, found in zip(seg_logits, has_seg, strict=True)
    ]
    return _decode(tokenizer, new_tokens, skip_special_tokens=False), masks


@dataclass
class ScanInput:
    """A scan ready for the model: ``image`` 1 x D x H x W in [0, 1] at the model's size, and, for a file
    that was prepared here, the loaded ``volume`` and the ``prepared`` crop (to map masks back to it)."""

    image: torch.Tensor
    source: str
    volume: Volume | None = None
    prepared: PreparedVolume | None = None


def is_prepared_npy(path: Path, image_size: Sequence[int]) -> bool:
    """Whether ``path`` is already in M3D's prepared format: a float ``.npy`` of 1 x ``image_size``."""
    if path.suffix != ".npy":
        return False
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array.shape == (1, *image_size) and np.issubdtype(array.dtype, np.floating)


def load_scan(path: str | os.PathLike, image_size: Sequence[int], window: Window = None) -> ScanInput:
    """``path`` as the model's input. A prepared ``.npy`` (1 x ``image_size``, float, [0, 1], what the
    datasets hold) is used as it is; anything else (NIfTI, DICOM file or series folder, nrrd, mha, a raw
    ``.npy``) goes through :func:`~m3d_lite.data.preprocess.prepare_file` with ``window`` (a CT window name
    or (lower, upper) in HU; None: min..max, right for MRI and for already scaled arrays)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: scan not found")
    if path.is_file() and is_prepared_npy(path, image_size):
        image = np.load(path, allow_pickle=False).astype(np.float32)
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(
                f"{path}: a prepared volume must hold finite values in [0, 1], got "
                f"{np.nanmin(image):.3g}..{np.nanmax(image):.3g} (NaN: {bool(np.isnan(image).any())})"
            )
        return ScanInput(torch.from_numpy(image), str(path))
    prepared, volume = prepare_file(path, tuple(image_size), window)
    return ScanInput(torch.from_numpy(prepared.image), str(path), volume, prepared)


@dataclass
class Answer:
    """A model's ``text`` to ``question`` about the scan ``source``; ``box`` is the first box in the text,
    M3D's normalised [d0, h0, w0, d1, h1, w1] (None when the answer holds none); ``mask`` the bool
    1 x D x H x W mask of a ``[SEG]`` answer on the prepared volume's grid (None without one)."""

    source: str
    question: str
    text: str
    box: tuple[float, ...] | None
    mask: torch.Tensor | None = None


def check_question(
    tokenizer: PreTrainedTokenizerBase, config: Any, question: str, max_new_tokens: int
) -> int:
    """The prompt's length in tokens; a ``ValueError`` when it and ``max_new_tokens`` exceed the longest
    sample the model was trained on (``config.model_max_length`` of a ``LaMedConfig``, the preset's
    ``llm.max_length``): past it the answers are untrained territory, and the demo must say so."""
    prompt = encode_prompt(tokenizer, question, config.proj_out_num, config.chat_template)
    budget = config.model_max_length
    if len(prompt) + max_new_tokens > budget:
        overhead = len(prompt) - len(tokenizer(question, add_special_tokens=False).input_ids)
        room = budget - overhead - max_new_tokens
        fix = f"shorten the question to {room} tokens or lower" if room > 0 else "lower"
        raise ValueError(
            f"question and answer do not fit: the prompt is {len(prompt)} tokens ({config.proj_out_num} "
            f"image tokens, the template and the question) and the answer may take {max_new_tokens} more, "
            f"over the model's budget of {budget} tokens; {fix} the answer length"
        )
    return len(prompt)


def ask(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    scan: ScanInput,
    question: str,
    max_new_tokens: int = 128,
    segment: bool = False,
    **generate_kwargs: Any,
) -> Answer:
    """Ask ``question`` about ``scan`` (see :func:`load_scan`); the answer keeps its box tokens, and with
    ``segment=True`` the mask of its ``[SEG]`` comes with it."""
    expected = tuple(model.config.vision_config.image_size)
    if tuple(scan.image.shape[1:]) != expected or scan.image.shape[0] != 1:
        raise ValueError(f"{scan.source}: image {tuple(scan.image.shape)}, the model expects 1 x {expected}")
    check_question(tokenizer, model.config, question, max_new_tokens)
    images, questions = scan.image[None], [question]
    if segment:
        [text], [mask] = generate_with_masks(
            model, tokenizer, images, questions, max_new_tokens, **generate_kwargs
        )
    else:
        [text] = generate_answers(
            model, tokenizer, images, questions, max_new_tokens, skip_special_tokens=False, **generate_kwargs
        )
        mask = None
    return Answer(scan.source, question, text, parse_box(text), mask)


def save_answer_mask(scan: ScanInput, mask: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``mask`` (1 x D x H x W on the prepared grid) so that it overlays the scan it was asked about:
    for a scan file prepared here, a NIfTI on the file's own grid (size, spacing, orientation); for a
    prepared ``.npy`` input, a ``.npy`` of the same grid."""
    array = mask.numpy().astype(np.uint8)
    if scan.volume is None:
        return save_npy(Path(path).with_suffix("").with_suffix(".npy"), array)
    return save_mask_nifti(array, scan.volume, path, scan.prepared.crop_box)
