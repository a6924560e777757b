"""An LLM judge for generated reports: a causal LM reads the reference and the generated report and scores
how much of the reference the generated one gets right, from 0 to 100.

This is M3D's ``Bench/eval/eval_with_llm.py`` idea (M3D_FACTS 4): Qwen-72B-Chat lists the aspects of the
ground truth and scores 0-100 the percentage of them that the prediction mentions correctly or in part,
answering "Score: xx.". The same 0-100 scale is kept here, with any local causal LM as the judge (a folder,
a Hub id, or the offline SmolLM2 by default; see :func:`m3d_lite.models.pretrained.load_llm`).

M3D parses the answer with ``r"Score: (\\d+\\.\\d+)"``, which needs a decimal point, so an integer answer
("Score: 85.") is recorded as 'NA' and silently left out of its mean. :func:`parse_score` reads integers and
decimals alike, and :func:`judge_summary` reports the share of answers that could be parsed next to the mean.
A 135M-parameter judge is a smoke test of the pipeline, not a grader: its scores are not comparable to M3D's.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from m3d_lite.models.pretrained import SMOLLM2_HUB_ID, load_llm, load_llm_tokenizer

# M3D's request in our words: the share of the reference's findings the prediction gets right, 0-100.
JUDGE_PROMPT = """\
You compare a generated radiology report with the reference report written by a radiologist.
List to yourself the findings stated in the reference report, then work out the percentage of them that \
the generated report states correctly or partly correctly. Answer with that percentage only, a number \
from 0 to 100, in the form "Score: xx."

Reference report: {reference}
Generated report: {prediction}"""

# A number, optionally followed by "/ denominator" (a fraction such as "7/10" or "85/100").
NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")
SCORE_LABEL = re.compile("score", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """The score in a judge's answer: its first number after the word "score", else its first number;
    integer or decimal, on the 0-100 scale.

    "85" and "Score: 85." give 85.0 (M3D's regex drops both), "Score: 72.5" gives 72.5, and a judge that
    reasons first ("2 of 3 findings. Score: 67") gives 67.0. A fraction is rescaled to 100: "a score of
    7/10" gives 70.0, "85/100" gives 85.0. No number, a zero denominator or a value outside [0, 100] gives
    None: the judge did not answer on the asked scale.
    """
    label = SCORE_LABEL.search(text)
    match = (label and NUMBER.search(text, label.end())) or NUMBER.search(text)
    if match is None:
        return None
    value, denominator = match.groups()
    score = float(value)
    if denominator is not None:
        if float(denominator) == 0:
            return None
        score = 100 * score / float(denominator)
    return score if 0 <= score <= 100 else None


def judge_prompt(tokenizer: PreTrainedTokenizerBase, prediction: str, reference: str) -> str:
    """The judge's input text for one pair: :data:`JUDGE_PROMPT` in the judge's chat template when it has
    one (as a user turn, ready for the assistant's answer), else the plain prompt."""
    prompt = JUDGE_PROMPT.format(reference=reference, prediction=prediction)
    if not tokenizer.chat_template:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_judgements(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """The judge's greedy answers to one batch of ``prompts``, left-padded so every prompt ends where
    generation starts; only the new tokens are decoded."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    templated = bool(tokenizer.chat_template)  # the template already holds the special tokens
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    batch = batch.to(model.device)
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)


def judge_reports(
    predictions: Sequence[str],
    references: Sequence[str],
    judge: str | os.PathLike = SMOLLM2_HUB_ID,
    batch_size: int = 4,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> list[float | None]:
    """One 0-100 score per (prediction, reference) pair from causal LM ``judge``, None where its answer
    has no score (:func:`parse_score`); the judge is loaded once, on the GPU when there is one.

    ``max_new_tokens=8`` is enough for an answer in the asked form "Score: xx."; give a judge that
    reasons before it scores more room.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"need one reference per prediction, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model, tokenizer = load_llm(judge).eval(), load_llm_tokenizer(judge)
    if torch.cuda.is_available():
        model.to("cuda")
    prompts = [judge_prompt(tokenizer, p, r) for p, r in zip(predictions, references, strict=True)]
    scores: list[float | None] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="judge reports", unit="batch", disable=not progress):
        answers = generate_judgements(model, tokenizer, prompts[start : start + batch_size], max_new_tokens)
        scores.extend(parse_score(answer) for answer in answers)
    return scores


def judge_summary(scores: Sequence[float | None]) -> dict[str, float]:
    """``judge_score``: the mean of the parsed scores (0-100, M3D's scale; NaN when none parsed);
    ``judge_parsed``: the share of answers that gave a score, in [0, 1]."""
    if not scores:
        raise ValueError("judge_summary needs at least one score (None for an unparsed answer)")
    parsed = [score for score in scores if score is not None]
    return {
        "judge_score": sum(parsed) / len(parsed) if parsed else math.nan,
        "judge_parsed": len(parsed) / len(scores),
    }
