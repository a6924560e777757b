"""Our models written the way the official M3D releases lay them out: the inverse of
:mod:`m3d_lite.models.official`.

``save_official_lamed`` and ``save_official_clip`` write a folder that ``convert_m3d_lamed`` /
``convert_m3d_clip`` read back tensor for tensor, and whose keys are those of M3D-LaMed and M3D-CLIP: the
converters' renaming rules run backwards (:func:`invert_rule`, so the rules exist once), plus zero
placeholders for the parts M3D saves but never uses. Notebook 07 uses it to show a conversion without the
Hub; a practitioner can use it to hand an m3d-lite model to M3D's own evaluation scripts (which also need
M3D's ``modeling_*.py`` files, not written here).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from m3d_lite.io import atomic_dir, save_json
from m3d_lite.models.clip import M3DClipModel
from m3d_lite.models.lamed import LaMedConfig, LaMedForCausalLM
from m3d_lite.models.official import (
    CLIP_RULES,
    LAMED_LLMS,
    LAMED_ONLY_KEYS,
    LAMED_RULES,
    M3D_ARCHITECTURES,
)
from m3d_lite.models.seg_pathway import fold_state_norm
from m3d_lite.models.segmentation import SegConfig
from m3d_lite.models.vision import VisionConfig


def unescape(text: str) -> str:
    """A regex literal (``norm\\.weight``) as the text it matches (``norm.weight``)."""
    return re.sub(r"\\(.)", r"\1", text)


def split_rule_pattern(pattern: str) -> list[tuple[bool, str]]:
    """``pattern`` as ``(is_group, text)`` pieces: its top-level groups and the literal runs between them."""
    pieces: list[tuple[bool, str]] = []
    depth, start, i = 0, 0, 0
    while i < len(pattern):
        char = pattern[i]
        if (char == "(" and depth == 0) or (char == ")" and depth == 1):
            pieces.append((char == ")", pattern[start:i]))
            start = i + 1
        depth += {"(": 1, ")": -1}.get(char, 0)
        i += 2 if char == "\\" else 1
    pieces.append((False, pattern[start:]))
    return [(is_group, text) for is_group, text in pieces if is_group or text]


def invert_rule(pattern: str, template: str) -> tuple[str, str]:
    """The rule mapping ``template``'s output back to what ``pattern`` matched. Only rules of literal text
    and capturing groups, each group used once in ``template`` (as every rule above), can be inverted."""
    pieces = split_rule_pattern(pattern)
    groups = [text for is_group, text in pieces if is_group]
    template_parts = re.split(r"\\(\d+)", template)  # literal, group number, literal, ..., literal
    refs = [int(number) for number in template_parts[1::2]]
    invertible = (
        sorted(refs) == list(range(1, len(groups) + 1))
        and all(re.escape(unescape(text)) == text for is_group, text in pieces if not is_group)
        and not any(group.startswith("?") or re.compile(group).groups for group in groups)
    )
    if not invertible:
        raise ValueError(
            f"rule {pattern!r} -> {template!r} cannot be inverted: it must be literal text and capturing "
            "groups, each group used once in the template"
        )
    inverse_pattern = "".join(
        f"({groups[int(part) - 1]})" if k % 2 else re.escape(part) for k, part in enumerate(template_parts)
    )
    numbers = iter(range(1, len(groups) + 1))
    inverse_template = "".join(
        f"\\g<{refs.index(next(numbers)) + 1}>" if is_group else unescape(text).replace("\\", "\\\\")
        for is_group, text in pieces
    )
    return inverse_pattern, inverse_template


def to_official(
    state: dict[str, torch.Tensor], rules: tuple[tuple[str, str], ...], what: str
) -> dict[str, torch.Tensor]:
    """``state`` (our keys) under the official names: ``rules`` inverted, and each name checked to map back
    to our key through ``rules`` themselves; a tensor with no official name is an error naming it."""
    inverse = [invert_rule(pattern, template) for pattern, template in rules]
    official, unplaced = {}, []
    for key, tensor in state.items():
        name = next((m.expand(t) for p, t in inverse if (m := re.fullmatch(p, key))), None)
        back = name and next((m.expand(t) for p, t in rules if (m := re.fullmatch(p, name))), None)
        if back == key:
            official[name] = tensor
        else:
            unplaced.append(key)
    if unplaced:
        raise ValueError(
            f"{what}: {len(unplaced)} tensor(s) have no place in M3D's layout: {unplaced[:10]}"
            f"{' ...' if len(unplaced) > 10 else ''}"
        )
    return official


def unused_segvol_parts(seg: SegConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the SegVol tensors that M3D-LaMed's checkpoints carry and M3D never uses (the ones
    :data:`LAMED_DROPS` drops): point and "not a point" embeddings, the 2-D mask-downscaling stack (Conv2d,
    LayerNorm2d, Conv2d, LayerNorm2d, Conv2d) and the IoU head (256 wide, one score per mask token)."""
    e, prefix = seg.hidden_size, "model.seg_module."
    shapes = {f"{prefix}prompt_encoder.point_embeddings.{i}.weight": (1, e) for i in range(4)}
    shapes[f"{prefix}prompt_encoder.not_a_point_embed.weight"] = (1, e)
    for index, weight in {0: (4, 1, 2, 2), 1: (4,), 3: (16, 4, 2, 2), 4: (16,), 6: (e, 16, 1, 1)}.items():
        shapes[f"{prefix}prompt_encoder.mask_downscaling.{index}.weight"] = weight
        shapes[f"{prefix}prompt_encoder.mask_downscaling.{index}.bias"] = weight[:1]
    for index, (out_dim, in_dim) in enumerate([(256, e), (256, 256), (seg.num_mask_tokens, 256)]):
        shapes[f"{prefix}mask_decoder.iou_prediction_head.layers.{index}.weight"] = (out_dim, in_dim)
        shapes[f"{prefix}mask_decoder.iou_prediction_head.layers.{index}.bias"] = (out_dim,)
    return shapes


