"""Segmentation instruction data (M3D's MultiSegDataset) on the phantom: seg by class and by description,
RefSeg, their augmentation, and the seg masks of InstructCollator."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from test_position_data import IMAGE_SHAPE, MAX_LENGTH, NUM_IMAGE_TOKENS, answer_text, geometry_of

from m3d_lite.data.datasets import CaptionDataset, InstructCollator
from m3d_lite.data.formats import SEG_TOKEN, DatasetError
from m3d_lite.data.seg_data import RefSegDataset, SegTaskDataset, segmentation_datasets
from m3d_lite.data.text import NEGATIVE_ANSWERS, TERM_DICTIONARY


@pytest.fixture(scope="module")
def datasets(phantom8, tokenizer):
    """Seg by class, seg by description, RefSeg on the phantom's train split."""
    return segmentation_datasets(phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)


@pytest.fixture(scope="module")
def augmented(phantom8, tokenizer):
    return segmentation_datasets(
        phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH, seed=3, augment=True
    )


def csv_rows(dataset: RefSegDataset) -> list[dict[str, str]]:
    with open(dataset.csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def region_mask(dataset: RefSegDataset, index: int) -> np.ndarray:
    """(mask file == Mask_ID) of row ``index``, read independently of the code under test."""
    row = csv_rows(dataset)[index]
    return np.load(dataset.folder / row["Mask"]) == int(row["Mask_ID"])


def test_three_datasets_as_long_as_the_pairs_and_rows(phantom8, datasets):
    entries = json.loads((phantom8 / "M3D_Seg" / "phantom" / "phantom.json").read_text())["train"]
    assert [type(d) for d in datasets] == [SegTaskDataset, SegTaskDataset, RefSegDataset]
    assert [d.description for d in datasets[:2]] == [False, True]
    refseg = datasets[2]
    assert [len(d) for d in datasets] == [len(entries), len(entries), len(csv_rows(refseg))]
    assert len(refseg) > 0
    assert refseg.source(2) == f"{phantom8 / 'M3D_RefSeg' / 'M3D_RefSeg_train.csv'}: row 4"


def test_seg_answers_hold_one_seg_and_the_mask_file_or_none_and_zeros(datasets, tokenizer):
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    negatives = 0
    for dataset in datasets[:2]:
        for i in range(len(dataset)):
            item = dataset[i]
            mask = np.load(dataset.pairs[i].mask)
            assert item["images"].shape == item["seg_mask"].shape == IMAGE_SHAPE
            assert item["seg_mask"].dtype == torch.float32
            assert answer_text(item, tokenizer) == item["answer"] + tokenizer.eos_token
            if mask.shape == (1, 1, 1, 1):
                negatives += 1
                assert item["answer"] in {t.format(item["class_name"]) for t in NEGATIVE_ANSWERS}
                assert SEG_TOKEN not in item["answer"] and seg_id not in item["input_ids"]
                assert not item["seg_mask"].any()
            else:
                assert item["answer"].count(SEG_TOKEN) == 1 and (item["labels"] == seg_id).sum() == 1
                assert torch.equal(item["seg_mask"], torch.from_numpy(mask).float())
            if dataset.description:
                assert any(d in item["question"] for d in TERM_DICTIONARY[item["class_name"]])
            else:
                assert item["class_name"] in item["question"]
    assert negatives > 0, "the phantom's train split should hold an absent class"


def test_refseg_items_are_the_csv_rows_and_their_region(datasets, tokenizer):
    refseg = datasets[2]
    rows = csv_rows(refseg)
    for i in range(0, len(refseg), 2):
        item = refseg[i]
        assert (item["question"], item["answer"]) == (rows[i]["Question"], rows[i]["Answer"])
        assert item["answer"].count(SEG_TOKEN) == 1 and item["mask_id"] == int(rows[i]["Mask_ID"])
        assert item["image_path"] == str(refseg.folder / rows[i]["Image"])
        assert torch.equal(item["seg_mask"], torch.from_numpy(region_mask(refseg, i)).float())
        assert item["seg_mask"].any() and item["seg_mask"].shape == item["images"].shape == IMAGE_SHAPE
        assert answer_text(item, tokenizer) == item["answer"] + tokenizer.eos_token


def test_augmentation_moves_image_and_mask_together_and_is_deterministic(datasets, augmented):
    moved = 0
    for plain, dataset in zip(datasets, augmented, strict=True):
        for i in range(0, len(dataset), 4):
            item = dataset[i]
            original = plain[i]
            k, axes, move = geometry_of(original["images"], item["images"])
            moved += (k, axes) != (0, ())
            assert torch.equal(item["seg_mask"], move(original["seg_mask"]))
            assert torch.equal(item["seg_mask"], dataset[i]["seg_mask"])
            assert torch.equal(item["images"], dataset[i]["images"])
            assert item["answer"] == dataset[i]["answer"]
    assert moved > 5  # the check is not vacuous: many items were rotated or flipped


def test_collator_adds_seg_masks_only_to_batches_with_a_seg_item(phantom8, datasets, tokenizer):
    caption = CaptionDataset(phantom8, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)[0]
    collate = InstructCollator(tokenizer)
    refseg = datasets[2][0]
    batch = collate([caption, refseg])
    assert set(batch) == {"images", "input_ids", "attention_mask", "labels", "seg_masks"}
    assert batch["seg_masks"].shape == (2, *IMAGE_SHAPE) and batch["seg_masks"].dtype == torch.float32
    assert not batch["seg_masks"][0].any() and torch.equal(batch["seg_masks"][1], refseg["seg_mask"])
    assert set(collate([caption, caption])) == {"images", "input_ids", "attention_mask", "labels"}


def test_refseg_row_whose_region_is_absent_is_an_error_naming_csv_row_and_mask(phantom8, tokenizer, tmp_path):
    shutil.copytree(phantom8 / "M3D_RefSeg", tmp_path / "M3D_RefSeg")
    path = tmp_path / "M3D_RefSeg" / "M3D_RefSeg_train.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    rows[2]["Mask_ID"] = "9"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    dataset = RefSegDataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
    with pytest.raises(DatasetError) as error:
        dataset[2]
    message = str(error.value)
    for expected in (f"{path}: row 4", tmp_path / "M3D_RefSeg" / rows[2]["Mask"], "Mask_ID 9"):
        assert str(expected) in message
    with pytest.raises(DatasetError, match="no M3D-RefSeg split 'validation'"):
        RefSegDataset(tmp_path, "validation", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
