"""Read the official M3D checkpoints into m3d_lite's classes: M3D-CLIP and M3D-LaMed (Phi-3-4B, Llama-2-7B).

``convert_m3d_clip(src, out_dir)`` takes the whole M3D-CLIP (``GoodBaiBai88/M3D-CLIP``) or its ViT alone
(``pretrained_ViT.bin``); ``convert_m3d_lamed(src, out_dir)`` takes M3D-LaMed
(``GoodBaiBai88/M3D-LaMed-Phi-3-4B``, ``GoodBaiBai88/M3D-LaMed-Llama-2-7B``). ``src`` is a local folder or
file, or a Hub id (``owner/name``, or ``owner/name/FILE`` for one file). Each writes a folder that this
package's loaders read offline (``load_clip``, ``load_vision_encoder``, ``load_lamed``, ``m3d-lite infer``)
and returns a :class:`ConversionReport` (also saved as ``conversion.json``): every official tensor is either
mapped to one of ours or dropped for a stated reason; a tensor that is neither, a tensor missing, or a shape
that does not fit is an error naming it. Nothing from the checkpoint is executed (safetensors, or
``torch.load(weights_only=True)``; no ``trust_remote_code``): see :mod:`m3d_lite.models.official_checkpoint`.

The other way (our models in M3D's layout) is :mod:`m3d_lite.models.official_export`.

Key layouts (M3D_FACTS 1.8, M3D_STATE_DICT.md): the ViT's keys are ours (``ViT3D`` is built as M3D's);
M3D-CLIP's ``language_encoder.*`` is our ``text_encoder.*``; M3D-LaMed's LLM keys (``model.embed_tokens``,
``model.layers.*``, ``model.norm``, ``lm_head``) move under ``language_model.``, its ``model.vision_tower``,
``model.mm_projector``, ``model.seg_projector``, ``model.seg_module`` lose the ``model.`` prefix, and SAM's
``mlp.lin1/lin2`` in the mask decoder become MONAI's ``mlp.linear1/linear2``. Sizes (widths, depths, the
vocabulary of 32015 rows) are read from the tensors; image and patch size from ``config.json``; head counts,
which no tensor shows, default to M3D's (ViT 12, mask decoder 8) and can be given.

A converted LaMed keeps M3D's prompt format (``chat_template=False``: BOS, the image tokens, the question);
its image tokens are spliced by mask, which gives M3D's positional splice for such prompts.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import AutoConfig, GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase

from m3d_lite.io import atomic_dir
from m3d_lite.models.clip import M3DClipConfig, M3DClipModel, save_clip, text_config_dict, vision_config_dict
from m3d_lite.models.lamed import LaMedConfig, LaMedForCausalLM, save_lamed, token_id_fields
from m3d_lite.models.official_checkpoint import (
    LAMED_HUB_IDS,
    Checkpoint,
    ConversionReport,
    load_into,
    read_checkpoint,
    rename,
    source_tokenizer,
    vit_config,
    write_report,
)
from m3d_lite.models.pretrained import load_text_tokenizer
from m3d_lite.models.projector import ProjectorConfig
from m3d_lite.models.segmentation import SegConfig
from m3d_lite.models.tokenizer import SEG_TOKEN, add_m3d_tokens
from m3d_lite.models.vision import VisionConfig, ViT3D, save_vision_encoder

LAMED_LLMS = {"lamed_phi3": "phi3", "lamed_llama": "llama"}  # M3D's model_type -> the LLM's
M3D_ARCHITECTURES = {"lamed_phi3": "LamedPhi3ForCausalLM", "lamed_llama": "LamedLlamaForCausalLM"}
M3D_MAX_TEXT_LEN = 512  # BERT tokens per report in M3D-CLIP's training (its config's max_text_len is unused)
M3D_MAX_LENGTH = 512  # LaMed's model_max_length in M3D's scripts
# keys of M3D-LaMed's config.json that are not the LLM's (M3D stores them on the LLM config)
LAMED_ONLY_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",
        "_name_or_path",
        "transformers_version",
        "use_cache",  # M3D saved False (training); generation wants the LLM's default
        "image_channel",
        "image_size",
        "patch_size",
        "vision_tower",
        "vision_select_layer",
        "vision_select_feature",
        "mm_hidden_size",
        "mm_projector_type",
        "proj_layer_type",
        "proj_layer_num",
        "proj_pooling_type",
        "proj_pooling_size",
        "segmentation_module",
        "seg_token_id",
        "tune_mm_mlp_adapter",
    }
)

# (official key pattern, our key) in order; the first full match wins
VIT_RULES = ((r"(cls_token|patch_embedding\..+|blocks\..+|norm\.(?:weight|bias))", r"\1"),)
CLIP_RULES = (
    (r"(vision_encoder\..+)", r"\1"),
    (r"language_encoder\.(.+)", r"text_encoder.\1"),
    (r"(mm_vision_proj|mm_language_proj)\.(weight|bias)", r"\1.\2"),
    (r"logit_scale", "logit_scale"),
)
LAMED_RULES = (
    (
        r"model\.seg_module\.mask_decoder\.transformer\.layers\.(\d+)\.mlp\.lin([12])\.(weight|bias)",
        r"seg_module.mask_decoder.transformer.layers.\1.mlp.linear\2.\3",
    ),
    (r"model\.(vision_tower|mm_projector|seg_projector|seg_module)\.(.+)", r"\1.\2"),
    (r"model\.(embed_tokens|layers|norm)\.(.+)", r"language_model.model.\1.\2"),
    (r"lm_head\.(.+)", r"language_model.lm_head.\1"),
)
# (official key pattern, why it is dropped)
BUFFER_DROPS = (
    (r"(.+\.)?position_ids", "BERT's position ids: a buffer rebuilt from the config"),
    (r".+\.rotary_emb\.inv_freq", "RoPE frequencies: a buffer rebuilt from the config"),
)
CLIP_DROPS = (
    (
        r"language_encoder\.pooler\..+",
        "BERT's pooler: M3D-CLIP embeds the CLS state, never the pooler output",
    ),
    *BUFFER_DROPS,
)
LAMED_DROPS = (
    (
        r"model\.seg_module\.prompt_encoder\.(point_embeddings|not_a_point_embed|mask_downscaling)\..+",
        "SegVol's point, box and mask prompts: M3D prompts the mask decoder with the [SEG] state only",
    ),
    (
        r"model\.seg_module\.mask_decoder\.iou_prediction_head\..+",
        "SegVol's IoU head: M3D never uses its output (multimask_output=False)",
    ),
    *BUFFER_DROPS,
)


def clip_config(checkpoint: Checkpoint, vision: VisionConfig) -> M3DClipConfig:
    """M3D-CLIP's settings as ours: temperature "m3d" (the raw scale) and CLS pooling, as M3D; the text tower
    named by config.json (bert-base-uncased for the release) with M3D's 512 tokens per report."""
    official = checkpoint.config if checkpoint.config.get("model_type") == "m3d_clip" else {}
    text_model = official.get("language_model_name_or_path") or "bert-base-uncased"
    text_config = text_config_dict(text_model, max_text_len=1)
    positions = AutoConfig.for_model(**text_config).max_position_embeddings
    return M3DClipConfig(
        vision_config=vision_config_dict(vision),
        text_model=text_model,
        text_config=text_config,
        max_text_len=min(M3D_MAX_TEXT_LEN, positions),
        temperature="m3d",
        text_pooling="cls",
        embed_dim=checkpoint.shape("mm_vision_proj.weight", "the embedding width")[0],
    )


