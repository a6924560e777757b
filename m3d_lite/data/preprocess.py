"""From a scan on disk to M3D's model input: a 1 x D x H x W float32 volume in [0, 1].

Loading goes through SimpleITK, so NIfTI, DICOM (single file, enhanced multi-frame or a series
folder), NRRD and MHA all arrive the same way: Hounsfield units for CT (SimpleITK applies the DICOM
rescale), re-oriented to LPS, as a (D, H, W) = (z, y, x) array. Preparing is M3D's chain: window
(or min-max), crop to the foreground (voxels above 0 after scaling), resize (trilinear for the
image, nearest neighbour for masks). The crop box is kept, so a mask predicted on the prepared
volume can be written back as a NIfTI on the grid of the original scan.

One deliberate difference from M3D: masks are resized with torch's "nearest-exact" (voxel centres),
not "nearest", which picks the voxel at the lower corner and so shifts a downsized mask by up to
half an output voxel against its trilinear image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Resize
from monai.transforms.utils import generate_spatial_bounding_box

from m3d_lite.io import atomic_path

# Common CT display windows in Hounsfield units (lower, upper).
WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (-160.0, 240.0),
    "bone": (-450.0, 1050.0),
    "lung": (-1350.0, 150.0),
}

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, end) voxel indices per axis, end exclusive
Window = tuple[float, float] | str | None
MASK_MODE = "nearest-exact"  # centre-aligned nearest neighbour, consistent with the trilinear image


@dataclass
class PreparedVolume:
    """A prepared image (1 x D x H x W, float32, [0, 1]) and its masks (1 x D x H x W, bool) by name.

    ``crop_box`` is the (start, end) foreground box in the voxels of the source array, whose shape
    is ``source_shape``: what :func:`restore_mask` needs to put a prepared mask back.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    crop_box: Box | None = None
    source_shape: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Grid:
    """Where the voxels of an image sit in patient space, in SimpleITK's (x, y, z) order and units (mm)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        """The grid of a SimpleITK image."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


@dataclass
class Volume:
    """A loaded scan: ``array`` D x H x W float32 (HU for CT) and where its voxels are.

    ``spacing`` is in array order (z, y, x) in mm; ``origin`` (mm) and ``direction`` (3 x 3 row-major
    cosines) are SimpleITK's, in patient (x, y, z) order. ``input_grid`` is the grid of the file as it
    was read, before re-orientation: :func:`save_mask_nifti` writes masks on it so that they overlay
    the original scan in any viewer.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source: str
    input_grid: Grid | None = None

    def to_image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (same shape as :attr:`array`) with this volume's geometry."""
        if array.shape != self.array.shape:
            raise ValueError(f"{self.source}: array of shape {array.shape} does not match {self.array.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def window_hu(hu: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Map Hounsfield units to [0, 1]: ``lower`` -> 0, ``upper`` -> 1, clipped outside."""
    if not upper > lower:
        raise ValueError(f"window upper {upper} must be greater than lower {lower}")
    return np.clip((np.asarray(hu, dtype=np.float32) - lower) / (upper - lower), 0.0, 1.0)


def resolve_window(window: Window) -> tuple[float, float] | None:
    """Turn a window name of :data:`WINDOWS`, a (lower, upper) pair or None into a pair or None."""
    if window is None:
        return None
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}: expected one of {sorted(WINDOWS)} or a pair")
        return WINDOWS[window]
    if len(window) != 2:
        raise ValueError(f"window must be (lower, upper), got {window!r}")
    return float(window[0]), float(window[1])


def window_from_args(values: Sequence[str] | None) -> Window:
    """``--window`` as given on a command line: two numbers LO HI, or a window name ("soft tissue",
    "soft_tissue", "bone", "lung"); None or empty -> None (min-max scaling)."""
    if not values:
        return None
    if len(values) == 2:
        try:
            return float(values[0]), float(values[1])
        except ValueError:
            pass
    name = " ".join(values).replace("_", " ")
    resolve_window(name)  # an unknown name is refused here, before any work
    return name


