"""Does the state that predicts ``[SEG]`` know which organ was asked for? M3D's answers against ours.

    .venv/bin/python benchmarks/seg_prompt_probe.py [--scale small]

The mask prompt is the LLM's last-layer state at the position whose next token is ``[SEG]``
(:func:`m3d_lite.models.seg_pathway.seg_token_states`). This script asks the preset's base LLM (no
training, no image: the question and answer text alone) every seg question about every phantom organ,
answered once with M3D's templates (:data:`~m3d_lite.data.text.M3D_SEG_ANSWERS`, "It is [SEG].") and once
with ours (:data:`~m3d_lite.data.text.SEG_ANSWERS`, "The liver is [SEG]."), and prints per answer set:

- ``organ share``: the share of the states' variance that lies between organs (between-organ sum of
  squares / total), the rest being the wording of question and answer;
- ``held-out acc``: nearest-organ-centroid accuracy (standardised states) on a question template left out
  of the centroids, averaged over the templates;
- ``cos``: the mean cosine similarity of states of different organs.

A decoder can only draw a different mask per organ if its prompt differs per organ, so the first figure
is the one to watch. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from m3d_lite.config import load_preset
from m3d_lite.data.phantom import ORGANS
from m3d_lite.data.text import M3D_SEG_ANSWERS, SEG_ANSWERS, SEG_QUESTIONS
from m3d_lite.models.pretrained import load_llm, load_llm_tokenizer
from m3d_lite.models.seg_pathway import seg_token_states
from m3d_lite.models.tokenizer import SEG_TOKEN, add_m3d_tokens, encode_example, resize_with_mean_init


@torch.no_grad()
def seg_states(llm, tokenizer, answers: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N x H states predicting [SEG], N organ indices, N question-template indices) over every organ x
    question x answer template."""
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    states, organs, questions = [], [], []
    for organ_index, organ in enumerate(ORGANS.values()):
        for question_index, question in enumerate(SEG_QUESTIONS):
            for answer in answers:
                example = encode_example(tokenizer, question.format(organ), answer.format(organ), 0, 512)
                input_ids = example["input_ids"][None]
                hidden = llm(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
                states.append(seg_token_states(hidden, input_ids, seg_id)[0][0])
                organs.append(organ_index)
                questions.append(question_index)
    return torch.stack(states).numpy(), np.array(organs), np.array(questions)


def organ_share(states: np.ndarray, organs: np.ndarray) -> float:
    """Between-organ sum of squares / total sum of squares (eta squared)."""
    centre = states.mean(0)
    between = sum(
        (organs == k).sum() * ((states[organs == k].mean(0) - centre) ** 2).sum() for k in np.unique(organs)
    )
    return float(between / ((states - centre) ** 2).sum())


def held_out_accuracy(states: np.ndarray, organs: np.ndarray, questions: np.ndarray) -> float:
    """Nearest organ centroid on standardised states, each question template held out in turn."""
    standard = (states - states.mean(0)) / (states.std(0) + 1e-6)
    accuracies = []
    for held_out in np.unique(questions):
        test = questions == held_out
        centroids = np.stack([standard[~test & (organs == k)].mean(0) for k in np.unique(organs)])
        distances = ((standard[test][:, None] - centroids[None]) ** 2).sum(-1)
        accuracies.append((distances.argmin(1) == organs[test]).mean())
    return float(np.mean(accuracies))


def cosine_between_organs(states: np.ndarray, organs: np.ndarray) -> float:
    """Mean cosine similarity of two states of different organs."""
    unit = states / np.linalg.norm(states, axis=1, keepdims=True)
    return float((unit @ unit.T)[organs[:, None] != organs[None]].mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="small", help="preset whose LLM is probed")
    parser.add_argument("--llm", default=None, help="Hub id or folder instead of the preset's LLM")
    args = parser.parse_args()
    name = args.llm or load_preset(args.scale)["llm"]["name"]
    tokenizer = load_llm_tokenizer(name)
    add_m3d_tokens(tokenizer)
    llm = load_llm(name).eval()
    resize_with_mean_init(llm, tokenizer)
    print(f"{name}: {len(ORGANS)} organs x {len(SEG_QUESTIONS)} questions x each answer template")
    for label, answers in (("M3D answers", M3D_SEG_ANSWERS), ("naming answers", SEG_ANSWERS)):
        states, organs, questions = seg_states(llm, tokenizer, answers)
        print(
            f"{label:15s} ({answers[0]!r}, ...): organ share {organ_share(states, organs):.3f}, "
            f"held-out acc {held_out_accuracy(states, organs, questions):.2f}, "
            f"cos {cosine_between_organs(states, organs):.3f}"
        )


if __name__ == "__main__":
    main()
