"""Torch datasets that read an M3D-format root, and the collators that batch their items.

Stage 0 needs image-report pairs (:class:`CapDataset`, :class:`ClipCollator`). The LLM stages need
instruction data, (volume, question, answer) encoded for a causal LM: report generation
(:class:`CaptionDataset`), closed and open VQA (:class:`VQADataset`), batched by :class:`InstructCollator`
and mixed by :func:`mix_datasets`. All share the small loaders (:func:`load_volume_tensor`,
:func:`read_report`, :func:`trim_report`).
Every item is a function of (seed, index) alone, so a dataset gives the same item whenever it is asked,
in any process and any epoch; that holds for M3D's training augmentation too (``augment=True``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import ConcatDataset, Dataset, Subset

from m3d_lite.data.augment import train_augmentation
from m3d_lite.data.formats import VQA_FILES, CapItem, DatasetError, read_cap_json, read_vqa_csv
from m3d_lite.data.text import (
    LETTERS,
    VQAItem,
    caption_prompt,
    closed_vqa_answer,
    closed_vqa_question,
    open_vqa_answer,
    open_vqa_question,
)
from m3d_lite.models.tokenizer import IGNORE_INDEX, encode_example

_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def load_volume_tensor(path: str | os.PathLike) -> torch.Tensor:
    """A prepared ``.npy`` volume as a float32 tensor 1 x D x H x W; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 4 or array.shape[0] != 1:
        raise DatasetError(f"{path}: expected an image of shape 1 x D x H x W, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DatasetError(f"{path}: expected a float image in [0, 1], got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def read_report(path: str | os.PathLike) -> str:
    """The report text of a ``text.txt``, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: report text file not found")
    return path.read_text(encoding="utf-8").strip()


def num_tokens(text: str, tokenizer: Any) -> int:
    """Number of tokens of ``text``, special tokens ([CLS], [SEP]) included."""
    return len(tokenizer(text)["input_ids"])


def trim_report(
    text: str, tokenizer: Any, max_tokens: int, rng: np.random.Generator, keep_order: bool = False
) -> str:
    """Shorten a report to ``max_tokens`` tokens (special tokens included) the way M3D's CLIP data does.

    A report that fits is returned as is. Otherwise the first sentence (usually the technique: plane,
    phase, window) is kept and the other sentences are tried in an order drawn from ``rng``; each one
    that still fits is appended. So a long report gives a different, still coherent subset per seed:
    augmentation that never cuts a sentence in half. ``keep_order=True`` puts the kept sentences back in
    the report's order (a caption target should read like a report). Unlike M3D, which splits on every
    '.', sentences end at a '.' followed by white space, so "3.5 mm" stays whole. The first sentence alone
    may still be too long; the caller truncates then.
    """
    if num_tokens(text, tokenizer) <= max_tokens:
        return text
    sentences = _SENTENCE_END.split(text.strip())
    kept = [0]
    for i in rng.permutation(len(sentences) - 1) + 1:
        if num_tokens(" ".join(sentences[j] for j in [*kept, i]), tokenizer) <= max_tokens:
            kept.append(i)
    return " ".join(sentences[i] for i in (sorted(kept) if keep_order else kept))


def dataset_file(data_root: str | os.PathLike, relative: str) -> Path:
    """``data_root/relative``, which must exist: else an error names it and says what ``data_root`` is."""
    path, folder = Path(data_root) / relative, Path(relative).parts[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: file not found; data_root must be the dataset root that holds {folder}/ "
            "(e.g. the --out folder of `m3d-lite data phantom`)"
        )
    return path


def cap_split(data_root: str | os.PathLike, split: str) -> tuple[Path, list[CapItem]]:
    """The ``M3D_Cap`` folder of ``data_root`` and the (image, text) pairs of ``split`` in its json."""
    json_path = dataset_file(data_root, "M3D_Cap/M3D_Cap.json")
    folder = json_path.parent
    splits = read_cap_json(json_path)
    if split not in splits:
        raise DatasetError(f"{json_path}: no split {split!r}; the splits present are {sorted(splits)}")
    return folder, splits[split]


class CapDataset(Dataset):
    """M3D-Cap image-report pairs of one split: ``data_root/M3D_Cap/M3D_Cap.json``.

    An item is ``{"images": float32 1 x D x H x W, "input_ids": LongTensor (unpadded, at most
    max_text_len tokens with [CLS]/[SEP]), "text": the trimmed report, "image_path": str}``. Reports
    longer than ``max_text_len`` are shortened by :func:`trim_report` with a generator seeded by
    (seed, index), then truncated as a last resort. Files are checked when an item is read.
    """

    def __init__(
        self, data_root: str | os.PathLike, split: str, tokenizer: Any, max_text_len: int, seed: int = 0
    ):
        self.folder, self.items = cap_split(data_root, split)
        minimum = tokenizer.num_special_tokens_to_add() + 1
        if max_text_len < minimum:
            raise ValueError(
                f"max_text_len must be at least {minimum} (special tokens + 1), got {max_text_len}"
            )
        self.split, self.tokenizer, self.max_text_len, self.seed = split, tokenizer, max_text_len, seed

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> Path:
        """Path of the volume of pair ``index``."""
        return self.folder / self.items[index].image

    def report(self, index: int) -> str:
        """The report of pair ``index``, trimmed to ``max_text_len`` tokens (same text on every call)."""
        rng = np.random.default_rng([self.seed, index])
        text = read_report(self.folder / self.items[index].text)
        return trim_report(text, self.tokenizer, self.max_text_len, rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        text = self.report(index)
        input_ids = self.tokenizer(text, truncation=True, max_length=self.max_text_len)["input_ids"]
        return {
            "images": load_volume_tensor(self.image_path(index)),
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "text": text,
            "image_path": str(self.image_path(index)),
        }


class ClipCollator:
    """Batch CapDataset items for the CLIP model: stacked images, right-padded input_ids, attention_mask.

    The batch is padded to its longest text (not to max_text_len), so short reports cost less; string
    fields stay out, so ``model(**batch)`` works.
    """

    def __init__(self, tokenizer: Any):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token first")
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        shapes = {tuple(item["images"].shape) for item in items}
        if len(shapes) > 1:
            paths = [item.get("image_path", "?") for item in items]
            raise DatasetError(f"images of one batch differ in shape {sorted(shapes)}: {paths}")
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : len(item["input_ids"])] = item["input_ids"]
            attention_mask[row, : len(item["input_ids"])] = 1
        images = torch.stack([item["images"] for item in items])
        return {"images": images, "input_ids": input_ids, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------------
# Instruction data for the LLM stages: (volume, question, answer) encoded as a causal-LM example.
def augmentation_seed(*entropy: int) -> int:
    """A 32-bit seed for MONAI's random transforms from ``entropy`` (e.g. seed, index): a stream apart from
    ``np.random.default_rng(entropy)``, so that augmenting does not change an item's text choices."""
    return int(np.random.SeedSequence(list(entropy), spawn_key=(1,)).generate_state(1)[0])


class InstructDataset(Dataset):
    """Base of the instruction datasets: item ``index`` is a volume, a question and an answer.

    A subclass says what they are (:meth:`example`) and where they come from (:meth:`source`, for error
    messages); this class loads the volume and encodes the text with
    :func:`~m3d_lite.models.tokenizer.encode_example`: ``num_image_tokens`` ``<im_patch>`` tokens and the
    question as the prompt (labels -100), the answer and EOS as the target, at most ``max_length`` tokens
    with the image tokens never cut; in the LLM's chat template unless ``chat_template=False`` (M3D's raw
    format). An item is ``{"images": float32 1 x D x H x W, "input_ids", "labels": LongTensors (unpadded),
    "question", "answer": str, "image_path": str}``. ``augment=True`` (training) passes the volume through
    M3D's :func:`~m3d_lite.data.augment.train_augmentation`, seeded by (seed, index): an item is still the
    same on every call, so each item keeps one augmented view for the whole run (augmentation varies
    across items, not across epochs).
    """

    def __init__(
        self,
        tokenizer: Any,
        num_image_tokens: int,
        max_length: int,
        seed: int,
        chat_template: bool,
        augment: bool = False,
    ):
        self.tokenizer, self.num_image_tokens, self.max_length = tokenizer, num_image_tokens, max_length
        self.seed, self.chat_template, self.augment = seed, chat_template, augment

    def encode(self, question: str, answer: str) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``labels`` of one (question, answer) pair (see the class docstring)."""
        return encode_example(
            self.tokenizer, question, answer, self.num_image_tokens, self.max_length, self.chat_template
        )

    def example(self, index: int) -> tuple[Path, str, str]:
        """(image path, question, answer) of item ``index``."""
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Where item ``index`` is defined (file and entry), for error messages."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image_path, question, answer = self.example(index)
            images = load_volume_tensor(image_path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.source(index)}: {error}") from None
        if self.augment:
            images = train_augmentation(seed=augmentation_seed(self.seed, index))({"image": images})["image"]
        return self.instruct_item(images, question, answer, image_path)

    def instruct_item(
        self, images: torch.Tensor, question: str, answer: str, image_path: Path
    ) -> dict[str, Any]:
        """The item of a volume, a question and an answer (see the class docstring)."""
        return {
            "images": images,
            **self.encode(question, answer),
            "question": question,
            "answer": answer,
            "image_path": str(image_path),
        }

    def answer_budget(self, question: str) -> int:
        """How many answer tokens fit after the prompt of ``question`` and before EOS in ``max_length``."""
        return self.max_length - len(self.encode(question, "")["input_ids"])


class CaptionDataset(InstructDataset):
    """Report generation on M3D-Cap (``data_root/M3D_Cap/M3D_Cap.json``): a caption request -> the report.

    The request is one of :data:`~m3d_lite.data.text.CAPTION_PROMPTS` (M3D draws one of its 42 templates
    per item) and a report longer than the answer budget is shortened by :func:`trim_report` (whole
    sentences, the first kept), both with a generator seeded by (seed, index): the same item on every
    call. ``encode_example`` truncates what still does not fit.
    """

    def __init__(
        self,
        data_root: str | os.PathLike,
        split: str,
        tokenizer: Any,
        num_image_tokens: int,
        max_length: int,
        seed: int = 0,
        chat_template: bool = True,
        augment: bool = False,
    ):
        super().__init__(tokenizer, num_image_tokens, max_length, seed, chat_template, augment)
        self.folder, self.items = cap_split(data_root, split)
        self.split = split

    def __len__(self) -> int:
        return len(self.items)

    def example(self, index: int) -> tuple[Path, str, str]:
        rng = np.random.default_rng([self.seed, index])
        question = caption_prompt(rng)
        pair = self.items[index]
        report = read_report(self.folder / pair.text)
        report = trim_report(report, self.tokenizer, self.answer_budget(question), rng, keep_order=True)
        return self.folder / pair.image, question, report

    def source(self, index: int) -> str:
        return f"{self.folder / 'M3D_Cap.json'}: {self.split}[{index}]"


class VQADataset(InstructDataset):
    """M3D-VQA multiple choice (``data_root/M3D_VQA/M3D_VQA_<split>.csv``, images under ``M3D_Cap/``).

    ``closed=True``: M3D's closed-ended form, ``question + " Choices: A. a B. b C. c D. d"`` -> ``"A. a"``;
    ``closed=False``: the question alone -> the answer text. M3D uses every row twice, once in each form:
    build one dataset of each. ``seed`` only seeds the augmentation (the texts hold no random choice).
    """

    def __init__(
        self,
        data_root: str | os.PathLike,
        split: str,
        tokenizer: Any,
        num_image_tokens: int,
        max_length: int,
        closed: bool = True,
        seed: int = 0,
        chat_template: bool = True,
        augment: bool = False,
    ):
        super().__init__(tokenizer, num_image_tokens, max_length, seed, chat_template, augment)
        if split not in VQA_FILES:
            raise DatasetError(f"no M3D-VQA split {split!r}; expected one of {sorted(VQA_FILES)}")
        self.csv_path = dataset_file(data_root, f"M3D_VQA/{VQA_FILES[split]}")
        self.rows = read_vqa_csv(self.csv_path)
        self.image_folder = Path(data_root) / "M3D_Cap"
        self.closed = closed

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, index: int) -> VQAItem:
        """Row ``index`` as a :class:`~m3d_lite.data.text.VQAItem`."""
        row = self.rows[index]
        choices = tuple(row[f"Choice {letter}"] for letter in LETTERS)
        return VQAItem(row["Question Type"], row["Question"], choices, row["Answer Choice"])

    def example(self, index: int) -> tuple[Path, str, str]:
        item = self.item(index)
        if self.closed:
            question, answer = closed_vqa_question(item), closed_vqa_answer(item)
        else:
            question, answer = open_vqa_question(item), open_vqa_answer(item)
        return self.image_folder / self.rows[index]["Image Path"], question, answer

    def source(self, index: int) -> str:
        return f"{self.csv_path}: row {index + 2}"  # line number, the header being line 1


class InstructCollator(ClipCollator):
    """Batch instruction items for training: :class:`ClipCollator`'s images, right-padded input_ids and
    attention_mask, plus labels right-padded with -100 (no loss on padding). Padded to the longest item
    of the batch; string fields stay out, so ``model(**batch)`` works. (Batched generation pads on the
    left instead: ``m3d_lite.models.tokenizer.encode_prompts``.)

    When any item holds a ``"seg_mask"`` (segmentation tasks, :mod:`m3d_lite.data.seg_data`), the batch
    also gets ``"seg_masks"``, B x 1 x D x H x W float, with a zero mask for the other items: as in M3D,
    the seg loss counts only the rows whose mask is not empty. A batch without any keeps the keys above.
    """

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            **super().__call__(items),
            "labels": pad_sequence(
                [item["labels"] for item in items], batch_first=True, padding_value=IGNORE_INDEX
            ),
        }
        if any("seg_mask" in item for item in items):
            batch["seg_masks"] = torch.stack([seg_mask_of(item) for item in items])
        return batch


def seg_mask_of(item: dict[str, Any]) -> torch.Tensor:
    """The float seg mask of an instruction item, of its image's shape: zeros when it has none."""
    if "seg_mask" not in item:
        return torch.zeros_like(item["images"])
    if item["seg_mask"].shape != item["images"].shape:
        raise DatasetError(
            f"{item.get('image_path', '?')}: seg_mask of shape {tuple(item['seg_mask'].shape)} differs from "
            f"its image's {tuple(item['images'].shape)}"
        )
    return item["seg_mask"].float()


def mix_datasets(
    datasets: Sequence[Dataset], weights: Sequence[float] | None = None, seed: int = 0
) -> Dataset:
    """One dataset of several tasks, for the training loop to shuffle.

    ``weights=None``: all items once (a ``ConcatDataset``), so a task is drawn in proportion to its size;
    this is what M3D does (it has no mixing ratios in code). With ``weights`` the mix keeps the same total
    length but dataset ``i`` takes a share ``weights[i] / sum(weights)`` of it (largest-remainder rounding):
    its items are drawn in seeded random passes without replacement, repeated when it is up-sampled, cut
    short when it is down-sampled. The result is a ``Subset`` of the concatenation, the same for the same
    ``seed``; a weight of 0 leaves a dataset out.
    """
    concat = ConcatDataset(datasets)
    if weights is None:
        return concat
    sizes = np.array([len(d) for d in datasets])
    shares = np.asarray(weights, dtype=float)
    if shares.shape != sizes.shape or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"weights must be {len(sizes)} non-negative numbers, not all 0; got {list(weights)}")
    if ((shares > 0) & (sizes == 0)).any():
        raise ValueError(f"a dataset with a positive weight is empty: sizes {sizes.tolist()}")
    exact = shares / shares.sum() * sizes.sum()
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: sizes.sum() - counts.sum()]] += 1
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    indices = []
    for size, count, offset in zip(sizes, counts, offsets, strict=True):
        if count:
            passes = np.concatenate([rng.permutation(size) for _ in range(-(-count // size))])
            indices.extend((passes[:count] + offset).tolist())
    return Subset(concat, indices)
