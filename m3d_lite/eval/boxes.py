"""Box metrics for REC: true 3D IoU, M3D's enclosing-box ratio, and accuracy at an IoU threshold.

Boxes are M3D's normalised ``[d0, h0, w0, d1, h1, w1]`` (:func:`~m3d_lite.data.formats.mask_to_box`)
treated as continuous boxes. M3D's evaluation (``eval_pos.py``) calls its score "IoU" but divides the
intersection by the volume of the box that ENCLOSES both boxes, not by their union: it is never larger
than the true IoU, and equal only when one box contains the other. Both are here, labelled. Written by
hand: a few lines of arithmetic that no maintained library offers for 3D boxes in this format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = Sequence[float]


def _check(box: Box, name: str) -> None:
    if len(box) != 6 or any(not math.isfinite(v) for v in box):
        raise ValueError(f"{name} must be 6 finite numbers [d0, h0, w0, d1, h1, w1], got {list(box)}")
    if any(box[i] > box[i + 3] for i in range(3)):
        raise ValueError(f"{name} {list(box)} has a start after its end")


def box_volume(box: Box) -> float:
    """Volume of ``box`` in normalised units."""
    return math.prod(box[i + 3] - box[i] for i in range(3))


def intersection_volume(a: Box, b: Box) -> float:
    """Volume of the overlap of ``a`` and ``b`` (0 when they are apart)."""
    return math.prod(max(0.0, min(a[i + 3], b[i + 3]) - max(a[i], b[i])) for i in range(3))


def box_iou(a: Box, b: Box) -> float:
    """True 3D IoU: intersection / union; two identical boxes of zero volume count as 1."""
    _check(a, "box a")
    _check(b, "box b")
    inter = intersection_volume(a, b)
    union = box_volume(a) + box_volume(b) - inter
    if union == 0:
        return 1.0 if list(a) == list(b) else 0.0
    return inter / union


def m3d_box_iou(a: Box, b: Box) -> float:
    """M3D's REC "IoU": intersection / volume of the smallest box enclosing both (<= :func:`box_iou`)."""
    _check(a, "box a")
    _check(b, "box b")
    enclosing = [min(a[i], b[i]) for i in range(3)] + [max(a[i + 3], b[i + 3]) for i in range(3)]
    volume = box_volume(enclosing)
    if volume == 0:
        return 1.0 if list(a) == list(b) else 0.0
    return intersection_volume(a, b) / volume


def accuracy_at(ious: Sequence[float], threshold: float = 0.5) -> float:
    """Share of ``ious`` at or above ``threshold`` (a missing box counts as IoU 0, a miss)."""
    if not ious:
        raise ValueError("accuracy_at needs at least one IoU")
    return sum(iou >= threshold for iou in ious) / len(ious)