def convert_m3d_clip(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int, int] | None = None,
    patch_size: tuple[int, int, int] | None = None,
    num_heads: int | None = None,
    dtype: torch.dtype | None = None,
) -> ConversionReport:
    """Convert M3D-CLIP (Hub id, folder, or weights file) into ``out_dir``, laid out as a ``train clip`` run.

    The whole CLIP (``vision_encoder.*``, ``language_encoder.*``, ...) gives ``out_dir/model/`` (read it with
    ``load_clip``) and ``out_dir/vision_encoder/``; a ViT alone (``pretrained_ViT.bin``) gives
    ``out_dir/vision_encoder/`` only (``load_vision_encoder``, or ``build_lamed(vision_encoder=...)``).
    ``image_size``, ``patch_size``, ``num_heads`` default to the checkpoint's ``config.json`` and else to
    M3D's (32 x 256 x 256, 4 x 16 x 16, 12). The tokenizer is the one in the checkpoint's folder, else the
    text tower's. ``dtype`` casts the weights (default: as stored).
    """
    checkpoint = read_checkpoint(src, dtype)
    official = checkpoint.config if checkpoint.config.get("model_type") == "m3d_clip" else {}
    defaults = VisionConfig()
    geometry = (
        tuple(image_size or official.get("img_size", defaults.image_size)),
        tuple(patch_size or official.get("patch_size", defaults.patch_size)),
        num_heads or official.get("num_heads", defaults.num_heads),
    )
    whole = any(k.startswith("vision_encoder.") for k in checkpoint.state)
    kind = "M3D-CLIP" if whole else "M3D ViT"
    rules, drops = (CLIP_RULES, CLIP_DROPS) if whole else (VIT_RULES, BUFFER_DROPS)
    state, mapped, dropped = rename(checkpoint, rules, drops, kind)
    vision = vit_config(checkpoint, "vision_encoder." if whole else "", *geometry)
    report = ConversionReport(kind, checkpoint.source, os.fspath(out_dir), mapped, dropped)
    if not whole:
        with torch.device("meta"):
            vit = ViT3D(vision)
        load_into(vit, state, mapped, checkpoint.source)
        with atomic_dir(out_dir) as tmp:
            save_vision_encoder(vit, tmp / "vision_encoder")
            write_report(tmp, report)
        return report

    config = clip_config(checkpoint, vision)
    text_config = AutoConfig.for_model(**config.text_config)
    tokenizer = source_tokenizer(checkpoint, text_config) or load_text_tokenizer(config.text_model)
    tokenizer.model_max_length = config.max_text_len
    with torch.device("meta"):
        model = M3DClipModel(config)
    load_into(model, state, mapped, checkpoint.source)
    with atomic_dir(out_dir) as tmp:
        save_clip(model, tokenizer, tmp / "model")
        model.save_vision_encoder(tmp / "vision_encoder")
        write_report(tmp, report)
    return report


