"""M3D-Bench's generative tasks for a LaMed model: closed VQA, open VQA, report generation, REC, REG and
(referring) segmentation.

Each ``evaluate_*`` answers the first ``limit`` samples of a split (deterministic, all when None) by
batched greedy decoding (:func:`m3d_lite.infer.generate_answers`; M3D decodes one sample at a time), scores
every answer (:mod:`m3d_lite.eval.metrics`, :mod:`m3d_lite.eval.boxes`) and returns a :class:`TaskResult`:
per-sample rows, as M3D's CSVs, and the means M3D leaves to be computed offline. Text scores are M3D's
BLEU-1 and ROUGE-1 plus the standard ROUGE-L (and corpus BLEU-4 for reports); where M3D's rule for a score
differs from the standard one (closed-VQA correctness, box IoU) both are kept, M3D's labelled ``_m3d``.
Segmentation also decodes the mask of each answer's ``[SEG]`` (:func:`m3d_lite.infer.generate_with_masks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from m3d_lite.data.datasets import (
    CaptionDataset,
    InstructCollator,
    InstructDataset,
    VQADataset,
    read_report,
)
from m3d_lite.data.formats import NEGATIVE_MASK_SHAPE, QUESTION_TYPES, box_in_range, parse_box
from m3d_lite.data.position import RECDataset, REGDataset, SegPair
from m3d_lite.data.seg_data import RefSegDataset, SegTaskDataset
from m3d_lite.eval.boxes import accuracy_at, box_iou, m3d_box_iou
from m3d_lite.eval.metrics import (
    bertscore_f1,
    bleu1_m3d,
    closed_vqa_correct_exact,
    closed_vqa_correct_m3d,
    corpus_bleu4,
    meteor,
    rouge1,
    rouge_l,
)
from m3d_lite.infer import generate_answers, generate_with_masks
from m3d_lite.io import save_csv
from m3d_lite.models.lamed import LaMedForCausalLM
from m3d_lite.models.segmentation import seg_losses

SEG_SCORES = ("dice", "dice_forced", "soft_dice_forced", "generated_seg")
REFSEG_QUESTION_TYPES = {0: "description", 1: "reasoning"}  # M3D-RefSeg's Question_Type


@dataclass
class TaskResult:
    """One task's per-sample ``rows`` (dicts with the same keys) and ``summary`` means, in [0, 1]."""

    task: str
    rows: list[dict[str, Any]]
    summary: dict[str, float]


def write_rows_csv(result: TaskResult, path: str | os.PathLike) -> Path:
    """Save ``result.rows`` as CSV atomically, one column per row key (a missing box is an empty cell)."""
    return save_csv(path, result.rows, list(result.rows[0]) if result.rows else [])


def answer_in_batches(
    dataset: InstructDataset,
    indices: Sequence[int],
    batch_size: int,
    desc: str,
    progress: bool,
    answer: Callable[[list[dict[str, Any]]], list[Any]],
) -> list[tuple[dict[str, Any], Any]]:
    """(item, its entry of ``answer(batch)``) for the ``indices`` of ``dataset``, read and answered
    ``batch_size`` at a time; the items come back without their volume, tokens and mask."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    items = (dataset[i] for i in indices)
    results = []
    with tqdm(total=len(indices), desc=desc, unit="sample", disable=not progress) as bar:
        while batch := list(islice(items, batch_size)):
            answers = answer(batch)
            kept = (
                {k: v for k, v in item.items() if k not in ("images", "input_ids", "labels", "seg_mask")}
                for item in batch
            )
            results.extend(zip(kept, answers, strict=True))
            bar.update(len(batch))
    if not results:
        raise ValueError(f"{desc}: no sample to evaluate (empty split, or limit 0)")
    return results


def predict(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    dataset: InstructDataset,
    indices: Sequence[int],
    batch_size: int,
    max_new_tokens: int,
    desc: str,
    progress: bool,
) -> list[tuple[dict[str, Any], str]]:
    """(item, greedy answer to its ``"question"`` about its ``"images"``) for the ``indices`` of ``dataset``
    (see :func:`answer_in_batches`)."""

    def answer(batch: list[dict[str, Any]]) -> list[str]:
        images = torch.stack([item["images"] for item in batch])
        return generate_answers(
            model, tokenizer, images, [item["question"] for item in batch], max_new_tokens
        )

    return answer_in_batches(dataset, indices, batch_size, desc, progress, answer)


def head(count: int, limit: int | None) -> range:
    """Positions of the first ``limit`` of ``count`` samples (all when None)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None (all samples) or at least 0, got {limit}")
    return range(count if limit is None else min(limit, count))


