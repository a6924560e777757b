"""REC and REG data (M3D's MultiPosDataset) and M3D's training augmentation, on the phantom."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from m3d_lite.data.augment import train_augmentation
from m3d_lite.data.datasets import CaptionDataset, InstructCollator, mix_datasets
from m3d_lite.data.formats import DatasetError, mask_to_box, parse_box
from m3d_lite.data.position import RECDataset, REGDataset, position_datasets
from m3d_lite.data.text import NEGATIVE_ANSWERS, TERM_DICTIONARY
from m3d_lite.models.tokenizer import BOX_END, BOX_START

NUM_IMAGE_TOKENS = 64
MAX_LENGTH = 256
IMAGE_SHAPE = (1, 32, 64, 64)


@pytest.fixture(scope="module")
def datasets(phantom8, tokenizer):
    """REC class, REC description, REG class, REG description on the phantom's train split."""
    return position_datasets(phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)


@pytest.fixture(scope="module")
def augmented(phantom8, tokenizer):
    return position_datasets(phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH, seed=3, augment=True)


def load_mask(dataset, index: int) -> np.ndarray:
    return np.load(dataset.pairs[index].mask)


def is_negative(dataset, index: int) -> bool:
    return load_mask(dataset, index).shape == (1, 1, 1, 1)


def answer_text(item: dict, tokenizer) -> str:
    """The supervised tokens decoded; checks on the way that they are one block at the end (prompt -100)."""
    supervised = (item["labels"] != -100).nonzero().flatten()
    assert torch.equal(supervised, torch.arange(int(supervised[0]), len(item["input_ids"])))
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    return tokenizer.decode(item["input_ids"][supervised], skip_special_tokens=False).strip()


def assert_same_item(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)  # NaN box of negatives
        else:
            assert a[key] == b[key]


def geometries():
    """Every in-plane 90-degree rotation then flips of D, H, W, as functions of a 1 x D x H x W array."""
    for k, flips in itertools.product(range(4), itertools.product((False, True), repeat=3)):
        axes = tuple(axis + 1 for axis, flip in enumerate(flips) if flip)

        def move(array, k=k, axes=axes):
            array = torch.rot90(torch.as_tensor(array), k, dims=(2, 3))
            return torch.flip(array, axes) if axes else array

        yield k, axes, move


def geometry_of(original: torch.Tensor, augmented: torch.Tensor):
    """The rotation and flips that turned ``original`` into ``augmented`` up to M3D's intensity scale and
    shift ((1 + f) x + s with |f|, |s| <= 0.1), as (k, flipped axes, function)."""
    for k, axes, move in geometries():
        moved = move(original).flatten().double()
        if moved.shape != augmented.flatten().shape:
            continue
        design = torch.stack([moved, torch.ones_like(moved)], dim=1)
        (scale, shift), *_ = torch.linalg.lstsq(design, augmented.flatten().double()[:, None])
        fitted = design @ torch.stack([scale, shift])
        if torch.allclose(fitted[:, 0], augmented.flatten().double(), atol=1e-5):
            assert 0.9 - 1e-6 <= scale <= 1.1 + 1e-6 and abs(shift) <= 0.1 + 1e-6
            return k, axes, move
    raise AssertionError("the augmented image is no rotation/flip of the original")


def test_four_samples_per_pair(phantom8, datasets, tokenizer):
    entries = json.loads((phantom8 / "M3D_Seg" / "phantom" / "phantom.json").read_text())["train"]
    assert [(type(d), d.description) for d in datasets] == [
        (RECDataset, False),
        (RECDataset, True),
        (REGDataset, False),
        (REGDataset, True),
    ]
    assert [len(d) for d in datasets] == [len(entries)] * 4
    captions = CaptionDataset(phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, 512)
    assert len(mix_datasets([captions, *datasets])) == len(captions) + 4 * len(entries)
    assert datasets[0].source(5) == f"{phantom8 / 'M3D_Seg' / 'phantom' / 'phantom.json'}: train[5]"


def test_rec_answer_box_is_the_mask_box(datasets, tokenizer):
    for dataset in datasets[:2]:
        for i in range(0, len(dataset), 7):
            if is_negative(dataset, i):
                continue
            item = dataset[i]
            box = mask_to_box(load_mask(dataset, i))
            assert item["images"].shape == IMAGE_SHAPE and item["images"].dtype == torch.float32
            assert BOX_START + str(list(box)) + BOX_END in item["answer"]
            assert parse_box(item["answer"]) == box and BOX_START not in item["question"]
            assert torch.allclose(item["box"], torch.tensor(box))
            assert item["class_name"] in item["answer"] or not dataset.description
            assert answer_text(item, tokenizer) == item["answer"] + tokenizer.eos_token
            if dataset.description:
                assert any(d in item["question"] for d in TERM_DICTIONARY[item["class_name"]])


def test_reg_question_holds_the_box_and_answer_names_the_class(datasets, tokenizer):
    for dataset in datasets[2:]:
        for i in range(0, len(dataset), 7):
            if is_negative(dataset, i):
                continue
            item = dataset[i]
            assert parse_box(item["question"]) == mask_to_box(load_mask(dataset, i))
            assert BOX_START in item["question"] and BOX_START not in item["answer"]
            assert item["class_name"] in item["answer"].lower()
            assert answer_text(item, tokenizer) == item["answer"] + tokenizer.eos_token
            if dataset.description:
                assert any(d in item["answer"] for d in TERM_DICTIONARY[item["class_name"]])