def llm_config(checkpoint: Checkpoint) -> PreTrainedConfig:
    """The LLM's config: M3D-LaMed's config.json without M3D's own keys, as the base model type, with the
    vocabulary the embedding holds (32015 for the Phi-3 release)."""
    model_type = checkpoint.config.get("model_type")
    if model_type not in LAMED_LLMS:
        raise ValueError(
            f"{checkpoint.source}: config.json has model_type {model_type!r}, expected one of "
            f"{sorted(LAMED_LLMS)} (an M3D-LaMed checkpoint folder, e.g. {LAMED_HUB_IDS[0]})"
        )
    values = {k: v for k, v in checkpoint.config.items() if k not in LAMED_ONLY_KEYS}
    values["vocab_size"] = checkpoint.shape("model.embed_tokens.weight", "the vocabulary size")[0]
    return AutoConfig.for_model(LAMED_LLMS[model_type], **values)


def projector_config(checkpoint: Checkpoint) -> ProjectorConfig:
    """M3D's projector settings as ours; the variants no released model uses are refused by name."""
    official = checkpoint.config
    kind = official.get("mm_projector_type", "spp")
    if kind == "linear":
        return ProjectorConfig(projector_type="linear")
    layers = (official.get("proj_layer_type", "mlp"), int(official.get("proj_layer_num", 2)))
    pooling = official.get("proj_pooling_type", "spatial")
    if kind != "spp" or layers not in (("mlp", 2), ("linear", 1)) or pooling != "spatial":
        raise ValueError(
            f"{checkpoint.source}: projector {kind!r} with {layers[1]} {layers[0]} layer(s) and {pooling!r} "
            "pooling has no m3d_lite counterpart (supported: spp with 2 mlp layers or 1 linear layer and "
            "spatial pooling, as released; or linear)"
        )
    return ProjectorConfig("spp", layers[0], int(official.get("proj_pooling_size", 2)))


def seg_config(checkpoint: Checkpoint, vision: VisionConfig, decoder_heads: int) -> SegConfig:
    """SegVol's sizes from its tensors (its ViT has the vision tower's geometry and head count)."""
    prefix = "model.seg_module."
    encoder = vit_config(
        checkpoint, f"{prefix}image_encoder.", vision.image_size, vision.patch_size, vision.num_heads
    )
    layer = f"{prefix}mask_decoder.transformer.layers.0."
    cross = checkpoint.shape(f"{layer}cross_attn_token_to_image.q_proj.weight", "the decoder's attention")[0]
    return SegConfig(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_size=encoder.hidden_size,
        mlp_dim=encoder.mlp_dim,
        num_layers=encoder.num_layers,
        num_heads=encoder.num_heads,
        decoder_depth=checkpoint.count(f"{prefix}mask_decoder.transformer.layers."),
        decoder_heads=decoder_heads,
        decoder_mlp_dim=checkpoint.shape(f"{layer}mlp.lin1.weight", "the decoder's MLP width")[0],
        attention_downsample=encoder.hidden_size // cross,
        num_mask_tokens=checkpoint.shape(f"{prefix}mask_decoder.mask_tokens.weight", "the mask count")[0],
    )


