"""Torch datasets that read an M3D-format root, and the collators that batch their items.

Stage 0 needs image-report pairs (:class:`CapDataset`, :class:`ClipCollator`); later stages add their
datasets here and share the small loaders (:func:`load_volume_tensor`, :func:`read_report`).
Every item is a function of (seed, index) alone, so a dataset gives the same item whenever it is asked,
in any process and any epoch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m3d_lite.data.formats import DatasetError, read_cap_json

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


def trim_report(text: str, tokenizer: Any, max_tokens: int, rng: np.random.Generator) -> str:
    """Shorten a report to ``max_tokens`` tokens (special tokens included) the way M3D's CLIP data does.

    A report that fits is returned as is. Otherwise the first sentence (usually the technique: plane,
    phase, window) is kept and the other sentences are tried in an order drawn from ``rng``; each one
    that still fits is appended. So a long report gives a different, still coherent subset per seed:
    augmentation that never cuts a sentence in half. Unlike M3D, which splits on every '.', sentences end
    at a '.' followed by white space, so "3.5 mm" stays whole. The first sentence alone may still be too
    long; the caller truncates then.
    """
    if num_tokens(text, tokenizer) <= max_tokens:
        return text
    first, *others = _SENTENCE_END.split(text.strip())
    kept = [first]
    for i in rng.permutation(len(others)):
        if num_tokens(" ".join([*kept, others[i]]), tokenizer) <= max_tokens:
            kept.append(others[i])
    return " ".join(kept)


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
        self.folder = Path(data_root) / "M3D_Cap"
        json_path = self.folder / "M3D_Cap.json"
        if not json_path.is_file():
            raise FileNotFoundError(
                f"{json_path}: file not found; data_root must be the dataset root that holds M3D_Cap/ "
                "(e.g. the --out folder of `m3d-lite data phantom`)"
            )
        splits = read_cap_json(json_path)
        if split not in splits:
            raise DatasetError(f"{json_path}: no split {split!r}; the splits present are {sorted(splits)}")
        minimum = tokenizer.num_special_tokens_to_add() + 1
        if max_text_len < minimum:
            raise ValueError(
                f"max_text_len must be at least {minimum} (special tokens + 1), got {max_text_len}"
            )
        self.items = splits[split]
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