def percentile_window(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> tuple[float, float]:
    """The intensities at percentiles ``lower`` and ``upper`` of ``image``: a window for MRI or any scan
    without calibrated units (M3D-RefSeg uses 0.5 and 99.5, like MONAI's ScaleIntensityRangePercentiles)."""
    lo, hi = np.percentile(np.asarray(image, dtype=np.float32), (lower, upper))
    return float(lo), float(hi)


def _check_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume D x H x W (or 1 x D x H x W), got {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name}: volume of shape {array.shape} contains NaN or infinite values")
    return array


def foreground_box(scaled: np.ndarray, name: str = "volume") -> Box:
    """The bounding box of the voxels above 0 of a D x H x W array (what MONAI's CropForeground keeps)."""
    start, end = generate_spatial_bounding_box(scaled[None])
    if any(e <= s for s, e in zip(start, end, strict=True)):
        raise ValueError(
            f"{name}: no voxel is above 0 after scaling, so there is no foreground to crop to "
            "(a constant volume, or a window entirely above the data?)"
        )
    return tuple(int(s) for s in start), tuple(int(e) for e in end)


def crop_and_resize(array: np.ndarray, box: Box, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    """Crop a D x H x W ``array`` to ``box``, resize it to ``shape`` (``mode``: "trilinear" or MASK_MODE)."""
    (d0, h0, w0), (d1, h1, w1) = box
    cropped = torch.as_tensor(np.asarray(array[d0:d1, h0:h1, w0:w1], dtype=np.float32))[None]
    return np.asarray(Resize(spatial_size=tuple(shape), mode=mode)(cropped))[0]


def prepare_arrays(
    image: np.ndarray,
    shape: tuple[int, int, int],
    window: Window = None,
    masks: Mapping[str, np.ndarray] | None = None,
    crop_foreground: bool = True,
    name: str = "volume",
) -> PreparedVolume:
    """Window (or min-max) ``image``, crop it to its foreground, and resize it and ``masks`` to ``shape``.

    ``image`` is D x H x W (HU for CT when ``window`` is a pair or a :data:`WINDOWS` name; any intensity
    when ``window`` is None, which scales min..max to 0..1). The foreground is every voxel above 0 after
    scaling, as in M3D's ``CropForeground``. ``name`` is used in error messages (pass the file path).
    """
    image = _check_volume(image, name)
    masks = dict(masks or {})
    for key, mask in masks.items():
        mask = _check_volume(mask, f"{name} mask {key!r}")
        if mask.shape != image.shape:
            raise ValueError(f"{name}: mask {key!r} has shape {mask.shape}, image has {image.shape}")
        masks[key] = mask
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name}: target shape must be 3 positive ints (D, H, W), got {shape}")

    lower, upper = resolve_window(window) or (float(image.min()), float(image.max()))
    if not upper > lower:
        raise ValueError(f"{name}: cannot scale a constant volume (every voxel is {lower})")
    scaled = window_hu(image, lower, upper)
    full = ((0, 0, 0), image.shape)
    box = foreground_box(scaled, name) if crop_foreground else full
    prepared = np.clip(crop_and_resize(scaled, box, shape, "trilinear"), 0.0, 1.0)
    return PreparedVolume(
        image=prepared[None].astype(np.float32),
        masks={k: crop_and_resize(m, box, shape, MASK_MODE)[None] > 0.5 for k, m in masks.items()},
        crop_box=box,
        source_shape=tuple(image.shape),
    )


def restore_mask(mask: np.ndarray, box: Box, source_shape: tuple[int, int, int]) -> np.ndarray:
    """Undo crop + resize: put a prepared (1 x) D x H x W mask or label map back on the source array's
    voxels (nearest neighbour; zeros outside ``box``)."""
    mask = _check_volume(mask, "mask")
    (d0, h0, w0), (d1, h1, w1) = box
    restored = np.zeros(source_shape, dtype=mask.dtype)
    resized = crop_and_resize(mask, ((0, 0, 0), mask.shape), (d1 - d0, h1 - h0, w1 - w0), MASK_MODE)
    restored[d0:d1, h0:h1, w0:w1] = resized.astype(mask.dtype)
    return restored


# ---------------------------------------------------------------------------------------------- loading

_READABLE = "NIfTI (.nii, .nii.gz), DICOM (.dcm, or a folder holding one series), NRRD, MHA or .npy"


def _sitk_reason(error: RuntimeError) -> str:
    """The useful last line of a SimpleITK exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR:").strip() if lines else repr(error)


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series directly in ``folder``: series id -> its files in slice order (GDCM's sort)."""
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns "No Series were found" on other folders
    try:
        return {
            sid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
            for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        }
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def _read_series(folder: Path, series_id: str | None) -> sitk.Image:
    series = dicom_series(folder)
    if not series:
        count = sum(1 for p in folder.iterdir() if p.is_file())
        raise ValueError(
            f"{folder}: no DICOM series found in this folder ({count} files in it); expected "
            f"the .dcm files of one series, or pass a file: {_READABLE}"
        )
    if series_id is None and len(series) > 1:
        listing = "; ".join(f"{sid} ({len(files)} files)" for sid, files in series.items())
        raise ValueError(f"{folder}: holds {len(series)} DICOM series, pass series_id= one of: {listing}")
    series_id = series_id or next(iter(series))
    if series_id not in series:
        raise ValueError(f"{folder}: no DICOM series {series_id!r}; found {list(series)}")
    files = series[series_id]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = _sitk_reason(error)
        raise ValueError(f"{folder}: SimpleITK cannot read DICOM series {series_id}: {reason}") from None


def _npy_volume(path: Path) -> Volume:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"{path}: expected a numeric D x H x W (or 1 x D x H x W) array, "
            f"got shape {array.shape} dtype {array.dtype}"
        )
    array = array.astype(np.float32)
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    grid = Grid(tuple(array.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), identity)
    return Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), identity, str(path), grid)


def _nifti_nan_count(path: Path) -> int:
    """NaN voxels of a floating-point NIfTI file: SimpleITK's NIfTI reader silently turns them into 0."""
    if not path.name.endswith((".nii", ".nii.gz")):
        return 0
    image = nib.load(path)
    if image.get_data_dtype().kind != "f":
        return 0
    return int(np.isnan(np.asarray(image.dataobj)).sum())


