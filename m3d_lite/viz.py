"""Pictures of 3D volumes with their masks and boxes: montages, orthogonal views and a slice viewer.

Volumes are (D, H, W) = (z, y, x) arrays in LPS order (or 1 x D x H x W, or a loaded
:class:`~m3d_lite.data.preprocess.Volume`, whose spacing then sets the aspect ratio). Axial slices are
drawn with anterior up and the patient's right on the left (radiological view); coronal and sagittal
slices with superior up. Masks are drawn as a transparent fill plus a contour, boxes (M3D's normalised
``[d0, h0, w0, d1, h1, w1]``) as rectangles on the slices they cover.

Figures are made with pyplot, so that a notebook's inline backend knows how to show them, and closed at
once: a figure returned as a cell's last value is shown exactly once, and loops do not pile figures up.
"""

from __future__ import annotations

import base64
import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from m3d_lite.data.preprocess import Window, resolve_window
from m3d_lite.io import atomic_path

PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}
_COLORS = plt.get_cmap("tab10").colors

Masks = np.ndarray | Mapping[str, np.ndarray] | None
Boxes = Sequence[Sequence[float]] | Mapping[str, Sequence[float]] | None


def _volume_array(volume: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A (D, H, W) float array and its spacing (1 mm unless ``volume`` is a Volume)."""
    spacing = tuple(getattr(volume, "spacing", (1.0, 1.0, 1.0)))
    array = getattr(volume, "array", volume)
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a volume D x H x W or 1 x D x H x W, got shape {array.shape}")
    return array.astype(np.float32, copy=False), spacing


def _named_masks(masks: Masks, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """(name, bool D x H x W mask) pairs from a dict of masks, a binary mask or an integer label map."""
    if masks is None:
        return []
    if isinstance(masks, Mapping):
        named = [(str(name), _volume_array(mask)[0] > 0.5) for name, mask in masks.items()]
    else:
        labels = _volume_array(masks)[0]
        values = [v for v in np.unique(labels) if v != 0]
        binary = set(values) <= {1}
        named = [("mask", labels > 0.5)] if binary else [(f"label {v:g}", labels == v) for v in values]
    for name, mask in named:
        if mask.shape != tuple(shape):
            raise ValueError(f"mask {name!r} has shape {mask.shape}, the volume has {tuple(shape)}")
    return named


def _named_boxes(boxes: Boxes) -> list[tuple[str, tuple[float, ...]]]:
    if boxes is None:
        return []
    items = boxes.items() if isinstance(boxes, Mapping) else ((f"box {i}", b) for i, b in enumerate(boxes))
    named = [(str(name), tuple(float(v) for v in box)) for name, box in items]
    for name, box in named:
        if len(box) != 6:
            raise ValueError(f"{name}: expected 6 numbers [d0, h0, w0, d1, h1, w1], got {box}")
    return named


def _slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


def _aspect(spacing: tuple[float, float, float], axis: int) -> float:
    """Height/width of one pixel of a slice across ``axis`` (rows and columns are the other two axes)."""
    rows, cols = [a for a in range(3) if a != axis]
    return spacing[rows] / spacing[cols]


def _panel_ratio(shape: Sequence[int], spacing: tuple[float, float, float], axis: int) -> float:
    """Height/width in mm of a whole slice across ``axis``."""
    rows, cols = [a for a in range(3) if a != axis]
    return shape[rows] * spacing[rows] / (shape[cols] * spacing[cols])


def _origin(axis: int) -> str:
    """Axial slices: row 0 (anterior) on top; coronal/sagittal: slice 0 (inferior) at the bottom."""
    return "upper" if axis == 0 else "lower"


def _color(i: int) -> tuple[float, ...]:
    return _COLORS[i % len(_COLORS)]


def _display_range(array: np.ndarray, window: Window) -> tuple[float, float]:
    return resolve_window(window) or (float(array.min()), float(array.max()))


def draw_mask(ax: Axes, mask2d: np.ndarray, color: Any, origin: str = "upper", alpha: float = 0.3) -> None:
    """Draw a 2D mask on ``ax`` as a transparent fill and a contour of ``color``."""
    mask2d = np.asarray(mask2d) > 0.5
    if not mask2d.any():
        return
    fill = np.zeros((*mask2d.shape, 4), dtype=np.float32)
    fill[mask2d] = to_rgba(color, alpha)
    ax.imshow(fill, origin=origin, interpolation="nearest")
    ax.contour(mask2d.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.0)


def draw_box(ax: Axes, box: Sequence[float], axis: int, index: int, shape: Sequence[int], color: Any) -> bool:
    """Draw normalised M3D ``box`` on slice ``index`` across ``axis`` if it covers it; return if it did."""
    low = [round(box[a] * shape[a]) for a in range(3)]
    high = [round(box[a + 3] * shape[a]) for a in range(3)]
    if not low[axis] <= index <= high[axis]:
        return False
    rows, cols = [a for a in range(3) if a != axis]
    corner = (low[cols] - 0.5, low[rows] - 0.5)
    ax.add_patch(
        Rectangle(
            corner,
            high[cols] - low[cols] + 1,
            high[rows] - low[rows] + 1,
            fill=False,
            edgecolor=color,
            linewidth=1.5,
        )
    )
    return True


def overlay(
    ax: Axes,
    slice2d: np.ndarray,
    mask2d: np.ndarray,
    color: Any = "red",
    window: Window = None,
    origin: str = "upper",
) -> Axes:
    """Show a grey ``slice2d`` on ``ax`` with ``mask2d`` on top (fill + contour): a quick one-mask picture."""
    vmin, vmax = _display_range(np.asarray(slice2d), window)
    ax.imshow(slice2d, cmap="gray", vmin=vmin, vmax=vmax, origin=origin, interpolation="nearest")
    draw_mask(ax, mask2d, color, origin)
    ax.set_axis_off()
    return ax


def _draw_slice(
    ax: Axes,
    array: np.ndarray,
    axis: int,
    index: int,
    display: tuple[float, float],
    spacing: tuple[float, float, float],
    masks: list,
    boxes: list,
) -> Any:
    """Draw slice ``index`` across ``axis`` with every mask and box that touches it; return the AxesImage."""
    origin = _origin(axis)
    image = ax.imshow(
        _slice(array, axis, index),
        cmap="gray",
        vmin=display[0],
        vmax=display[1],
        origin=origin,
        interpolation="nearest",
        aspect=_aspect(spacing, axis),
    )
    for i, (_, mask) in enumerate(masks):
        draw_mask(ax, _slice(mask, axis, index), _color(i), origin)
    for i, (_, box) in enumerate(boxes):
        draw_box(ax, box, axis, index, array.shape, _color(len(masks) + i))
    ax.set_axis_off()
    return image


def _legend(fig: Figure, masks: list, boxes: list) -> None:
    handles = [Patch(color=_color(i), alpha=0.6, label=name) for i, (name, _) in enumerate(masks)]
    handles += [
        Patch(fill=False, edgecolor=_color(len(masks) + i), label=name) for i, (name, _) in enumerate(boxes)
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize="small")


def montage(
    volume: Any,
    masks: Masks = None,
    boxes: Boxes = None,
    num_slices: int = 8,
    axis: int = 0,
    title: str | None = None,
    window: Window = None,
    ax_size: float = 2.0,
) -> Figure:
    """A grid of ``num_slices`` evenly spaced slices across ``axis`` (0 axial, 1 coronal, 2 sagittal).

    ``masks``: a binary mask, an integer label map or a dict name -> mask, each D x H x W. ``boxes``: a list
    (or dict name -> box) of normalised ``[d0, h0, w0, d1, h1, w1]``. ``window``: display range, a
    :data:`~m3d_lite.data.preprocess.WINDOWS` name or (lower, upper); default min..max of the volume.
    """
    array, spacing = _volume_array(volume)
    named_masks, named_boxes = _named_masks(masks, array.shape), _named_boxes(boxes)
    count = min(num_slices, array.shape[axis])
    indices = ((np.arange(count) + 0.5) * array.shape[axis] / count).astype(int)
    columns = min(count, 8)
    rows = math.ceil(count / columns)
    height = ax_size * _panel_ratio(array.shape, spacing, axis)
    fig = plt.figure(figsize=(columns * ax_size, rows * height + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    display = _display_range(array, window)
    for ax, index in zip(axes, indices, strict=False):
        _draw_slice(ax, array, axis, int(index), display, spacing, named_masks, named_boxes)
        ax.set_title(f"{list(PLANES)[axis]} {index}", fontsize="small")
    for ax in axes[count:]:
        fig.delaxes(ax)
    _legend(fig, named_masks, named_boxes)
    if title:
        fig.suptitle(title)
    plt.close(fig)
    return fig


def volume_with_text(
    volume: Any,
    texts: Mapping[str, str],
    masks: Masks = None,
    boxes: Boxes = None,
    num_slices: int = 4,
    title: str | None = None,
    width: int = 100,
    ax_size: float = 2.0,
) -> Figure:
    """A row of ``num_slices`` axial slices (with ``masks`` and ``boxes``, as :func:`montage`) above labelled
    texts (``{"question": ..., "generated": ..., "reference": ...}``), each wrapped at ``width`` characters:
    what a model said about a volume, next to the volume."""
    array, spacing = _volume_array(volume)
    named_masks, named_boxes = _named_masks(masks, array.shape), _named_boxes(boxes)
    lines = []
    for label, text in texts.items():
        lines += textwrap.wrap(f"{label}: {text}", width, subsequent_indent="    ") or [f"{label}:"]
    count = min(num_slices, array.shape[0])
    slice_height = ax_size * _panel_ratio(array.shape, spacing, 0)
    text_height = 0.17 * len(lines) + 0.2
    fig = plt.figure(figsize=(max(count * ax_size, width * 0.075), slice_height + text_height + 0.6))
    grid = fig.add_gridspec(2, count, height_ratios=[slice_height, text_height], hspace=0.05)
    display = _display_range(array, None)
    for column, index in enumerate(((np.arange(count) + 0.5) * array.shape[0] / count).astype(int)):
        ax = fig.add_subplot(grid[0, column])
        _draw_slice(ax, array, 0, int(index), display, spacing, named_masks, named_boxes)
        ax.set_title(f"axial {index}", fontsize="small")
    text_ax = fig.add_subplot(grid[1, :])
    text_ax.set_axis_off()
    text_ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8)
    _legend(fig, named_masks, named_boxes)
    if title:
        fig.suptitle(title)
    plt.close(fig)
    return fig


def orthogonal_views(
    volume: Any,
    masks: Masks = None,
    point: Sequence[int] | None = None,
    window: Window = None,
    ax_size: float = 3.0,
) -> Figure:
    """Axial, coronal and sagittal slices through ``point`` (d, h, w) with crosshairs.

    The default point is the centre of the masks' voxels when there are masks, else the volume centre.
    """
    array, spacing = _volume_array(volume)
    named_masks = _named_masks(masks, array.shape)
    if point is None:
        union = np.any([m for _, m in named_masks], axis=0) if named_masks else None
        voxels = np.argwhere(union) if union is not None and union.any() else None
        point = voxels.mean(axis=0) if voxels is not None else np.array(array.shape) / 2
    point = [int(min(max(round(float(p)), 0), n - 1)) for p, n in zip(point, array.shape, strict=True)]
    ratio = max(_panel_ratio(array.shape, spacing, axis) for axis in range(3))
    fig = plt.figure(figsize=(3 * ax_size, ax_size * ratio + 0.6), layout="constrained")
    display = _display_range(array, window)
    for axis, ax in enumerate(fig.subplots(1, 3)):
        _draw_slice(ax, array, axis, point[axis], display, spacing, named_masks, [])
        rows, cols = [a for a in range(3) if a != axis]
        ax.axhline(point[rows], color="yellow", linewidth=0.6, alpha=0.7)
        ax.axvline(point[cols], color="yellow", linewidth=0.6, alpha=0.7)
        ax.set_title(f"{list(PLANES)[axis]} {point[axis]}", fontsize="small")
    _legend(fig, named_masks, [])
    plt.close(fig)
    return fig


def _png_bundle(fig: Figure, text: str) -> dict[str, Any]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"), "text/plain": text}
    return {"output_type": "display_data", "data": data, "metadata": {}}


class SliceViewer(widgets.VBox):
    """A plane dropdown and a slice slider above a picture of that slice with its masks and boxes.

    The picture is a PNG placed in an ``ipywidgets.Output``, so it works with JupyterLab's default
    inline backend (no ipympl). ``image`` is the matplotlib AxesImage of the current slice.
    """

    def __init__(
        self, volume: Any, masks: Masks = None, boxes: Boxes = None, window: Window = None, size: float = 4.0
    ) -> None:
        self.array, self.spacing = _volume_array(volume)
        self.masks = _named_masks(masks, self.array.shape)
        self.boxes = _named_boxes(boxes)
        self.display_range = _display_range(self.array, window)
        self.plane = widgets.Dropdown(options=list(PLANES), value="axial", description="plane")
        self.slider = widgets.IntSlider(
            value=self.array.shape[0] // 2,
            min=0,
            max=self.array.shape[0] - 1,
            description="slice",
            continuous_update=False,
        )
        self.output = widgets.Output()
        self.figure = plt.figure(figsize=(size, size), layout="constrained")
        plt.close(self.figure)
        _legend(self.figure, self.masks, self.boxes)
        self.ax = self.figure.add_subplot()
        self.image = None
        self._switching_plane = False
        self.plane.observe(self._plane_changed, names="value")
        self.slider.observe(self._slider_moved, names="value")
        super().__init__([widgets.HBox([self.plane, self.slider]), self.output])
        self.redraw()

    def _slider_moved(self, _: Any) -> None:
        if not self._switching_plane:
            self.redraw()

    def _plane_changed(self, _: Any) -> None:
        size = self.array.shape[PLANES[self.plane.value]]
        self._switching_plane = True
        try:
            self.slider.max = size - 1
            self.slider.value = size // 2
        finally:
            self._switching_plane = False
        self.redraw()

    def redraw(self) -> None:
        """Draw the current slice and show it in the output area."""
        axis, index = PLANES[self.plane.value], self.slider.value
        self.ax.clear()
        self.image = _draw_slice(
            self.ax, self.array, axis, index, self.display_range, self.spacing, self.masks, self.boxes
        )
        self.ax.set_title(f"{self.plane.value} {index} / {self.array.shape[axis] - 1}", fontsize="small")
        self.output.outputs = (_png_bundle(self.figure, f"{self.plane.value} slice {index}"),)


def slice_viewer(volume: Any, masks: Masks = None, boxes: Boxes = None, window: Window = None) -> SliceViewer:
    """An interactive viewer (ipywidgets) of ``volume`` with ``masks`` and ``boxes``; see :func:`montage`."""
    return SliceViewer(volume, masks, boxes, window)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def retrieval_matrix(similarity: Any, title: str | None = None) -> Figure:
    """The image-text similarity matrix (rows images, columns texts) with the true pairs (diagonal) boxed.

    A red dot marks each image's best text (row argmax), a hollow cyan circle each text's best image
    (column argmax): a dot inside a box is a correct retrieval. Readable from 10 to about 100 pairs.
    """
    if hasattr(similarity, "detach"):
        similarity = similarity.detach().float().cpu().numpy()
    matrix = np.asarray(similarity, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square N x N similarity, got shape {matrix.shape}")
    n = matrix.shape[0]
    fig = plt.figure(figsize=(6.5, 6.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    cell = 72 * 4.5 / n  # points per matrix cell, roughly
    diagonal = np.arange(n)
    ax.scatter(
        diagonal,
        diagonal,
        s=cell**2,
        marker="s",
        facecolors="none",
        edgecolors="white",
        linewidths=max(0.5, min(1.5, cell / 8)),
        label="true pair",
    )
    ax.scatter(
        matrix.argmax(axis=1),
        diagonal,
        s=(cell * 0.4) ** 2 + 3,
        color="red",
        label="best text of each image",
    )
    ax.scatter(
        diagonal,
        matrix.argmax(axis=0),
        s=(cell * 0.75) ** 2 + 12,
        facecolors="none",
        edgecolors="cyan",
        linewidths=max(0.8, min(1.2, cell / 10)),
        label="best image of each text",
    )
    if n <= 20:
        ax.set_xticks(diagonal)
        ax.set_yticks(diagonal)
    ax.set_xlabel("text")
    ax.set_ylabel("image")
    legend = fig.legend(loc="outside lower center", ncol=3, fontsize="small", markerscale=min(1.0, 12 / cell))
    legend.get_frame().set_facecolor("0.75")  # the white box of "true pair" must show
    ax.set_title(title or f"image-text similarity, {n} pairs")
    plt.close(fig)
    return fig


def training_curves(
    metrics: str | os.PathLike | Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("loss", "lr"),
    title: str | None = None,
) -> Figure:
    """Plot ``keys`` against the optimizer step from a training run's ``metrics.jsonl`` (or its records).

    One panel per key; records without a key are skipped, so evaluation and training lines can share a file.
    """
    if isinstance(metrics, (str, os.PathLike)):
        import json

        lines = Path(metrics).read_text(encoding="utf-8").splitlines()
        metrics = [json.loads(line) for line in lines if line.strip()]
    fig, axes = plt.subplots(
        1, len(keys), figsize=(4.2 * len(keys), 3.2), layout="constrained", squeeze=False
    )
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in metrics if key in r and r[key] is not None]
        if not points:
            raise ValueError(f"no record has {key!r}; keys found: {sorted({k for r in metrics for k in r})}")
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    plt.close(fig)
    return fig
