"""REC and REG instruction data on M3D-Seg: M3D's ``MultiPosDataset`` (M3D_FACTS 2.3-2.5).

Referring expression comprehension (REC) asks for a class, by name or by a definition, and is answered
with its box; referring expression generation (REG) gives a box and is answered with the class (and a
definition). Both read every (image, class mask) pair of the M3D-Seg layout
(``data_root/M3D_Seg/<code>/<code>.json``, classes named by ``M3D_Seg/dataset_info.json``), so M3D's 4
samples per pair are :func:`position_datasets`: REC and REG, each by class name and by description. A
class absent from the image (M3D's 1 x 1 x 1 x 1 negative mask) is asked for with an REC question and
answered "there is no ...". The box is :func:`~m3d_lite.data.formats.mask_to_box` of the mask after the
augmentation, so it always matches the image the model sees.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m3d_lite.data.augment import train_augmentation
from m3d_lite.data.datasets import InstructDataset, augmentation_seed, dataset_file, load_volume_tensor
from m3d_lite.data.formats import (
    NEGATIVE_MASK_SHAPE,
    SEG_SPLITS,
    DatasetError,
    box_to_text,
    mask_to_box,
    read_seg_dataset,
)
from m3d_lite.data.text import (
    TERM_DICTIONARY,
    negative_answer,
    rec_answer,
    rec_question,
    reg_answer,
    reg_question,
)


@dataclass(frozen=True)
class SegPair:
    """One (image, class mask) pair of an M3D-Seg split: where it is listed, its files and its class."""

    json_path: Path
    split: str
    entry: int
    image: Path
    mask: Path
    class_name: str


def seg_pairs(data_root: str | os.PathLike, split: str) -> list[SegPair]:
    """Every (image, class mask) pair of ``split`` over the codes of ``M3D_Seg/dataset_info.json``."""
    if split not in SEG_SPLITS:
        raise DatasetError(f"no M3D-Seg split {split!r}; expected one of {list(SEG_SPLITS)}")
    info_path = dataset_file(data_root, "M3D_Seg/dataset_info.json")
    folder = info_path.parent
    pairs = []
    for code, class_names in json.loads(info_path.read_text(encoding="utf-8")).items():
        json_path = folder / code / f"{code}.json"
        if not json_path.is_file():
            raise DatasetError(
                f"{info_path}: lists code {code!r} but {json_path} does not exist; prepare that code or "
                "remove it from dataset_info.json"
            )
        for entry, item in enumerate(read_seg_dataset(json_path).splits.get(split, [])):
            if item.class_index >= len(class_names):
                raise DatasetError(
                    f"{json_path}: {split}[{entry}] {item.label} has class index {item.class_index}, but "
                    f"{info_path} lists {len(class_names)} classes for code {code!r}"
                )
            name = class_names[item.class_index]
            pairs.append(SegPair(json_path, split, entry, folder / item.image, folder / item.label, name))
    if not pairs:
        raise DatasetError(f"{info_path}: no (image, mask) pair in split {split!r} of any code")
    return pairs


def class_definitions(data_root: str | os.PathLike, class_names: set[str]) -> dict[str, list[str]]:
    """Definitions of ``class_names`` from ``M3D_Seg/term_dictionary.json`` (M3D's term_dict), or from
    :data:`~m3d_lite.data.text.TERM_DICTIONARY` when the root has none."""
    path = Path(data_root) / "M3D_Seg" / "term_dictionary.json"
    terms = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else TERM_DICTIONARY
    missing = sorted(name for name in class_names if not terms.get(name))
    if missing:
        where = path if path.is_file() else "m3d_lite.data.text.TERM_DICTIONARY"
        raise DatasetError(
            f"{where}: no definitions for classes {missing}; description prompts need one each"
        )
    return {name: terms[name] for name in class_names}


def load_mask(path: Path, image: Path, image_shape: tuple[int, ...], negative_ok: bool = False) -> np.ndarray:
    """The array of mask file ``path``, checked to have the shape of its ``image`` (or, when ``negative_ok``,
    M3D's 1 x 1 x 1 x 1 negative shape)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask file not found")
    mask = np.load(path, allow_pickle=False)
    if mask.shape != image_shape and not (negative_ok and mask.shape == NEGATIVE_MASK_SHAPE):
        negative = f" or {NEGATIVE_MASK_SHAPE} for an absent class" if negative_ok else ""
        raise DatasetError(
            f"{path}: mask shape {mask.shape} differs from the shape {image_shape} of its image "
            f"{image}; expected the image's shape{negative}"
        )
    return mask


def load_class_mask(pair: SegPair, image_shape: tuple[int, ...]) -> torch.Tensor | None:
    """The bool mask of ``pair`` (1 x D x H x W, the image's shape), or None for M3D's negative mask."""
    mask = load_mask(pair.mask, pair.image, image_shape, negative_ok=True)
    return None if mask.shape == NEGATIVE_MASK_SHAPE else torch.from_numpy(mask.astype(bool))


def augment_with_mask(
    images: torch.Tensor, mask: torch.Tensor | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """M3D's training augmentation of ``images``, rotating and flipping ``mask`` (None: none) with them."""
    if mask is None:
        return train_augmentation(seed=seed)({"image": images})["image"], None
    arrays = train_augmentation(mask_key="mask", seed=seed)({"image": images, "mask": mask})
    return arrays["image"], arrays["mask"]


class SegPairDataset(InstructDataset):
    """Base of the instruction tasks on M3D-Seg (REC and REG here, segmentation in
    :mod:`m3d_lite.data.seg_data`): item ``index`` is pair ``index`` of :func:`seg_pairs`, asked about by
    class name, or by a definition of the class when ``description``.

    Phrasings and definitions are drawn with a generator seeded by :meth:`entropy` (seed, index, task),
    and ``augment=True`` rotates and flips image and mask together with M3D's augmentation seeded the
    same way (:meth:`volume_and_mask`): an item is identical on every call, and the samples of a pair in
    different tasks differ in wording and augmentation. A subclass builds the item (``__getitem__``).
    """

    task = 0  # keeps the random streams of the tasks apart on the same pairs (REC 0, REG 1, seg 2)

    def __init__(
        self,
        data_root: str | os.PathLike,
        split: str,
        tokenizer: Any,
        num_image_tokens: int,
        max_length: int,
        description: bool = False,
        seed: int = 0,
        chat_template: bool = True,
        augment: bool = False,
    ):
        super().__init__(tokenizer, num_image_tokens, max_length, seed, chat_template, augment)
        self.pairs = seg_pairs(data_root, split)
        self.description = description
        names = {pair.class_name for pair in self.pairs}
        self.definitions = class_definitions(data_root, names) if description else {}

    def __len__(self) -> int:
        return len(self.pairs)

    def source(self, index: int) -> str:
        pair = self.pairs[index]
        return f"{pair.json_path}: {pair.split}[{pair.entry}]"

    def entropy(self, index: int) -> tuple[int, int, int]:
        """What seeds the texts and the augmentation of item ``index``: (seed, index, task and wording)."""
        return self.seed, index, 1 + 2 * self.task + self.description

    def definition(self, name: str, rng: np.random.Generator) -> str:
        """One definition of class ``name``, drawn with ``rng``."""
        options = self.definitions[name]
        return options[rng.integers(len(options))]

    def volume_and_mask(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image and bool class mask (None: absent class) of pair ``index``, augmented together when
        ``augment``; errors name the json entry and the file."""
        pair = self.pairs[index]
        try:
            images = load_volume_tensor(pair.image)
            mask = load_class_mask(pair, tuple(images.shape))
        except (FileNotFoundError, DatasetError) as error:
            raise type(error)(f"{self.source(index)}: {error}") from None
        if self.augment:
            images, mask = augment_with_mask(images, mask, augmentation_seed(*self.entropy(index)))
        return images, mask


class PositionDataset(SegPairDataset):
    """Base of REC and REG: a question and an answer about a class and its box.

    An item is :class:`~m3d_lite.data.datasets.InstructDataset`'s plus ``"class_name"`` and ``"box"``,
    the ground-truth box as a float32 tensor of 6 numbers (NaN for an absent class), for evaluation;
    ``InstructCollator`` leaves both out of the batch. The box is that of the mask after augmentation.
    """

    def texts(self, name: str, box_text: str | None, rng: np.random.Generator) -> tuple[str, str]:
        """(question, answer) about class ``name`` whose box is ``box_text`` (None: absent)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        images, mask = self.volume_and_mask(index)
        box = None if mask is None else mask_to_box(mask.numpy(), name=str(pair.mask))
        box_text = None if box is None else box_to_text(box)
        question, answer = self.texts(pair.class_name, box_text, np.random.default_rng(self.entropy(index)))
        return {
            **self.instruct_item(images, question, answer, pair.image),
            "class_name": pair.class_name,
            "box": torch.tensor([math.nan] * 6 if box is None else box, dtype=torch.float32),
        }


class RECDataset(PositionDataset):
    """REC: "where is the <class>?" (or a definition of it) -> an answer holding its box."""

    def texts(self, name: str, box_text: str | None, rng: np.random.Generator) -> tuple[str, str]:
        target = self.definition(name, rng) if self.description else name
        question = rec_question(target, rng, description=self.description)
        if box_text is None:
            return question, negative_answer(name, rng)
        return question, rec_answer(box_text, name, rng, description=self.description)


class REGDataset(PositionDataset):
    """REG: "what is in <box>?" -> the class (and a definition when ``description``); an absent class is
    asked for with an REC question, as M3D does, and answered "there is no ..."."""

    task = 1

    def texts(self, name: str, box_text: str | None, rng: np.random.Generator) -> tuple[str, str]:
        definition = self.definition(name, rng) if self.description else None
        if box_text is None:
            question = rec_question(definition or name, rng, description=self.description)
            return question, negative_answer(name, rng)
        return reg_question(box_text, rng), reg_answer(name, rng, definition)


def position_datasets(
    data_root: str | os.PathLike,
    split: str,
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    seed: int = 0,
    chat_template: bool = True,
    augment: bool = False,
) -> list[Dataset]:
    """M3D's MultiPosDataset as 4 datasets over every M3D-Seg code: REC and REG, each by class name and by
    description, so 4 samples per (image, class mask) pair. Hand them to
    :func:`~m3d_lite.data.datasets.mix_datasets` with the captions and VQA."""
    return [
        cls(
            data_root,
            split,
            tokenizer,
            num_image_tokens,
            max_length,
            description,
            seed,
            chat_template,
            augment,
        )
        for cls in (RECDataset, REGDataset)
        for description in (False, True)
    ]