def test_negatives_have_a_negative_answer_and_no_box(datasets, tokenizer):
    negatives = [i for i in range(len(datasets[0])) if is_negative(datasets[0], i)]
    assert negatives, "the phantom's train split should hold an absent class"
    for dataset in datasets:
        for i in negatives:
            item = dataset[i]
            assert item["answer"] in {t.format(item["class_name"]) for t in NEGATIVE_ANSWERS}
            assert BOX_START not in item["question"] + item["answer"]
            assert torch.isnan(item["box"]).all() and item["images"].shape == IMAGE_SHAPE
            assert answer_text(item, tokenizer) == item["answer"] + tokenizer.eos_token


def test_items_are_identical_on_every_call_and_batch(datasets, augmented, tokenizer):
    for dataset in [*datasets, *augmented]:
        for i in (0, 9, len(dataset) - 1):
            assert_same_item(dataset[i], dataset[i])
    batch = InstructCollator(tokenizer)([datasets[0][0], datasets[2][1], augmented[3][2]])
    assert set(batch) == {"images", "input_ids", "attention_mask", "labels"}
    assert batch["images"].shape == (3, *IMAGE_SHAPE)


def test_augmented_box_moves_with_the_mask(datasets, augmented):
    moved = 0
    for plain, dataset in zip(datasets, augmented, strict=True):
        for i in range(0, len(dataset), 5):
            item = dataset[i]
            assert item["images"].shape == IMAGE_SHAPE and type(item["images"]) is torch.Tensor
            original = plain[i]["images"]
            k, axes, move = geometry_of(original, item["images"])
            moved += (k, axes) != (0, ())
            if not is_negative(dataset, i):
                box = mask_to_box(move(load_mask(dataset, i)).numpy())
                assert torch.allclose(item["box"], torch.tensor(box))
                assert parse_box(item["question"] + item["answer"]) == box
    assert moved > 10  # the check is not vacuous: most items were rotated or flipped


def test_the_four_samples_of_a_pair_are_augmented_apart(augmented):
    views = [dataset[0]["images"] for dataset in augmented]
    assert any(not torch.equal(views[0], view) for view in views[1:])


def test_train_augmentation_is_seeded_and_moves_image_and_mask_together():
    image = torch.rand(IMAGE_SHAPE)
    mask = image > 0.95
    results = []
    for seed in range(12):
        out = train_augmentation(mask_key="mask", seed=seed)({"image": image.clone(), "mask": mask.clone()})
        again = train_augmentation(mask_key="mask", seed=seed)({"image": image.clone(), "mask": mask.clone()})
        assert torch.equal(out["image"], again["image"]) and torch.equal(out["mask"], again["mask"])
        assert out["image"].shape == IMAGE_SHAPE and out["mask"].dtype == torch.bool
        *_, move = geometry_of(image, out["image"])
        assert torch.equal(out["mask"], move(mask))
        results.append(out["image"])
    assert len({tuple(r.flatten()[:8].tolist()) for r in results}) > 6  # seeds differ


def test_caption_augmentation_changes_the_image_not_the_text(phantom8, tokenizer):
    args = (phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, 512)
    plain, augmented = CaptionDataset(*args, seed=1), CaptionDataset(*args, seed=1, augment=True)
    changed = 0
    for i in range(len(plain)):
        a, b = plain[i], augmented[i]
        assert a["question"] == b["question"] and a["answer"] == b["answer"]
        assert torch.equal(a["input_ids"], b["input_ids"]) and b["images"].shape == a["images"].shape
        assert torch.equal(b["images"], augmented[i]["images"])
        changed += not torch.equal(a["images"], b["images"])
    assert changed > 0


def test_mask_of_another_shape_is_an_error_naming_the_file(phantom8, tokenizer, tmp_path):
    shutil.copytree(phantom8 / "M3D_Seg", tmp_path / "M3D_Seg")
    dataset = RECDataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
    index = next(i for i in range(len(dataset)) if not is_negative(dataset, i))
    wrong = np.zeros((1, 16, 64, 64), dtype=bool)
    wrong[0, 3, 4, 5] = True
    np.save(dataset.pairs[index].mask, wrong)
    with pytest.raises(DatasetError) as error:
        dataset[index]
    message = str(error.value)
    for expected in (dataset.pairs[index].mask, dataset.pairs[index].image, (1, 16, 64, 64), IMAGE_SHAPE):
        assert str(expected) in message
    assert dataset.source(index) in message


def test_missing_definitions_and_unknown_split_are_clear_errors(phantom8, tokenizer, tmp_path):
    shutil.copytree(phantom8 / "M3D_Seg", tmp_path / "M3D_Seg")
    terms = tmp_path / "M3D_Seg" / "term_dictionary.json"
    terms.write_text(json.dumps({k: v for k, v in TERM_DICTIONARY.items() if k != "liver"}))
    RECDataset(
        tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH
    )  # names only: no definitions needed
    with pytest.raises(DatasetError, match=r"term_dictionary\.json: no definitions for classes \['liver'\]"):
        RECDataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH, description=True)
    with pytest.raises(DatasetError, match="no M3D-Seg split 'validation'"):
        REGDataset(tmp_path, "validation", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