def zeros_like_layout(shapes: dict[str, tuple[int, ...]], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero tensors of ``shapes`` on ``like``'s device and in its dtype (placeholders for unused parts)."""
    return {key: torch.zeros(shape, dtype=like.dtype, device=like.device) for key, shape in shapes.items()}


def official_lamed_state(model: LaMedForCausalLM) -> dict[str, torch.Tensor]:
    """``model``'s tensors under M3D-LaMed's names (:data:`LAMED_RULES` inverted), plus zeros for the SegVol
    parts M3D saves and never uses, so that the keys are the releases' (also on the meta device). A
    ``seg_state_norm`` (not in M3D) is folded into the seg projector (:func:`fold_state_norm`)."""
    state = to_official(fold_state_norm(model.state_dict()), LAMED_RULES, "LaMed")
    if model.seg_module is not None:
        like = state["model.seg_module.mask_decoder.iou_token.weight"]
        state |= zeros_like_layout(unused_segvol_parts(model.config.seg_config), like)
    return state


def official_lamed_config(config: LaMedConfig) -> dict[str, Any]:
    """M3D-LaMed's ``config.json`` for ``config``: the LLM's own config with M3D's keys added. Refused: an
    LLM other than Phi-3 or Llama, and a seg ViT whose geometry or heads differ from the vision tower's
    (M3D's layout records them once, for both)."""
    text, vision, seg = config.text_config, config.vision_config, config.seg_config
    model_type = {llm: m3d for m3d, llm in LAMED_LLMS.items()}.get(text.model_type)
    if model_type is None:
        raise ValueError(
            f"M3D-LaMed's layout holds a {' or '.join(LAMED_LLMS.values())} LLM; this model's is "
            f"{text.model_type!r}"
        )
    geometry = (tuple(vision.image_size), tuple(vision.patch_size), vision.num_heads)
    if seg is not None and (tuple(seg.image_size), tuple(seg.patch_size), seg.num_heads) != geometry:
        raise ValueError(
            f"M3D-LaMed's layout gives the seg ViT the vision tower's image size, patch size and heads "
            f"{geometry}; this seg module has {(tuple(seg.image_size), tuple(seg.patch_size), seg.num_heads)}"
        )
    return {
        **{k: v for k, v in text.to_dict().items() if k not in LAMED_ONLY_KEYS},
        "architectures": [M3D_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "image_channel": vision.in_channels,
        "image_size": list(vision.image_size),
        "patch_size": list(vision.patch_size),
        "vision_tower": "vit3d",
        "vision_select_layer": -1,
        "vision_select_feature": "patch",
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": config.projector.projector_type,
        "proj_layer_type": config.projector.layer_type,
        "proj_layer_num": 2 if config.projector.layer_type == "mlp" else 1,
        "proj_pooling_type": "spatial",
        "proj_pooling_size": config.projector.pooling_size,
        "segmentation_module": None if seg is None else "segvol",
        "seg_token_id": config.seg_token_id,
    }


def write_official(
    folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> None:
    """``model.safetensors`` (a tensor that shares memory with an earlier one, e.g. tied embeddings, as its
    own copy: safetensors stores no aliases), ``config.json`` and the tokenizer into ``folder``."""
    tensors, storages = {}, set()
    for key, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.detach().clone() if storage in storages else tensor.detach().contiguous()
        storages.add(storage)
    save_file(tensors, str(folder / "model.safetensors"))
    save_json(folder / "config.json", config)
    tokenizer.save_pretrained(folder)


def save_official_lamed(
    model: LaMedForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike
) -> Path:
    """Write ``model`` as an M3D-LaMed release lays it out (``config.json`` with M3D's keys, M3D's tensor
    names in ``model.safetensors``, the tokenizer, ``generation_config.json``), atomically: the inverse of
    :func:`convert_m3d_lamed`, which reads it back with ``vit_heads`` = the ViT's heads and
    ``decoder_heads`` = the mask decoder's (no tensor shows them; M3D's are 12 and 8). Not recorded, as in
    M3D's layout: the prompt format (a converted model uses M3D's, without chat template) and the sample
    length (512). M3D's own ``modeling_*.py`` files (its ``auto_map``) are not written."""
    config, state = official_lamed_config(model.config), official_lamed_state(model)
    with atomic_dir(folder) as tmp:
        write_official(tmp, state, config, tokenizer)
        model.generation_config.save_pretrained(tmp)
    return Path(folder)


def save_official_clip(
    model: M3DClipModel, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike
) -> Path:
    """Write ``model`` as M3D-CLIP's release lays it out (``config.json``, ``model.safetensors`` with
    :data:`CLIP_RULES` inverted and zeros for BERT's unused pooler, the tokenizer), atomically: the inverse
    of :func:`convert_m3d_clip`. M3D-CLIP always multiplies the raw ``logit_scale`` and embeds the CLS
    token, so a model with another ``temperature`` or ``text_pooling`` is refused: read back, it would
    compute other similarities. The text tower is recorded by name (``text_model``)."""
    config = model.config
    if (config.temperature, config.text_pooling) != ("m3d", "cls"):
        raise ValueError(
            f"M3D-CLIP's layout means temperature 'm3d' and text pooling 'cls'; this model has "
            f"{config.temperature!r} and {config.text_pooling!r}, which it cannot record (build it with "
            "temperature='m3d', text_pooling='cls')"
        )
    vision, text = VisionConfig(**config.vision_config), model.text_encoder.config
    state = to_official(model.state_dict(), CLIP_RULES, "M3D-CLIP")
    pooler = {"language_encoder.pooler.dense.weight": (text.hidden_size,) * 2}
    pooler["language_encoder.pooler.dense.bias"] = (text.hidden_size,)
    state |= zeros_like_layout(pooler, state["logit_scale"])
    official = {
        "model_type": "m3d_clip",
        "architectures": ["M3DCLIP"],
        "language_model_name_or_path": config.text_model,
        "in_channels": vision.in_channels,
        "img_size": list(vision.image_size),
        "patch_size": list(vision.patch_size),
        "hidden_size": vision.hidden_size,
        "mlp_dim": vision.mlp_dim,
        "num_layers": vision.num_layers,
        "num_heads": vision.num_heads,
        "pos_embed": "perceptron",
        "max_text_len": config.max_text_len,
        "vocab_size": text.vocab_size,
    }
    with atomic_dir(folder) as tmp:
        write_official(tmp, state, official, tokenizer)
    return Path(folder)
