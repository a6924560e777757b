"""Models: the 3D ViT and its tower (vision), M3D-CLIP (clip), the projector (projector), M3D's tokens and
prompts (tokenizer), the LaMed multimodal LLM (lamed), LoRA on its LLM (lora), and finding pretrained weights
(pretrained).

Importing this package registers ``m3d_vit``, ``m3d_clip`` and ``lamed`` with transformers' Auto classes,
so ``AutoModel.from_pretrained(folder)`` reads a saved M3D-CLIP and
``AutoModelForCausalLM.from_pretrained(folder)`` a saved LaMed, without ``trust_remote_code``.
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
from m3d_lite.models.lamed import (
    LaMedConfig,
    LaMedForCausalLM,
    LLMConfig,
    build_lamed,
    load_lamed,
    save_lamed,
)
from m3d_lite.models.lora import (
    LoraSettings,
    apply_lora,
    export_merged,
    load_lamed_lora,
    lora_targets,
    merge_lora,
    save_lamed_lora,
)
from m3d_lite.models.pretrained import (
    PretrainedNotFoundError,
    load_llm,
    load_llm_tokenizer,
    load_text_tokenizer,
    resolve_llm,
    resolve_pretrained,
)
from m3d_lite.models.projector import (
    LinearProjector,
    ProjectorConfig,
    SpatialPoolingProjector,
    build_projector,
)
from m3d_lite.models.tokenizer import (
    BOX_END,
    BOX_START,
    IMAGE_TOKEN,
    SEG_TOKEN,
    add_m3d_tokens,
    build_prompt,
    encode_example,
    encode_prompts,
    resize_with_mean_init,
)
from m3d_lite.models.vision import (
    VisionConfig,
    VisionTower,
    ViT3D,
    load_vision_encoder,
    patchify,
    save_vision_encoder,
)

__all__ = [
    "BOX_END",
    "BOX_START",
    "IMAGE_TOKEN",
    "LLMConfig",
    "LaMedConfig",
    "LaMedForCausalLM",
    "LinearProjector",
    "LoraSettings",
    "M3DClipConfig",
    "M3DClipModel",
    "M3DClipOutput",
    "PretrainedNotFoundError",
    "ProjectorConfig",
    "SEG_TOKEN",
    "SpatialPoolingProjector",
    "ViT3D",
    "VisionConfig",
    "VisionTower",
    "add_m3d_tokens",
    "apply_lora",
    "build_clip",
    "build_lamed",
    "build_projector",
    "build_prompt",
    "clip_loss",
    "encode_example",
    "encode_prompts",
    "export_merged",
    "load_clip",
    "load_lamed",
    "load_lamed_lora",
    "load_llm",
    "load_llm_tokenizer",
    "load_text_tokenizer",
    "load_vision_encoder",
    "lora_targets",
    "merge_lora",
    "patchify",
    "resize_with_mean_init",
    "resolve_llm",
    "resolve_pretrained",
    "save_clip",
    "save_lamed",
    "save_lamed_lora",
    "save_vision_encoder",
]
