"""Box metrics: true IoU and M3D's enclosing-box ratio on cases worked out by hand."""

import pytest

from m3d_lite.eval.boxes import accuracy_at, box_iou, m3d_box_iou

UNIT = (0.0, 0.0, 0.0, 0.5, 0.5, 0.5)


def test_identical_disjoint_and_nested_boxes():
    assert box_iou(UNIT, UNIT) == 1.0 and m3d_box_iou(UNIT, UNIT) == 1.0
    apart = (0.6, 0.6, 0.6, 0.9, 0.9, 0.9)
    assert box_iou(UNIT, apart) == 0.0 and m3d_box_iou(UNIT, apart) == 0.0
    inner = (0.0, 0.0, 0.0, 0.25, 0.5, 0.5)  # half of UNIT, inside it: both scores are 1/2
    assert box_iou(UNIT, inner) == pytest.approx(0.5) and m3d_box_iou(UNIT, inner) == pytest.approx(0.5)


def test_shifted_boxes_by_hand():
    shifted = (0.25, 0.0, 0.0, 0.75, 0.5, 0.5)  # UNIT moved by half its depth
    inter, each = 0.25 * 0.5 * 0.5, 0.5**3
    assert box_iou(UNIT, shifted) == pytest.approx(inter / (2 * each - inter))  # 1/3
    assert m3d_box_iou(UNIT, shifted) == pytest.approx(inter / (0.75 * 0.5 * 0.5))  # enclosing: 1/3 too
    diagonal = (0.25, 0.25, 0.25, 0.75, 0.75, 0.75)
    inter = 0.25**3
    assert box_iou(UNIT, diagonal) == pytest.approx(inter / (2 * each - inter))  # 1/15
    assert m3d_box_iou(UNIT, diagonal) == pytest.approx(inter / 0.75**3)  # 1/27: M3D under-reports


def test_accuracy_and_bad_boxes():
    assert accuracy_at([0.9, 0.5, 0.49, 0.0]) == 0.5
    with pytest.raises(ValueError, match=r"box b must be 6 finite numbers .* got \[0.1, 0.2\]"):
        box_iou(UNIT, (0.1, 0.2))
    with pytest.raises(ValueError, match=r"box a \[0.5, 0.0, 0.0, 0.2, 0.5, 0.5\] has a start after its end"):
        m3d_box_iou((0.5, 0.0, 0.0, 0.2, 0.5, 0.5), UNIT)
