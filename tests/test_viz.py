"""Figures and the slice viewer draw what they are given: slices, mask contours, boxes, legends."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from m3d_lite import viz

D, H, W = 24, 32, 40


@pytest.fixture
def volume():
    z, y, x = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    return (z * 1000 + y * 10 + x * 0.01).astype(np.float32)  # each slice is different


@pytest.fixture
def cube():
    mask = np.zeros((D, H, W), dtype=bool)
    mask[6:12, 8:20, 10:30] = True
    return mask


def contour_count(ax):
    return sum(isinstance(c, ContourSet) for c in ax.collections)


def rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_montage_axes_contours_boxes(volume, cube):
    box = [6 / D, 8 / H, 10 / W, 11 / D, 19 / H, 29 / W]  # as mask_to_box writes it
    fig = viz.montage(
        volume[None], masks={"cube": cube, "empty": np.zeros_like(cube)}, boxes=[box], num_slices=8, title="t"
    )
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 8
    indices = ((np.arange(8) + 0.5) * D / 8).astype(int)
    inside = [6 <= i <= 11 for i in indices]
    assert [contour_count(ax) for ax in fig.axes] == [int(x) for x in inside]
    assert [len(rectangles(ax)) for ax in fig.axes] == [int(x) for x in inside]
    rect = rectangles(fig.axes[inside.index(True)])[0]
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (9.5, 7.5, 20, 12)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cube", "empty", "box 0"]
    assert fig._suptitle.get_text() == "t"
    assert np.array_equal(fig.axes[0].images[0].get_array(), volume[indices[0]])


def test_montage_label_map_other_axis(volume):
    labels = np.zeros((D, H, W), dtype=np.uint8)
    labels[:, 2:6, 2:6] = 1
    labels[:, 20:25, 30:35] = 3
    fig = viz.montage(volume, masks=labels, num_slices=100, axis=2)
    assert len(fig.axes) == W  # capped at the number of slices
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["label 1", "label 3"]
    assert fig.axes[0].images[0].get_array().shape == (D, H)  # sagittal: rows z, columns y
    with pytest.raises(ValueError, match=r"mask 'bad' has shape \(2, 2, 2\)"):
        viz.montage(volume, masks={"bad": np.zeros((2, 2, 2))})
    with pytest.raises(ValueError, match="expected 6 numbers"):
        viz.montage(volume, boxes=[[0.1, 0.2]])


def test_orthogonal_views_centre_on_mask(volume, cube):
    fig = viz.orthogonal_views(volume, masks={"cube": cube})
    assert [ax.get_title() for ax in fig.axes] == ["axial 8", "coronal 14", "sagittal 20"]
    assert all(contour_count(ax) == 1 for ax in fig.axes)


def test_overlay_draws_slice_and_mask(volume, cube):
    fig = Figure()
    ax = viz.overlay(fig.add_subplot(), volume[8], cube[8], color="red")
    assert np.array_equal(ax.images[0].get_array(), volume[8]) and contour_count(ax) == 1


def test_slice_viewer_redraws(volume, cube):
    viewer = viz.slice_viewer(volume, masks={"cube": cube}, boxes=[[0.25, 0.25, 0.25, 0.5, 0.5, 0.5]])
    assert np.array_equal(viewer.image.get_array(), volume[D // 2])
    first_png = viewer.output.outputs[0]["data"]["image/png"]
    viewer.slider.value = 3
    assert np.array_equal(viewer.image.get_array(), volume[3])
    assert viewer.output.outputs[0]["data"]["image/png"] != first_png
    viewer.plane.value = "coronal"
    assert viewer.slider.max == H - 1 and viewer.slider.value == H // 2
    assert np.array_equal(viewer.image.get_array(), volume[:, H // 2, :])


def test_save_figure_is_png(volume, tmp_path):
    path = viz.save_figure(viz.montage(volume, num_slices=2), tmp_path / "figs" / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["m.png"]


def test_training_curves_plots_each_key_from_a_metrics_file(tmp_path):
    import json

    from m3d_lite.viz import training_curves

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 6)] + [{"step": 5, "eval_r1": 40.0}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    fig = training_curves(path, keys=("loss", "eval_r1"))
    loss_line, eval_line = (ax.get_lines()[0] for ax in fig.axes)
    assert list(loss_line.get_xdata()) == [1, 2, 3, 4, 5] and loss_line.get_ydata()[-1] == 0.4
    assert list(eval_line.get_ydata()) == [40.0]
    with pytest.raises(ValueError, match="no record has 'acc'"):
        training_curves(records, keys=("acc",))


def test_volume_with_text_shows_slices_boxes_and_every_text(volume, cube):
    box = [6 / D, 8 / H, 10 / W, 11 / D, 19 / H, 29 / W]
    texts = {"question": "Where is the cube?", "generated": "word " * 60, "reference": "In the middle."}
    fig = viz.volume_with_text(volume, texts, masks={"cube": cube}, boxes={"box": box}, num_slices=4)
    slices = [ax for ax in fig.axes if ax.images]
    assert len(slices) == 4 and sum(len(rectangles(ax)) for ax in slices) >= 1
    [text_ax] = [ax for ax in fig.axes if not ax.images]
    shown = text_ax.texts[0].get_text()
    assert shown.startswith("question: Where is the cube?") and "reference: In the middle." in shown
    assert max(len(line) for line in shown.splitlines()) <= 100  # wrapped
