"""Turn a CT/MR volume into M3D's model input: 1 x D x H x W float32 in [0, 1].

The chain is M3D's (window or min-max, crop to the foreground, resize) built from MONAI's
dictionary transforms, so that masks stay aligned with their image (nearest-neighbour resize).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from monai.transforms import Compose, CropForegroundd, Resized, ScaleIntensityd, ScaleIntensityRanged

# Common CT display windows in Hounsfield units (lower, upper).
WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (-160.0, 240.0),
    "bone": (-450.0, 1050.0),
    "lung": (-1350.0, 150.0),
}


@dataclass
class PreparedVolume:
    """A prepared image (1 x D x H x W, float32, [0, 1]) and its masks (1 x D x H x W, bool) by name."""

    image: np.ndarray
    masks: dict[str, np.ndarray]


def window_hu(hu: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Map Hounsfield units to [0, 1]: ``lower`` -> 0, ``upper`` -> 1, clipped outside."""
    if not upper > lower:
        raise ValueError(f"window upper {upper} must be greater than lower {lower}")
    return np.clip((np.asarray(hu, dtype=np.float32) - lower) / (upper - lower), 0.0, 1.0)


def _check_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume D x H x W (or 1 x D x H x W), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name}: volume of shape {array.shape} contains NaN or infinite values")
    return array


def prepare_arrays(
    image: np.ndarray,
    shape: tuple[int, int, int],
    window: tuple[float, float] | None = None,
    masks: Mapping[str, np.ndarray] | None = None,
    crop_foreground: bool = True,
    name: str = "volume",
) -> PreparedVolume:
    """Window (or min-max) ``image``, crop it to its foreground, and resize it and ``masks`` to ``shape``.

    ``image`` is D x H x W (HU for CT when ``window`` is given; any intensity otherwise). The
    foreground is every voxel above 0 after scaling, as in M3D's ``CropForeground``. ``name`` is
    used in error messages (pass the file path).
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

    mask_keys = [f"mask:{k}" for k in masks]
    keys = ["image", *mask_keys]
    if window is None:
        scale = ScaleIntensityd(keys="image", minv=0.0, maxv=1.0)
    else:
        scale = ScaleIntensityRanged(
            keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True
        )
    steps = [scale]
    if crop_foreground:
        steps.append(CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
    steps.append(
        Resized(keys=keys, spatial_size=tuple(shape), mode=("trilinear", *["nearest"] * len(mask_keys)))
    )
    sample = {"image": image[None].astype(np.float32)}
    sample.update({f"mask:{k}": m[None].astype(np.float32) for k, m in masks.items()})
    out = Compose(steps)(sample)
    prepared = np.clip(np.asarray(out["image"], dtype=np.float32), 0.0, 1.0)
    return PreparedVolume(
        image=prepared,
        masks={k: np.asarray(out[f"mask:{k}"]) > 0.5 for k in masks},
    )