def _as_3d(image: sitk.Image, path: Path) -> sitk.Image:
    """Refuse what is not one grey-level 3D volume; drop a trailing 4th axis of length 1."""
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]
    elif image.GetDimension() > 3:
        raise ValueError(
            f"{path}: expected a 3D volume, got a {image.GetDimension()}D image of size "
            f"{'x'.join(map(str, size))} (a time series or multi-channel scan: pick one volume)"
        )
    size = image.GetSize()
    if sum(s > 1 for s in size) < 3:
        plane = "x".join(str(s) for s in size if s > 1) or "1"
        hint = " (one DICOM slice: pass the folder holding the whole series)" if path.suffix == ".dcm" else ""
        raise ValueError(f"{path}: expected a 3D volume, got 2D image of size {plane}{hint}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a grey-level volume, got {image.GetNumberOfComponentsPerPixel()} "
            "components per pixel (a colour or vector image)"
        )
    return image


def load_volume(path: str | os.PathLike, orient: str | None = "LPS", series_id: str | None = None) -> Volume:
    """Read a scan as a D x H x W float32 array plus its geometry.

    ``path``: a NIfTI, DICOM (single file or enhanced multi-frame), NRRD or MHA file, a folder with one
    DICOM series (``series_id`` picks one when there are several), or a ``.npy`` array (D x H x W or
    1 x D x H x W, taken as it is: 1 mm spacing, no orientation). CT comes in Hounsfield units.
    ``orient``: the 3-letter DICOM orientation to re-orient to with ``sitk.DICOMOrient`` (default
    "LPS": row 0 of an axial slice is anterior, slice 0 inferior); None keeps the file's voxel order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; expected {_READABLE}")
    if path.suffix == ".npy":
        return _npy_volume(path)
    if path.is_dir():
        image = _read_series(path, series_id)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ValueError(
                f"{path}: SimpleITK cannot read it ({_sitk_reason(error)}); expected {_READABLE}"
            ) from None
    image = _as_3d(image, path)
    input_grid = Grid.of(image)
    if orient is not None:
        try:
            image = sitk.DICOMOrient(image, orient)
        except RuntimeError as error:
            raise ValueError(
                f"{path}: cannot orient to {orient!r} ({_sitk_reason(error)}); "
                "expected 3 letters like 'LPS' or 'RAS'"
            ) from None
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    bad = max(int(array.size - np.isfinite(array).sum()), _nifti_nan_count(path))
    if bad:
        raise ValueError(f"{path}: {bad} of {array.size} voxels are NaN or infinite; expected finite values")
    return Volume(
        array=array,
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
        source=str(path),
        input_grid=input_grid,
    )


def prepare_file(
    path: str | os.PathLike,
    shape: tuple[int, int, int],
    window: Window = None,
    crop_foreground: bool = True,
    percentiles: tuple[float, float] | None = None,
    series_id: str | None = None,
) -> tuple[PreparedVolume, Volume]:
    """Load ``path`` (see :func:`load_volume`) and prepare it to a 1 x ``shape`` volume in [0, 1].

    ``window``: a :data:`WINDOWS` name or (lower, upper) in HU for CT; None scales min..max (MRI).
    ``percentiles``: instead of a window, clip to these intensity percentiles first, e.g. (0.5, 99.5)
    as M3D-RefSeg does; robust for MRI, where a few bright voxels would squash a min-max scaling.
    """
    if window is not None and percentiles is not None:
        raise ValueError(f"{path}: give a window or percentiles, not both")
    volume = load_volume(path, series_id=series_id)
    if percentiles is not None:
        window = percentile_window(volume.array, *percentiles)
    prepared = prepare_arrays(volume.array, shape, window, crop_foreground=crop_foreground, name=str(path))
    return prepared, volume


def save_mask_nifti(
    mask: np.ndarray, reference: Volume, path: str | os.PathLike, crop_box: Box | None = None
) -> Path:
    """Write a mask or label map as a NIfTI aligned with the scan ``reference`` was loaded from.

    ``mask`` is either on ``reference.array``'s voxels or a prepared (1 x) D x H x W mask; then pass
    ``crop_box`` (``PreparedVolume.crop_box``) when it was prepared with ``crop_foreground=True``.
    It is resized back (nearest), padded with zeros outside the box and resampled onto the grid of the
    original file (undoing the re-orientation), so it overlays the input scan voxel for voxel.
    """
    mask = _check_volume(mask, f"mask for {reference.source}")
    source_shape = reference.array.shape
    if crop_box is not None or mask.shape != source_shape:
        mask = restore_mask(mask, crop_box or ((0, 0, 0), source_shape), source_shape)
    image = reference.to_image(mask.astype(np.uint8))
    grid = reference.input_grid
    if grid is not None:
        image = sitk.Resample(
            image,
            grid.size,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            grid.origin,
            grid.spacing,
            grid.direction,
            0,
            sitk.sitkUInt8,
        )
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)