def is_positive(pair: SegPair) -> bool:
    """Whether the class of ``pair`` is in its image: its mask is not M3D's 1 x 1 x 1 x 1 negative (only
    the .npy header is read)."""
    return np.load(pair.mask, mmap_mode="r", allow_pickle=False).shape != NEGATIVE_MASK_SHAPE


def first_positives(pairs: Sequence[SegPair], limit: int | None) -> list[int]:
    """Positions of the first ``limit`` pairs whose class is in the image (all when None)."""
    positives = [i for i, pair in enumerate(pairs) if is_positive(pair)]
    return [positives[i] for i in head(len(positives), limit)]


def mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of ``row[key]`` over ``rows`` (a flag counts as 0 or 1)."""
    return sum(float(row[key]) for row in rows) / len(rows)


def means_by(
    rows: list[dict[str, Any]], keys: Iterable[str], group: str, names: Iterable[str]
) -> dict[str, float]:
    """Mean of each of ``keys`` over ``rows`` (``"key"``), and over the rows whose ``row[group]`` is each
    of ``names`` (``"key/name"``, for the names present, in ``names`` order)."""
    summary = {}
    for key in keys:
        summary[key] = mean(rows, key)
        for name in names:
            of_name = [row for row in rows if row[group] == name]
            if of_name:
                summary[f"{key}/{name}"] = mean(of_name, key)
    return summary


def means_by_type(rows: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, float]:
    """:func:`means_by` question type (``"key/plane"``, ..., in :data:`~m3d_lite.data.formats.QUESTION_TYPES`
    order)."""
    return means_by(rows, keys, "question_type", QUESTION_TYPES.values())


TEXT_SCORES = ("bleu1", "rouge1", "meteor", "bertscore", "rouge_l")


def text_scores(prediction: str, reference: str) -> dict[str, float]:
    """M3D's four text metrics of one answer (BLEU-1, ROUGE-1, METEOR; BERTScore F1 with the offline MiniLM
    encoder instead of M3D's roberta-large) and the standard ROUGE-L; keys :data:`TEXT_SCORES`."""
    return {
        "bleu1": bleu1_m3d(prediction, reference),
        "rouge1": rouge1(prediction, reference),
        "meteor": meteor(prediction, reference),
        "bertscore": bertscore_f1([prediction], [reference])[0],
        "rouge_l": rouge_l(prediction, reference),
    }