def m3d_token_ids(checkpoint: Checkpoint, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The ids of M3D's tokens in the checkpoint's tokenizer, which must already hold all four."""
    size = len(tokenizer)
    token_ids = add_m3d_tokens(tokenizer)
    if len(tokenizer) != size:
        raise ValueError(
            f"{checkpoint.source}: its tokenizer lacks some of M3D's tokens {sorted(token_ids)} "
            "(an M3D-LaMed tokenizer holds them)"
        )
    expected = checkpoint.config.get("seg_token_id", token_ids[SEG_TOKEN])
    if token_ids[SEG_TOKEN] != expected:
        raise ValueError(
            f"{checkpoint.source}: config.json says seg_token_id {expected}, its tokenizer has "
            f"{SEG_TOKEN} = {token_ids[SEG_TOKEN]}"
        )
    return token_ids


def lamed_config(
    checkpoint: Checkpoint, token_ids: dict[str, int], vit_heads: int, decoder_heads: int
) -> LaMedConfig:
    """M3D-LaMed's settings as ours: its ViT, projector, LLM and (when it has one) mask decoder, M3D's
    token ids, and M3D's prompt format (``chat_template=False``) and ``model_max_length``."""
    official = checkpoint.config
    for key, allowed in (("vision_select_layer", -1), ("vision_select_feature", "patch")):
        if official.get(key, allowed) != allowed:
            raise ValueError(
                f"{checkpoint.source}: {key} {official[key]!r} is not supported, only {allowed!r}"
            )
    defaults = VisionConfig()
    image_size = tuple(official.get("image_size", defaults.image_size))
    patch_size = tuple(official.get("patch_size", defaults.patch_size))
    vision = vit_config(checkpoint, "model.vision_tower.vision_tower.", image_size, patch_size, vit_heads)
    has_seg = any(k.startswith("model.seg_module.") for k in checkpoint.state)
    return LaMedConfig(
        vision_config=vision,
        text_config=llm_config(checkpoint),
        projector_config=dataclasses.asdict(projector_config(checkpoint)),
        seg_config=seg_config(checkpoint, vision, decoder_heads) if has_seg else None,
        **token_id_fields(token_ids),
        chat_template=False,
        model_max_length=M3D_MAX_LENGTH,
        llm_name=checkpoint.source,
    )


def convert_m3d_lamed(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vit_heads: int = 12,
    decoder_heads: int = 8,
    dtype: torch.dtype | None = None,
) -> ConversionReport:
    """Convert M3D-LaMed (Hub id or folder with ``config.json``, weights, tokenizer) into the LaMed folder
    ``out_dir`` (``load_lamed``, ``m3d-lite infer --model``), mask decoder included when the checkpoint has
    one. ``vit_heads`` (both ViTs) and ``decoder_heads`` default to M3D's 12 and 8. ``dtype`` casts the
    weights (default: as stored, float32 for the releases: ~16 GB for Phi-3-4B, ~28 GB for Llama-2-7B).
    """
    checkpoint = read_checkpoint(src, dtype)
    if not checkpoint.config:
        raise FileNotFoundError(
            f"{checkpoint.source}: no config.json beside the weights (an M3D-LaMed folder has one)"
        )
    state, mapped, dropped = rename(checkpoint, LAMED_RULES, LAMED_DROPS, "M3D-LaMed")
    tokenizer = source_tokenizer(checkpoint, llm_config(checkpoint))
    if tokenizer is None:
        raise FileNotFoundError(
            f"{checkpoint.folder}: no tokenizer (tokenizer_config.json) beside the weights"
        )
    config = lamed_config(checkpoint, m3d_token_ids(checkpoint, tokenizer), vit_heads, decoder_heads)
    tokenizer.model_max_length = config.model_max_length
    with torch.device("meta"):
        model = LaMedForCausalLM(config)
    load_into(model, state, mapped, checkpoint.source)
    if (checkpoint.folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
    else:
        model.generation_config = GenerationConfig.from_model_config(config.text_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    report = ConversionReport("M3D-LaMed", checkpoint.source, os.fspath(out_dir), mapped, dropped)
    with atomic_dir(out_dir) as tmp:
        save_lamed(model, tokenizer, tmp)
        write_report(tmp, report)
    return report
