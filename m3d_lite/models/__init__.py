"""Models: the 3D ViT and its tower (vision), M3D-CLIP (clip), and finding pretrained weights (pretrained).

Importing this package registers ``m3d_vit`` and ``m3d_clip`` with transformers' Auto classes, so
``AutoModel.from_pretrained(folder)`` reads a saved M3D-CLIP without ``trust_remote_code``.
"""

from m3d_lite.models.clip import (
    M3DClipConfig,
    M3DClipModel,
    M3DClipOutput,
    build_clip,
    clip_loss,
    load_clip,
    save_clip,
)
from m3d_lite.models.pretrained import PretrainedNotFoundError, load_text_tokenizer, resolve_pretrained
from m3d_lite.models.vision import (
    VisionConfig,
    VisionTower,
    ViT3D,
    load_vision_encoder,
    patchify,
    save_vision_encoder,
)

__all__ = [
    "M3DClipConfig",
    "M3DClipModel",
    "M3DClipOutput",
    "PretrainedNotFoundError",
    "ViT3D",
    "VisionConfig",
    "VisionTower",
    "build_clip",
    "clip_loss",
    "load_clip",
    "load_text_tokenizer",
    "load_vision_encoder",
    "patchify",
    "resolve_pretrained",
    "save_clip",
    "save_vision_encoder",
]
