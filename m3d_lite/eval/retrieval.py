"""Image-text retrieval (M3D-Bench task 1): how often a CLIP model finds a scan's own report, and back.

The similarity matrix has images as rows and texts as columns; pair i is (image i, text i).
- ``image_to_text``: each image ranks all texts. M3D's ``eval_itr.py`` calls this "IR".
- ``text_to_image``: each text ranks all images. M3D calls this "TR".
Many papers use the opposite names, so compare directions, not labels. R@k is the percentage of queries
whose true partner is among the k best; it falls as the pool grows, so always state the pool size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from m3d_lite.data.datasets import CapDataset, ClipCollator

DIRECTIONS = ("image_to_text", "text_to_image")


def retrieval_ranks(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """1-based rank of the true partner of each image (among texts) and of each text (among images).

    Ties count against the true pair: its rank is the number of candidates scoring at least as high, so a
    constant matrix ranks every pair last instead of rewarding an arbitrary tie-break (torch.topk's).
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1] or similarity.numel() == 0:
        raise ValueError(f"expected a non-empty square N x N similarity, got shape {tuple(similarity.shape)}")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or infinite values (did the model's embeddings overflow?)")
    true = similarity.diagonal()
    image_to_text = (similarity >= true[:, None]).sum(dim=1)
    text_to_image = (similarity >= true[None, :]).sum(dim=0)
    return image_to_text, text_to_image


def recall_at_k(similarity: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """R@k in percent for both directions: ``{"image_to_text": {"R@1": ..}, "text_to_image": {..}}``.

    ``similarity``: N x N, rows images, columns texts, pair i on the diagonal; ties as in
    :func:`retrieval_ranks`. A k >= N gives 100.
    """
    ranks = retrieval_ranks(similarity)
    return {
        direction: {f"R@{k}": 100.0 * int((rank <= k).sum()) / len(rank) for k in ks}
        for direction, rank in zip(DIRECTIONS, ranks, strict=True)
    }


def sample_pool(num_pairs: int, pool_size: int | None, seed: int = 0) -> list[int]:
    """Sorted indices of ``pool_size`` of ``num_pairs`` pairs, drawn with ``seed``; all if None, 0 or more."""
    if not pool_size or pool_size >= num_pairs:
        return list(range(num_pairs))
    return sorted(np.random.default_rng(seed).choice(num_pairs, size=pool_size, replace=False).tolist())


@torch.no_grad()
def embed_pairs(
    model: nn.Module,
    dataset: CapDataset,
    batch_size: int = 8,
    *,
    indices: list[int] | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Image and text embeddings (N x E each, float32 on the CPU) of ``dataset``'s pairs (or ``indices``).

    Uses ``model.encode_image(images)`` and ``model.encode_text(input_ids, attention_mask)`` in eval mode,
    on the model's device; the model's train/eval mode is restored afterwards.
    """
    pairs = Subset(dataset, indices) if indices is not None else dataset
    loader = DataLoader(
        pairs, batch_size=batch_size, shuffle=False, collate_fn=ClipCollator(dataset.tokenizer)
    )
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    image_embeds, text_embeds = [], []
    try:
        for batch in tqdm(loader, desc="embed pairs", unit="batch", disable=not progress):
            images = batch["images"].to(parameter.device, dtype=parameter.dtype)
            image_embeds.append(model.encode_image(images).float().cpu())
            text = model.encode_text(
                batch["input_ids"].to(parameter.device), batch["attention_mask"].to(parameter.device)
            )
            text_embeds.append(text.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(image_embeds), torch.cat(text_embeds)


@dataclass
class RetrievalResult:
    """R@k of one pool, its similarity (rows images, columns texts), and what each row/column is."""

    metrics: dict[str, dict[str, float]]
    similarity: Tensor
    texts: list[str]
    image_paths: list[str]
    pool_size: int
    indices: list[int]  # positions of the pool's pairs in the split


def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Any,
    data_root: str | os.PathLike,
    split: str = "test",
    pool_size: int | None = 100,
    seed: int = 0,
    *,
    batch_size: int = 8,
    max_text_len: int | None = None,
    progress: bool = True,
) -> RetrievalResult:
    """Retrieval R@1/5/10 of ``model`` on a seeded pool of ``pool_size`` pairs of ``split`` (see module doc).

    ``pool_size`` None, 0 or at least the split's size uses the whole split; ``seed`` draws the pool and
    trims long reports. Similarity is the cosine of the embeddings. ``max_text_len`` defaults to
    ``model.config.max_text_len``.
    """
    max_text_len = max_text_len or getattr(getattr(model, "config", None), "max_text_len", None)
    if max_text_len is None:
        raise ValueError("pass max_text_len: the model has no config.max_text_len to take it from")
    dataset = CapDataset(data_root, split, tokenizer, max_text_len, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {dataset.folder} is empty: nothing to retrieve")
    indices = sample_pool(len(dataset), pool_size, seed)
    image_embeds, text_embeds = embed_pairs(model, dataset, batch_size, indices=indices, progress=progress)
    similarity = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    return RetrievalResult(
        metrics=recall_at_k(similarity),
        similarity=similarity,
        texts=[dataset.report(i) for i in indices],
        image_paths=[str(dataset.image_path(i)) for i in indices],
        pool_size=len(indices),
        indices=indices,
    )
