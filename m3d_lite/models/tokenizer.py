"""M3D's extra tokens, the embedding rows they need, and how a (question, answer) pair becomes token ids.

Tokens (M3D_FACTS 1.5): ``<im_patch>`` marks where an image token goes, ``<bx_start>`` / ``<bx_end>`` wrap
a box, all three special (``decode(skip_special_tokens=True)`` drops them); ``[SEG]`` is a normal added
token, so that decoded answers keep it, as in M3D.

Prompt format. With ``chat_template=True`` and a tokenizer that has a chat template (SmolLM2, Phi-3,
Llama-2-chat, and the tiny models, which use SmolLM2's tokenizer), the user turn is the image tokens
followed by the question, and the assistant turn is the answer followed by EOS::

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<im_patch>x64What is ...?<|im_end|>\\n
    <|im_start|>assistant\\nA. Liver<|im_end|>

M3D never used a chat template: it trained on the raw string ``"<im_patch>"*256 + question + " " + answer``
followed by EOS (with the tokenizer's BOS in front, if it adds one). ``chat_template=False`` gives
exactly that format. The template costs a few dozen tokens per sample but is the format an instruct
LLM was tuned on, so its chat skills carry over.

Labels are -100 on the prompt (system, image tokens, question, assistant header) and the token ids
on the answer + EOS. Prompt and answer are tokenised separately, so the boundary is exact (with a
SentencePiece tokenizer such as Phi-3's the answer's first word then starts with its own "▁", as it does
after a space). Truncation cuts the answer's tail, never the image tokens (which would break the splice
in ``LaMedForCausalLM``).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

IMAGE_TOKEN = "<im_patch>"
BOX_START = "<bx_start>"
BOX_END = "<bx_end>"
SEG_TOKEN = "[SEG]"
SPECIAL_TOKENS = (IMAGE_TOKEN, BOX_START, BOX_END)
M3D_TOKENS = (*SPECIAL_TOKENS, SEG_TOKEN)
IGNORE_INDEX = -100  # labels with this value take no part in the loss (PyTorch's cross-entropy default)


def add_m3d_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add M3D's tokens to ``tokenizer`` (idempotent) and return ``{token: id}``.

    Also gives the tokenizer a pad token when it has none (unk, else eos), as M3D does for Llama.
    """
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    tokenizer.add_tokens([SEG_TOKEN])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return {token: tokenizer.convert_tokens_to_ids(token) for token in M3D_TOKENS}


@torch.no_grad()
def resize_with_mean_init(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make room for the tokenizer's M3D tokens and set their embedding rows to the mean of the old rows.

    As M3D, both the input embedding and the (untied) output embedding get mean rows; with tied
    embeddings (SmolLM2) they are one matrix. The matrix grows to ``len(tokenizer)`` but never shrinks:
    Phi-3 has 32064 rows for 32011 tokens, so its 4 new ids fit in rows that exist (M3D resized it to
    32015, dropping the unused padding rows; keeping them keeps the LLM's shapes).
    """
    new_ids = sorted(tokenizer.convert_tokens_to_ids(list(M3D_TOKENS)))
    if tokenizer.unk_token_id in new_ids or None in new_ids:
        raise ValueError(f"the tokenizer lacks some of {M3D_TOKENS}: call add_m3d_tokens(tokenizer) first")
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for weight in matrices:
        weight[new_ids] = weight[: new_ids[0]].mean(0)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> bool:
    """Whether prompts are chat-formatted: asked for, and the tokenizer has a template."""
    return chat_template and bool(tokenizer.chat_template)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, num_image_tokens: int, chat_template: bool = True
) -> str:
    """The text before the answer: image tokens + question, in the chat template's user turn (ending with
    the assistant header) or raw as M3D (see the module docstring)."""
    user = IMAGE_TOKEN * num_image_tokens + question
    if not uses_chat_template(tokenizer, chat_template):
        return user
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, num_image_tokens: int, chat_template: bool = True
) -> list[int]:
    """Token ids of :func:`build_prompt`: the raw format gets the tokenizer's BOS, a template has its own."""
    prompt = build_prompt(tokenizer, question, num_image_tokens, chat_template)
    ids = tokenizer(prompt, add_special_tokens=not uses_chat_template(tokenizer, chat_template)).input_ids
    found = ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if found != num_image_tokens:
        raise ValueError(
            f"the prompt holds {found} {IMAGE_TOKEN} tokens after tokenisation, expected {num_image_tokens}: "
            f"was {IMAGE_TOKEN} added to the tokenizer (add_m3d_tokens)?"
        )
    return ids


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    num_image_tokens: int,
    max_length: int,
    chat_template: bool = True,
) -> dict[str, torch.Tensor]:
    """One training sample: ``input_ids`` = prompt + answer + EOS, ``labels`` = -100 on the prompt.

    A sample longer than ``max_length`` loses the answer's tail (and its EOS, since the answer did not end
    there); a prompt that leaves no room for one answer token is an error that names the lengths.
    """
    prompt_ids = encode_prompt(tokenizer, question, num_image_tokens, chat_template)
    answer_text = answer if uses_chat_template(tokenizer, chat_template) else " " + answer  # M3D: q + " " + a
    answer_ids = tokenizer(answer_text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return join_prompt_answer(prompt_ids, answer_ids, max_length)


def join_prompt_answer(
    prompt_ids: list[int], answer_ids: list[int], max_length: int
) -> dict[str, torch.Tensor]:
    """``input_ids`` = prompt + answer cut to ``max_length`` (the answer loses its tail, the prompt and its
    image tokens stay whole); ``labels`` = the same ids with every prompt position set to -100, so that the
    loss is only on the answer (with its EOS, when it survived the cut).
    """
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt alone is {len(prompt_ids)} tokens (image tokens + question + template), max_length "
            f"is {max_length}: raise max_length or shorten the question"
        )
    answer_ids = list(answer_ids)[:room]
    return {
        "input_ids": torch.tensor(list(prompt_ids) + answer_ids),
        "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids),
    }


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    num_image_tokens: int,
    chat_template: bool = True,
) -> dict[str, torch.Tensor]:
    """A batch of prompts for ``generate``: ``input_ids`` and ``attention_mask``, LEFT-padded.

    Generation appends new tokens on the right, so every row's prompt must end at the last column.
    """
    rows = [encode_prompt(tokenizer, q, num_image_tokens, chat_template) for q in questions]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
