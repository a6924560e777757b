"""Segmentation instruction data: M3D's ``MultiSegDataset`` (M3D_FACTS 2.3, 2.4 and 3.4).

Three tasks teach the LLM to answer with ``[SEG]``, the token whose hidden state prompts the seg module:
semantic segmentation of every (image, class mask) pair of M3D-Seg, asked for by class name or by a
definition of the class (:class:`SegTaskDataset`), and referring segmentation of M3D-RefSeg, whose csv
rows hold free-form questions and answers about one region of an integer label mask
(:class:`RefSegDataset`). An item carries its target as ``"seg_mask"`` (float 1 x D x H x W in {0, 1}),
which :class:`~m3d_lite.data.datasets.InstructCollator` stacks into the batch's ``"seg_masks"``. A class
absent from the image is asked for all the same and answered "there is no ..." without ``[SEG]``, with
an all-zero mask: M3D computes the seg loss only on rows whose mask is not empty.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m3d_lite.data.datasets import InstructDataset, augmentation_seed, dataset_file, load_volume_tensor
from m3d_lite.data.formats import REFSEG_FILES, DatasetError, read_refseg_csv
from m3d_lite.data.position import SegPairDataset, augment_with_mask, load_mask
from m3d_lite.data.text import negative_answer, seg_answer, seg_question


class SegTaskDataset(SegPairDataset):
    """Semantic segmentation on M3D-Seg: "can you segment the <class>?" (or a definition of it) -> an
    answer with exactly one ``[SEG]``; an absent class -> "there is no <class>" and a zero mask.

    An item is :class:`~m3d_lite.data.datasets.InstructDataset`'s plus ``"class_name"`` and
    ``"seg_mask"``, the class mask after augmentation as float32 1 x D x H x W.
    """

    task = 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        images, mask = self.volume_and_mask(index)
        rng = np.random.default_rng(self.entropy(index))
        target = self.definition(pair.class_name, rng) if self.description else pair.class_name
        question = seg_question(target, rng, description=self.description)
        if mask is None:
            answer, seg_mask = negative_answer(pair.class_name, rng), torch.zeros_like(images)
        else:
            answer = seg_answer(pair.class_name, rng, description=self.description)
            seg_mask = mask.float()
        return {
            **self.instruct_item(images, question, answer, pair.image),
            "class_name": pair.class_name,
            "seg_mask": seg_mask,
        }


def load_region_mask(path: Path, image: Path, image_shape: tuple[int, ...], region_id: int) -> torch.Tensor:
    """The bool mask of region ``region_id`` of an M3D-RefSeg integer label mask (``mask == Mask_ID``), of
    its image's shape; an error when the region is not in the mask (it would train on an empty target)."""
    regions = load_mask(path, image, image_shape)
    if not np.issubdtype(regions.dtype, np.integer) and regions.dtype != np.bool_:
        raise DatasetError(f"{path}: expected an integer region-label mask, got dtype {regions.dtype}")
    mask = regions == region_id
    if not mask.any():
        present = sorted(int(v) for v in np.unique(regions) if v)
        raise DatasetError(f"{path}: Mask_ID {region_id} is not a region of this mask (regions {present})")
    return torch.from_numpy(mask)


class RefSegDataset(InstructDataset):
    """Referring segmentation on M3D-RefSeg (``data_root/M3D_RefSeg/M3D_RefSeg_<split>.csv``): each row's
    Question -> its Answer (one ``[SEG]`` and an explanation), the target being region ``Mask_ID`` of the
    integer label mask ``Mask`` of the volume ``Image`` (paths relative to ``M3D_RefSeg/``).

    An item is :class:`~m3d_lite.data.datasets.InstructDataset`'s plus ``"mask_id"`` and ``"seg_mask"``,
    the region after augmentation as float32 1 x D x H x W. ``seed`` only seeds the augmentation (the
    texts are the csv's). Errors name the csv file and row.
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
        if split not in REFSEG_FILES:
            raise DatasetError(f"no M3D-RefSeg split {split!r}; expected one of {sorted(REFSEG_FILES)}")
        self.csv_path = dataset_file(data_root, f"M3D_RefSeg/{REFSEG_FILES[split]}")
        self.folder = self.csv_path.parent
        self.rows = read_refseg_csv(self.csv_path)

    def __len__(self) -> int:
        return len(self.rows)

    def source(self, index: int) -> str:
        return f"{self.csv_path}: row {index + 2}"  # line number, the header being line 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image_path = self.folder / row["Image"]
        try:
            images = load_volume_tensor(image_path)
            shape = tuple(images.shape)
            mask = load_region_mask(self.folder / row["Mask"], image_path, shape, row["Mask_ID"])
        except (FileNotFoundError, DatasetError) as error:
            raise type(error)(f"{self.source(index)}: {error}") from None
        if self.augment:
            images, mask = augment_with_mask(images, mask, augmentation_seed(self.seed, index))
        return {
            **self.instruct_item(images, row["Question"], row["Answer"], image_path),
            "mask_id": row["Mask_ID"],
            "seg_mask": mask.float(),
        }


def segmentation_datasets(
    data_root: str | os.PathLike,
    split: str,
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    seed: int = 0,
    chat_template: bool = True,
    augment: bool = False,
) -> list[Dataset]:
    """M3D's MultiSegDataset as 3 datasets: segmentation by class name and by description over every
    M3D-Seg code (2 samples per image-class pair), then M3D-RefSeg (1 per csv row). Hand them to
    :func:`~m3d_lite.data.datasets.mix_datasets` with the other tasks."""
    args = (data_root, split, tokenizer, num_image_tokens, max_length)
    return [
        *(SegTaskDataset(*args, description, seed, chat_template, augment) for description in (False, True)),
        RefSegDataset(*args, seed, chat_template, augment),
    ]
