"""Instruction datasets (captions, closed and open VQA), their collator and task mixing, on a phantom."""

from __future__ import annotations

import csv
import re
from collections import Counter

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from m3d_lite.data.datasets import (
    CaptionDataset,
    InstructCollator,
    VQADataset,
    mix_datasets,
    read_report,
)
from m3d_lite.data.formats import VQA_COLUMNS, DatasetError, read_vqa_csv
from m3d_lite.data.text import CAPTION_PROMPTS
from m3d_lite.models.tokenizer import IMAGE_TOKEN

NUM_IMAGE_TOKENS = 64  # the ci projector's output: 8 x 8 x 8 patches pooled by 2
MAX_LENGTH = 512  # room for every phantom report: trimming is tested on its own


@pytest.fixture(scope="module")
def root(phantom8):
    return phantom8


def caption_data(root, tokenizer, max_length=MAX_LENGTH, seed=0) -> CaptionDataset:
    return CaptionDataset(root, "train", tokenizer, NUM_IMAGE_TOKENS, max_length, seed=seed)


def vqa_data(root, tokenizer, closed: bool, max_length=MAX_LENGTH) -> VQADataset:
    return VQADataset(root, "train", tokenizer, NUM_IMAGE_TOKENS, max_length, closed=closed)


def check_encoding(item: dict, tokenizer, max_length: int, truncated: bool = False) -> int:
    """Check the masking of one item: the prompt (with all its image tokens) masked, then the answer and
    EOS (none when ``truncated``) supervised to the end. Return the number of supervised tokens."""
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape and len(ids) <= max_length
    supervised = (labels != -100).nonzero().flatten()
    start = int(supervised[0])
    assert torch.equal(supervised, torch.arange(start, len(ids)))
    assert torch.equal(labels[start:], ids[start:])
    assert (ids[:start] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == NUM_IMAGE_TOKENS
    assert (ids[-1] == tokenizer.eos_token_id) != truncated
    return len(ids) - start


def answer_text(item: dict, tokenizer) -> str:
    supervised = item["input_ids"][item["labels"] != -100]
    return tokenizer.decode(supervised, skip_special_tokens=True).strip()


def test_caption_items(root, tokenizer):
    dataset = caption_data(root, tokenizer)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["images"].shape == (1, 32, 64, 64) and item["images"].dtype == torch.float32
        assert item["question"] in CAPTION_PROMPTS
        assert item["answer"] == read_report(dataset.folder / dataset.items[i].text)  # fits: not trimmed
        check_encoding(item, tokenizer, MAX_LENGTH)
        assert answer_text(item, tokenizer) == item["answer"]
    assert len({dataset[i]["question"] for i in range(len(dataset))}) > 1  # several phrasings


def test_closed_and_open_vqa_follow_m3d(root, tokenizer):
    rows = read_vqa_csv(root / "M3D_VQA" / "M3D_VQA_train.csv")
    closed, open_ = vqa_data(root, tokenizer, closed=True), vqa_data(root, tokenizer, closed=False)
    assert len(closed) == len(open_) == len(rows)  # every row twice: once closed, once open
    for i in (0, 7, len(rows) - 1):
        row, item = rows[i], closed[i]
        choices = " ".join(f"{letter}. {row[f'Choice {letter}']}" for letter in "ABCD")
        assert item["question"] == f"{row['Question']} Choices: {choices}"
        assert item["answer"] == f"{row['Answer Choice']}. {row['Answer']}"
        assert re.fullmatch(r"[ABCD]\. .+", item["answer"])
        check_encoding(item, tokenizer, MAX_LENGTH)
        assert answer_text(item, tokenizer) == item["answer"]
        assert (open_[i]["question"], open_[i]["answer"]) == (row["Question"], row["Answer"])
        assert answer_text(open_[i], tokenizer) == row["Answer"]
        assert torch.equal(open_[i]["images"], item["images"])


def test_long_reports_lose_whole_sentences_then_are_truncated(root, tokenizer):
    report_tokens = max(
        len(tokenizer(read_report(p))["input_ids"]) for p in root.glob("M3D_Cap/*/*/text.txt")
    )
    max_length = NUM_IMAGE_TOKENS + 30 + report_tokens // 2  # room for about half of the longest report
    dataset = caption_data(root, tokenizer, max_length=max_length)
    trimmed = 0
    for i in range(len(dataset)):
        item = dataset[i]
        check_encoding(item, tokenizer, max_length)
        full = read_report(dataset.folder / dataset.items[i].text)
        sentences = re.split(r"(?<=\.)\s+", full)
        kept = re.split(r"(?<=\.)\s+", item["answer"])
        assert kept[0] == sentences[0] and kept == [s for s in sentences if s in kept]  # report order
        trimmed += item["answer"] != full
    assert trimmed > 0
    prompt_length = int((dataset[0]["labels"] == -100).sum())
    tight = caption_data(root, tokenizer, max_length=prompt_length + 3)  # not even the first sentence
    item = tight[0]
    assert len(item["input_ids"]) == prompt_length + 3
    assert check_encoding(item, tokenizer, prompt_length + 3, truncated=True) == 3  # answer cut, image whole


def test_prompt_longer_than_max_length_is_an_error(root, tokenizer):
    with pytest.raises(ValueError, match=str(NUM_IMAGE_TOKENS - 10)):
        vqa_data(root, tokenizer, closed=True, max_length=NUM_IMAGE_TOKENS - 10)[0]


def test_items_are_deterministic(root, tokenizer):
    first, second = caption_data(root, tokenizer, seed=3), caption_data(root, tokenizer, seed=3)
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"], b["images"])
    other = caption_data(root, tokenizer, seed=4)
    assert [first[i]["question"] for i in range(6)] != [other[i]["question"] for i in range(6)]


def test_collator_pads_right_with_masked_labels(root, tokenizer):
    items = [caption_data(root, tokenizer)[0], vqa_data(root, tokenizer, closed=False)[0]]
    lengths = [len(item["input_ids"]) for item in items]
    assert lengths[0] > lengths[1]
    batch = InstructCollator(tokenizer)(items)
    assert set(batch) == {"images", "input_ids", "labels", "attention_mask"}
    assert batch["images"].shape == (2, 1, 32, 64, 64)
    assert (
        batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, lengths[0])
    )
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    n = lengths[1]
    assert torch.equal(batch["input_ids"][1, :n], items[1]["input_ids"])
    assert torch.equal(batch["labels"][1, :n], items[1]["labels"])
    assert (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all() and (
        batch["labels"][1, n:] == -100
    ).all()


class Numbers(Dataset):
    def __init__(self, start: int, size: int):
        self.start, self.size = start, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.start + index


def test_mix_datasets_by_size_or_by_weight():
    parts = [Numbers(0, 10), Numbers(100, 30), Numbers(1000, 60)]
    concat = mix_datasets(parts)
    assert isinstance(concat, ConcatDataset) and len(concat) == 100
    mixed = mix_datasets(parts, weights=[2, 1, 1], seed=0)
    assert isinstance(mixed, Subset) and len(mixed) == 100
    values = [mixed[i] for i in range(100)]
    per_part = Counter(v // 100 if v < 1000 else 10 for v in values)
    assert per_part == {0: 50, 1: 25, 10: 25}
    small = Counter(v for v in values if v < 100)
    assert set(small) == set(range(10)) and set(small.values()) == {5}  # up-sampled in full passes
    assert len({v for v in values if 100 <= v < 1000}) == 25  # down-sampled without repeats
    assert mix_datasets(parts, [2, 1, 1], seed=0).indices == mixed.indices
    assert mix_datasets(parts, [2, 1, 1], seed=1).indices != mixed.indices
    assert all(mix_datasets(parts, [1, 0, 1])[i] not in range(100, 130) for i in range(100))
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="weights"):
            mix_datasets(parts, bad)


def test_errors_name_the_file_and_row(root, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"M3D_VQA_train\.csv: file not found.*dataset root"):
        VQADataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
    with pytest.raises(DatasetError, match=r"no M3D-VQA split 'val'.*'validation'"):
        VQADataset(root, "val", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
    with pytest.raises(FileNotFoundError, match="M3D_Cap.json"):
        CaptionDataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)

    folder = tmp_path / "M3D_VQA"
    folder.mkdir()
    rows = read_vqa_csv(root / "M3D_VQA" / "M3D_VQA_train.csv")[:3]
    rows[2]["Image Path"] = "ct_case/missing/volume.npy"
    with open(folder / "M3D_VQA_train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, VQA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "M3D_Cap").symlink_to(root / "M3D_Cap")
    dataset = VQADataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
    dataset[1]
    with pytest.raises(FileNotFoundError, match=r"M3D_VQA_train\.csv: row 4: .*missing/volume\.npy"):
        dataset[2]

    with open(folder / "M3D_VQA_train.csv", "w", newline="") as f:
        f.write("Image Path,Question,Answer\nimage.npy,Which?,Yes\n")
    with pytest.raises(DatasetError, match=r"missing \['Text', 'Question Type'"):
        VQADataset(tmp_path, "train", tokenizer, NUM_IMAGE_TOKENS, MAX_LENGTH)
