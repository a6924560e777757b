"""M3D's stage-2 training augmentation (M3D_FACTS 2.3): MONAI dictionary transforms, seeded.

M3D augments every training volume of its instruction data with random in-plane 90-degree rotations,
flips along each axis and a small change of intensity scale and shift. Dictionary transforms apply the
same rotation and flips to the image and its class mask, so a box computed from the mask afterwards
still encloses the target in the augmented image.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ToTensord,
)


def train_augmentation(
    keys: Sequence[str] = ("image",), mask_key: str | None = None, seed: int = 0
) -> Compose:
    """M3D's augmentation of 1 x D x H x W tensors under ``keys`` (and of the mask under ``mask_key``).

    As in M3D's ``train_transform``: ``RandRotate90d`` p 0.5 in the H x W plane (spatial axes (1, 2));
    ``RandFlipd`` p 0.1 along each of D, H and W; ``RandScaleIntensityd`` factor 0.1 and
    ``RandShiftIntensityd`` offset 0.1, each p 0.5, on the images only (values may leave [0, 1] a little,
    as in M3D). Rotation and flips move the mask with the images. The result is a plain
    ``torch.Tensor`` per key (no MONAI ``MetaTensor``), with the input's shape when H == W (a rotation
    swaps H and W). The ``Compose`` is seeded: the same ``seed`` gives the same draws, in any process.
    """
    images = list(keys)
    spatial = images + ([mask_key] if mask_key else [])
    return Compose(
        [
            RandRotate90d(spatial, prob=0.5, spatial_axes=(1, 2)),
            *(RandFlipd(spatial, prob=0.1, spatial_axis=axis) for axis in range(3)),
            RandScaleIntensityd(images, factors=0.1, prob=0.5),
            RandShiftIntensityd(images, offsets=0.1, prob=0.5),
            ToTensord(spatial, track_meta=False),
        ]
    ).set_random_state(seed=seed)
