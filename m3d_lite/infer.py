"""Ask a LaMed model about volumes: batched prompts in, decoded answers out.

The one place where questions become prompts for ``generate`` and new tokens become text; notebooks,
benchmarks and the evaluation call it instead of repeating those steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from m3d_lite.models.lamed import LaMedForCausalLM
from m3d_lite.models.tokenizer import encode_prompts


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
    if images.ndim != 5 or images.shape[0] != len(questions):
        raise ValueError(
            f"images must be B x 1 x D x H x W with B = {len(questions)} questions, got {tuple(images.shape)}"
        )
    config = model.config
    prompts = encode_prompts(tokenizer, list(questions), config.proj_out_num, config.chat_template)
    device = model.device
    prompts = {key: value.to(device) for key, value in prompts.items()}
    generate_kwargs.setdefault("do_sample", False)
    new_tokens = model.generate(
        images=images.to(device), **prompts, max_new_tokens=max_new_tokens, **generate_kwargs
    )
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=skip_special_tokens)
    return [text.strip() for text in texts]