def evaluate_vqa(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str,
    limit: int | None,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    closed: bool,
    score: Callable[[str, Any], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Rows of the closed (or open) VQA questions of ``split``: type name, question, prediction, answer,
    then ``score(prediction, VQAItem)``."""
    config = model.config
    dataset = VQADataset(data_dir, split, tokenizer, config.proj_out_num, config.model_max_length, closed)
    desc = f"{'closed' if closed else 'open'} VQA ({split})"
    indices = head(len(dataset), limit)
    answered = predict(model, tokenizer, dataset, indices, batch_size, max_new_tokens, desc, progress)
    rows = []
    for i, (item, prediction) in enumerate(answered):
        vqa = dataset.item(i)
        rows.append(
            {
                "image": item["image_path"],
                "question_type": QUESTION_TYPES[vqa.question_type],
                "question": item["question"],
                "prediction": prediction,
                "answer": item["answer"],
                **score(prediction, vqa),
            }
        )
    return rows


def evaluate_closed_vqa(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> TaskResult:
    """Closed-ended VQA ("... Choices: A. a B. b C. c D. d" -> "A. a") on the first ``limit`` rows of
    ``split``. Rows: image, question_type (name), question, prediction, answer, correct_m3d, correct_exact;
    summary: ``accuracy_m3d`` (M3D's "letter." anywhere) and ``accuracy_exact`` (the answer is the right
    choice), overall and per question type (``accuracy_m3d/plane``, ...)."""

    def score(prediction: str, vqa: Any) -> dict[str, bool]:
        return {
            "correct_m3d": closed_vqa_correct_m3d(prediction, vqa.answer_letter, vqa.answer),
            "correct_exact": closed_vqa_correct_exact(prediction, vqa.answer_letter, vqa.answer),
        }

    rows = evaluate_vqa(
        model, tokenizer, data_dir, split, limit, batch_size, max_new_tokens, progress, True, score
    )
    summary = means_by_type(rows, ("correct_m3d", "correct_exact"))
    summary = {key.replace("correct", "accuracy", 1): value for key, value in summary.items()}
    return TaskResult("closed_vqa", rows, summary)


def evaluate_open_vqa(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> TaskResult:
    """Open-ended VQA (the question alone -> the text of the right choice) on the first ``limit`` rows of
    ``split``. Rows: image, question_type, question, prediction, answer, bleu1, rouge1, rouge_l; summary:
    their means, overall and per question type (``bleu1/plane``, ...)."""
    rows = evaluate_vqa(
        model,
        tokenizer,
        data_dir,
        split,
        limit,
        batch_size,
        max_new_tokens,
        progress,
        False,
        lambda prediction, vqa: text_scores(prediction, vqa.answer),
    )
    return TaskResult("open_vqa", rows, means_by_type(rows, TEXT_SCORES))


def evaluate_reports(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> TaskResult:
    """Report generation on the first ``limit`` M3D-Cap volumes of ``split``, each asked with its seeded
    caption prompt. The reference is the FULL report, as in M3D, not the copy trimmed to the training
    length. Rows: image, question, prediction, answer, bleu1, rouge1, rouge_l; summary: their means and
    ``corpus_bleu4`` (standard, over all rows)."""
    config = model.config
    dataset = CaptionDataset(data_dir, split, tokenizer, config.proj_out_num, config.model_max_length)
    indices = head(len(dataset), limit)
    answered = predict(
        model, tokenizer, dataset, indices, batch_size, max_new_tokens, f"reports ({split})", progress
    )
    rows = []
    for i, (item, prediction) in enumerate(answered):
        report = read_report(dataset.folder / dataset.items[i].text)
        rows.append(
            {
                "image": item["image_path"],
                "question": item["question"],
                "prediction": prediction,
                "answer": report,
                **text_scores(prediction, report),
            }
        )
    summary = {key: mean(rows, key) for key in TEXT_SCORES}
    summary["corpus_bleu4"] = corpus_bleu4([r["prediction"] for r in rows], [r["answer"] for r in rows])
    return TaskResult("reports", rows, summary)


def evaluate_rec(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> TaskResult:
    """REC by class name ("where is the liver?") on the first ``limit`` POSITIVE (image, class) pairs of
    M3D-Seg ``split``: pairs whose class is absent (no box to find) are skipped. M3D also asks by
    description; that is not evaluated here.

    The box is the first ``[6 numbers]`` of the answer: the ``<bx_start>``/``<bx_end>`` tokens are special
    and decoded away, the numbers and brackets remain. Rows: image, class_name, question, prediction,
    answer, box (None when no valid box: none parsed, or outside [0, 1], or a start after its end),
    target_box, iou (true 3D IoU, 0 without a box), iou_m3d (M3D's enclosing-box ratio, -1 without a box
    as in M3D's CSV). Summary: ``iou`` (mean true IoU), ``acc@0.5`` (share with true IoU >= 0.5),
    ``iou_m3d`` (mean of M3D's ratio counting a missing box as 0, not -1) and ``box_found``.
    """
    config = model.config
    dataset = RECDataset(data_dir, split, tokenizer, config.proj_out_num, config.model_max_length)
    indices = first_positives(dataset.pairs, limit)
    answered = predict(
        model, tokenizer, dataset, indices, batch_size, max_new_tokens, f"REC ({split})", progress
    )
    rows = []
    for item, prediction in answered:
        target = [round(v, 6) for v in item["box"].tolist()]  # float32 noise off the CSV
        box = parse_box(prediction)
        box = list(box) if box_in_range(box) else None
        rows.append(
            {
                "image": item["image_path"],
                "class_name": item["class_name"],
                "question": item["question"],
                "prediction": prediction,
                "answer": item["answer"],
                "box": box,
                "target_box": target,
                "iou": 0.0 if box is None else box_iou(box, target),
                "iou_m3d": -1.0 if box is None else m3d_box_iou(box, target),
            }
        )
    summary = {
        "iou": mean(rows, "iou"),
        "acc@0.5": accuracy_at([row["iou"] for row in rows], 0.5),
        "iou_m3d": sum(max(row["iou_m3d"], 0.0) for row in rows) / len(rows),
        "box_found": sum(row["box"] is not None for row in rows) / len(rows),
    }
    return TaskResult("rec", rows, summary)


def evaluate_reg(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> TaskResult:
    """REG by class ("what is in [box]?" -> the class name) on the first ``limit`` POSITIVE (image, class)
    pairs of M3D-Seg ``split``, as in :func:`evaluate_rec`. M3D scores REG with the text scores only; we
    add ``class_named``: the class name appears in the prediction (case-insensitive), the question REG
    really asks. M3D also asks for a description of the class; that is not evaluated here.

    Rows: image, class_name, question, prediction, answer (the dataset's phrasing), bleu1, rouge1,
    rouge_l, class_named. Summary: their means.
    """
    config = model.config
    dataset = REGDataset(data_dir, split, tokenizer, config.proj_out_num, config.model_max_length)
    indices = first_positives(dataset.pairs, limit)
    answered = predict(
        model, tokenizer, dataset, indices, batch_size, max_new_tokens, f"REG ({split})", progress
    )
    rows = [
        {
            "image": item["image_path"],
            "class_name": item["class_name"],
            "question": item["question"],
            "prediction": prediction,
            "answer": item["answer"],
            **text_scores(prediction, item["answer"]),
            "class_named": item["class_name"].lower() in prediction.lower(),
        }
        for item, prediction in answered
    ]
    summary = {key: mean(rows, key) for key in (*TEXT_SCORES, "class_named")}
    return TaskResult("reg", rows, summary)


def segment(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    dataset: SegTaskDataset | RefSegDataset,
    indices: Sequence[int],
    batch_size: int,
    max_new_tokens: int,
    desc: str,
    progress: bool,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(item, scores) for the ``indices`` of a segmentation ``dataset``: the generated answer
    (``prediction``), ``generated_seg`` (it holds ``[SEG]``), ``dice`` of its mask against the item's
    (M3D's: MONAI ``compute_dice`` of the sigmoid > 0.5 mask, no ``[SEG]`` = an empty mask = 0), and, from
    the true answer teacher-forced through ``model(...)``, ``dice_forced`` (the same Dice) and
    ``soft_dice_forced`` (1 - M3D's soft Dice loss, :func:`~m3d_lite.models.segmentation.seg_losses`): the
    decoder alone, whatever the LLM writes. A true answer truncated before its ``[SEG]`` scores 0 there.
    ``prompt``: the teacher-forced mask prompt (None without one), for :func:`prompt_cosine`."""
    collate = InstructCollator(tokenizer)

    @torch.no_grad()
    def answer(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        collated = collate(batch)
        truth = collated["seg_masks"] > 0.5
        answers, masks = generate_with_masks(
            model, tokenizer, collated["images"], [item["question"] for item in batch], max_new_tokens
        )
        generated = torch.stack(
            [torch.zeros_like(t) if m is None else m for m, t in zip(masks, truth, strict=True)]
        )
        del collated["labels"]  # no language-model loss needed
        output = model(**{key: value.to(model.device) for key, value in collated.items()})
        forced = torch.full(truth.shape, -torch.inf)  # sigmoid 0: an empty mask where no [SEG] was forced
        prompts: list[torch.Tensor | None] = [None] * len(batch)
        if output.seg_logits is not None:
            has_seg = (collated["input_ids"][:, 1:] == model.config.seg_token_id).any(1)
            rows = has_seg & truth.flatten(1).any(1)
            forced[rows] = output.seg_logits.float().cpu()
            prompted = rows.nonzero()[:, 0].tolist()
            for i, prompt in zip(prompted, output.seg_prompts.float().cpu(), strict=True):
                prompts[i] = prompt
        dice = compute_dice(generated, truth, ignore_empty=False)[:, 0].tolist()
        dice_forced = compute_dice(forced.sigmoid() > 0.5, truth, ignore_empty=False)[:, 0].tolist()
        return [
            {
                "prediction": answers[i],
                "generated_seg": masks[i] is not None,
                "dice": dice[i],
                "dice_forced": dice_forced[i],
                "soft_dice_forced": 1 - seg_losses(forced[i : i + 1], truth[i : i + 1])["dice"].item(),
                "prompt": prompts[i],
            }
            for i in range(len(batch))
        ]

    return answer_in_batches(dataset, indices, batch_size, desc, progress, answer)


def prompt_cosine(rows: list[dict[str, Any]], target: Callable[[dict[str, Any]], Any]) -> float | None:
    """Mean cosine similarity of the mask prompts of rows asking for different ``target``s, and pops each
    row's ``prompt``. Near 1, the decoder gets the same prompt whatever was asked and can only draw one
    average mask: the first thing to look at when Dice stays low. None with fewer than two targets (the
    summaries then leave it out, as NaN would not survive a JSON round trip)."""
    prompted = [(target(row), row.pop("prompt")) for row in rows]
    prompted = [(name, prompt) for name, prompt in prompted if prompt is not None]
    if len({name for name, _ in prompted}) < 2:
        return None
    names = [name for name, _ in prompted]
    unit = torch.nn.functional.normalize(torch.stack([prompt for _, prompt in prompted]), dim=1)
    different = torch.tensor([[a != b for b in names] for a in names])
    return (unit @ unit.T)[different].mean().item()


def require_seg_module(model: LaMedForCausalLM, task: str) -> None:
    """A ValueError naming ``task`` when ``model`` cannot produce masks."""
    if model.seg_module is None:
        raise ValueError(f"{task}: this model has no seg module; train stage 2 with segmentation first")


def evaluate_segmentation(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> TaskResult:
    """Semantic segmentation by class name ("can you segment the liver?") on the first ``limit``
    POSITIVE (image, class) pairs of M3D-Seg ``split`` (absent classes are skipped, as in REC).

    M3D reports the Dice of the mask decoded from the generated ``[SEG]`` (sigmoid > 0.5; none: Dice 0);
    we add the teacher-forced Dice of the decoder fed the true answer (see :func:`segment`). Rows: image,
    class_name, question, prediction, generated_seg, dice, dice_forced, soft_dice_forced. Summary: the
    means of dice, dice_forced, soft_dice_forced and generated_seg (the share of answers with ``[SEG]``),
    overall and per class (``dice/liver``, ...), and ``prompt_cosine`` between classes
    (:func:`prompt_cosine`; left out with fewer than two classes).
    """
    require_seg_module(model, "segmentation")
    config = model.config
    dataset = SegTaskDataset(data_dir, split, tokenizer, config.proj_out_num, config.model_max_length)
    indices = first_positives(dataset.pairs, limit)
    scored = segment(
        model, tokenizer, dataset, indices, batch_size, max_new_tokens, f"segmentation ({split})", progress
    )
    rows = [
        {
            "image": item["image_path"],
            "class_name": item["class_name"],
            "question": item["question"],
            **scores,
        }
        for item, scores in scored
    ]
    classes = sorted({row["class_name"] for row in rows})
    summary = means_by(rows, SEG_SCORES, "class_name", classes)
    if (cosine := prompt_cosine(rows, lambda row: row["class_name"])) is not None:
        summary["prompt_cosine"] = cosine
    return TaskResult("segmentation", rows, summary)


def evaluate_referring_segmentation(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 48,
    progress: bool = True,
) -> TaskResult:
    """Referring segmentation on the first ``limit`` rows of M3D-RefSeg ``split``, asked with the csv
    question; scored as :func:`evaluate_segmentation` (M3D: Dice of the generated mask; added: the
    teacher-forced Dice). Rows: image, mask_id, question_type (description or reasoning), question,
    prediction, generated_seg, dice, dice_forced, soft_dice_forced. Summary: the means of dice,
    dice_forced, soft_dice_forced and generated_seg, overall and per question type (``dice/reasoning``, ...),
    and ``prompt_cosine`` between different masks (left out with fewer than two).
    """
    require_seg_module(model, "referring segmentation")
    config = model.config
    dataset = RefSegDataset(data_dir, split, tokenizer, config.proj_out_num, config.model_max_length)
    indices = head(len(dataset), limit)
    scored = segment(
        model, tokenizer, dataset, indices, batch_size, max_new_tokens, f"referring seg ({split})", progress
    )
    rows = [
        {
            "image": item["image_path"],
            "mask_id": item["mask_id"],
            "question_type": REFSEG_QUESTION_TYPES[dataset.rows[i]["Question_Type"]],
            "question": item["question"],
            **scores,
        }
        for i, (item, scores) in zip(indices, scored, strict=True)
    ]
    summary = means_by(rows, SEG_SCORES, "question_type", REFSEG_QUESTION_TYPES.values())
    if (cosine := prompt_cosine(rows, lambda row: (row["image"], row["mask_id"]))) is not None:
        summary["prompt_cosine"] = cosine
    return TaskResult("referring_segmentation", rows, summary)
