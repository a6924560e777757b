"""Converters from the official M3D checkpoints, on scaled-down synthetic ones.

Each synthetic checkpoint has the official key names and shape rules (M3D_STATE_DICT.md; the LLM and BERT
parts are transformers' own classes, whose keys M3D's checkpoints carry) with random values, written as
safetensors shards or as a ``.bin``. Checked: every official key is mapped or dropped with a reason, and the
converted model gives the outputs of parts built directly from the same tensors; unknown, missing and
misshapen tensors and unsafe pickles are refused with errors that name them. At paper scale, on the meta
device, the same layout has M3D_STATE_DICT.md's tensor and parameter counts and fits our paper-scale models.
The other way, our models written in that layout have its keys and shapes and convert back to themselves.
"""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel, Qwen2Config

from m3d_lite.cli import main
from m3d_lite.models import encode_prompts, load_clip, load_lamed, load_vision_encoder
from m3d_lite.models.clip import M3DClipModel, build_clip
from m3d_lite.models.lamed import LaMedConfig, LaMedForCausalLM, build_lamed
from m3d_lite.models.official import (
    CLIP_DROPS,
    CLIP_RULES,
    LAMED_DROPS,
    LAMED_RULES,
    clip_config,
    convert_m3d_clip,
    convert_m3d_lamed,
    lamed_config,
)
from m3d_lite.models.official_checkpoint import Checkpoint, load_into, rename, vit_config
from m3d_lite.models.official_export import (
    invert_rule,
    official_lamed_config,
    official_lamed_state,
    save_official_clip,
    save_official_lamed,
)
from m3d_lite.models.pretrained import PretrainedNotFoundError, load_text_tokenizer
from m3d_lite.models.projector import SpatialPoolingProjector
from m3d_lite.models.seg_pathway import seg_projector
from m3d_lite.models.segmentation import SegConfig, SegModule
from m3d_lite.models.tokenizer import BOX_END, BOX_START, IMAGE_TOKEN, SEG_TOKEN
from m3d_lite.models.vision import VisionConfig, ViT3D, own_fields
from m3d_lite.plan import stage_model


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The symbols of M3D_STATE_DICT.md: image and patch size, the ViT's width E (= mm_hidden_size = SegVol's
    width), MLP width M, depth and heads, the LLM's sizes, and the mask decoder's MLP width."""

    image: tuple[int, int, int]
    patch: tuple[int, int, int]
    width: int
    mlp: int
    layers: int
    heads: int
    llm: dict
    decoder_mlp: int

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.image, self.patch, strict=True))

    def vision(self) -> VisionConfig:
        return VisionConfig(
            image_size=self.image,
            patch_size=self.patch,
            hidden_size=self.width,
            mlp_dim=self.mlp,
            num_layers=self.layers,
            num_heads=self.heads,
        )

    def seg(self) -> SegConfig:
        return SegConfig(
            image_size=self.image,
            patch_size=self.patch,
            hidden_size=self.width,
            mlp_dim=self.mlp,
            num_layers=self.layers,
            num_heads=self.heads,
            decoder_mlp_dim=self.decoder_mlp,
        )


# grid 2 x 4 x 4 = 32 patch tokens, pooled to 4 image tokens
TINY = Sizes(
    image=(8, 32, 32),
    patch=(4, 8, 8),
    width=64,
    mlp=128,
    layers=2,
    heads=4,
    llm=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    decoder_mlp=96,
)
CI = Sizes(  # our ci preset (m3d_lite/configs/ci.yaml) as M3D_STATE_DICT.md's symbols
    image=(32, 64, 64),
    patch=(4, 8, 8),
    width=64,
    mlp=256,
    layers=2,
    heads=4,
    llm=dict(hidden_size=64),
    decoder_mlp=128,
)
PAPER = Sizes(  # M3D-LaMed-Phi-3-4B
    image=(32, 256, 256),
    patch=(4, 16, 16),
    width=768,
    mlp=3072,
    layers=12,
    heads=12,
    llm=dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    decoder_mlp=2048,
)
SEG_DROPPED = (  # SegVol parts M3D never uses (SegModule's docstring)
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.mask_downscaling.",
    "mask_decoder.iou_prediction_head.",
)
LLM_CONFIGS = {  # the releases' config.json keys (transformers 4.x) beyond the sizes
    "lamed_phi3": dict(
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        original_max_position_embeddings=4096,
        sliding_window=2047,
    ),
    "lamed_llama": dict(pretraining_tp=1),
}
LLM_COMMON = dict(
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    hidden_act="silu",
    initializer_range=0.02,
    max_position_embeddings=4096,
    rms_norm_eps=1e-05,
    rope_scaling=None,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    torch_dtype="float32",
    use_cache=False,
)


def linear(out_dim: int, in_dim: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {"weight": (out_dim, in_dim), **({"bias": (out_dim,)} if bias else {})}


def norm(dim: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (dim,), "bias": (dim,)}


def prefixed(prefix: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{k}": v for k, v in shapes.items()}


def vit_shapes(s: Sizes, cls_token: bool = True) -> dict[str, tuple[int, ...]]:
    """M3D's (MONAI's) ViT: pretrained_ViT.bin's keys."""
    e = s.width
    shapes = {"cls_token": (1, 1, e)} if cls_token else {}
    shapes["patch_embedding.position_embeddings"] = (1, math.prod(s.grid), e)
    shapes |= prefixed("patch_embedding.patch_embeddings.1.", linear(e, math.prod(s.patch)))
    for i in range(s.layers):
        block = {
            **prefixed("mlp.linear1.", linear(s.mlp, e)),
            **prefixed("mlp.linear2.", linear(e, s.mlp)),
            **prefixed("norm1.", norm(e)),
            **prefixed("attn.out_proj.", linear(e, e)),
            **prefixed("attn.qkv.", linear(3 * e, e, bias=False)),
            **prefixed("norm2.", norm(e)),
        }
        shapes |= prefixed(f"blocks.{i}.", block)
    return shapes | prefixed("norm.", norm(e))


def attention_shapes(e: int, inner: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        shapes |= prefixed(f"{name}.", linear(inner, e))
    return shapes | prefixed("out_proj.", linear(e, inner))


def segvol_shapes(s: Sizes) -> dict[str, tuple[int, ...]]:
    """SegVol as M3D builds it (M3D_STATE_DICT.md, 'SegVol module')."""
    e = s.width
    shapes = prefixed("image_encoder.", vit_shapes(s, cls_token=False))
    prompt = {
        "pe_layer.positional_encoding_gaussian_matrix": (3, e // 2),
        **{f"point_embeddings.{i}.weight": (1, e) for i in range(4)},
        "not_a_point_embed.weight": (1, e),
        "no_mask_embed.weight": (1, e),
        "mask_downscaling.0.weight": (4, 1, 2, 2),
        "mask_downscaling.0.bias": (4,),
        **prefixed("mask_downscaling.1.", norm(4)),
        "mask_downscaling.3.weight": (16, 4, 2, 2),
        "mask_downscaling.3.bias": (16,),
        **prefixed("mask_downscaling.4.", norm(16)),
        "mask_downscaling.6.weight": (e, 16, 1, 1),
        "mask_downscaling.6.bias": (e,),
    }
    shapes |= prefixed("prompt_encoder.", prompt)
    decoder = {}
    for i in range(2):
        layer = {
            **prefixed("self_attn.", attention_shapes(e, e)),
            **prefixed("cross_attn_token_to_image.", attention_shapes(e, e // 2)),
            **prefixed("cross_attn_image_to_token.", attention_shapes(e, e // 2)),
            **{k: v for n in range(1, 5) for k, v in prefixed(f"norm{n}.", norm(e)).items()},
            **prefixed("mlp.lin1.", linear(s.decoder_mlp, e)),
            **prefixed("mlp.lin2.", linear(e, s.decoder_mlp)),
        }
        decoder |= prefixed(f"transformer.layers.{i}.", layer)
    decoder |= prefixed("transformer.final_attn_token_to_image.", attention_shapes(e, e // 2))
    decoder |= prefixed("transformer.norm_final_attn.", norm(e))
    decoder |= {"iou_token.weight": (1, e), "mask_tokens.weight": (4, e)}
    upscaled = (e // 4, *(2 * g for g in s.grid))
    decoder |= {
        "output_upscaling.0.weight": (e, e // 4, 2, 2, 2),
        "output_upscaling.0.bias": (e // 4,),
        "output_upscaling.1.weight": upscaled,
        "output_upscaling.1.bias": upscaled,
        "output_upscaling.3.weight": (e // 4, e // 8, 2, 2, 2),
        "output_upscaling.3.bias": (e // 8,),
    }
    for k in range(4):
        for j, (out_dim, in_dim) in enumerate([(e, e), (e, e), (e // 8, e)]):
            decoder |= prefixed(f"output_hypernetworks_mlps.{k}.layers.{j}.", linear(out_dim, in_dim))
    for j, (out_dim, in_dim) in enumerate([(256, e), (256, 256), (4, 256)]):
        decoder |= prefixed(f"iou_prediction_head.layers.{j}.", linear(out_dim, in_dim))
    decoder |= prefixed("txt_align_upscaled_embedding.", linear(e // 8, e))
    return shapes | prefixed("mask_decoder.", decoder)


def lamed_shapes(s: Sizes, seg: bool) -> dict[str, tuple[int, ...]]:
    """M3D-LaMed's tensors other than the LLM's (those are transformers' Phi-3 / Llama keys)."""
    h = s.llm["hidden_size"]
    shapes = prefixed("model.vision_tower.vision_tower.", vit_shapes(s))
    shapes |= prefixed("model.mm_projector.projector.0.", linear(h, s.width))
    shapes |= prefixed("model.mm_projector.projector.2.", linear(h, h))
    if seg:
        shapes |= prefixed("model.seg_projector.0.", linear(h, h))
        shapes |= prefixed("model.seg_projector.2.", linear(s.width, h))
        shapes |= prefixed("model.seg_module.", segvol_shapes(s))
    return shapes


def clip_shapes(s: Sizes) -> dict[str, tuple[int, ...]]:
    """M3D-CLIP's tensors other than BERT's (``language_encoder.*``, transformers' BertModel keys)."""
    shapes = {"logit_scale": (), **prefixed("vision_encoder.", vit_shapes(s))}
    shapes |= prefixed("mm_vision_proj.", linear(s.width, s.width))
    return shapes | prefixed("mm_language_proj.", linear(s.width, s.width))


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=generator) for k, s in shapes.items()}


def strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def llm_config(s: Sizes, model_type: str, vocab_size: int):
    base = {"lamed_phi3": "phi3", "lamed_llama": "llama"}[model_type]
    return AutoConfig.for_model(base, **LLM_COMMON, **LLM_CONFIGS[model_type], **s.llm, vocab_size=vocab_size)


def official_config(s: Sizes, model_type: str, vocab_size: int, seg: bool, seg_token_id: int) -> dict:
    """config.json of an M3D-LaMed release: the LLM's config (4.x keys) plus M3D's settings."""
    return {
        "architectures": [f"Lamed{'Phi3' if 'phi3' in model_type else 'Llama'}ForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_m3d_lamed.LamedPhi3ForCausalLM"},
        "model_type": model_type,
        "transformers_version": "4.41.2",
        **LLM_COMMON,
        **LLM_CONFIGS[model_type],
        **s.llm,
        "vocab_size": vocab_size,
        "image_channel": 1,
        "image_size": list(s.image),
        "patch_size": list(s.patch),
        "vision_tower": "vit3d",
        "vision_select_layer": -1,
        "vision_select_feature": "patch",
        "mm_hidden_size": s.width,
        "mm_projector_type": "spp",
        "proj_layer_type": "mlp",
        "proj_layer_num": 2,
        "proj_pooling_type": "spatial",
        "proj_pooling_size": 2,
        "segmentation_module": "segvol" if seg else None,
        "seg_token_id": seg_token_id,
    }


def official_lamed(tokenizer, model_type: str, seg: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A shrunk M3D-LaMed on ``tokenizer``: its state dict and its config.json."""
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(llm_config(TINY, model_type, len(tokenizer)))
    state = {**llm.state_dict(), **random_state(lamed_shapes(TINY, seg), seed=1)}
    seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    return state, official_config(TINY, model_type, len(tokenizer), seg, seg_token_id)


def write_weights(state: dict[str, torch.Tensor], folder: Path, fmt: str) -> None:
    """As the releases: two safetensors shards with their index, or one pytorch_model.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return
    keys = sorted(state)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(folder / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_lamed(folder: Path, tokenizer, state: dict, config: dict, fmt: str = "safetensors") -> Path:
    write_weights(state, folder, fmt)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder


def images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, *TINY.image, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    ("model_type", "seg", "fmt"), [("lamed_phi3", True, "safetensors"), ("lamed_llama", False, "bin")]
)
def test_lamed_conversion_covers_every_key_and_matches_the_parts(tokenizer, tmp_path, model_type, seg, fmt):
    state, config = official_lamed(tokenizer, model_type, seg)
    source = write_lamed(tmp_path / "official", tokenizer, state, config, fmt)
    report = convert_m3d_lamed(source, tmp_path / "converted", vit_heads=TINY.heads)

    assert set(report.mapped) | set(report.dropped) == set(state)
    assert not set(report.mapped) & set(report.dropped)
    assert all(k.removeprefix("model.seg_module.").startswith(SEG_DROPPED) for k in report.dropped)
    assert len(report.dropped) == (4 + 1 + 10 + 6 if seg else 0)
    saved = json.loads((tmp_path / "converted" / "conversion.json").read_text())
    assert saved["mapped"] == report.mapped and saved["dropped"] == report.dropped

    model, converted_tokenizer = load_lamed(tmp_path / "converted")
    model.eval()
    assert model.config.chat_template is False  # M3D's raw prompt format
    assert model.config.seg_token_id == config["seg_token_id"]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (model.seg_module is not None) == seg
    assert len(converted_tokenizer) == len(tokenizer)

    # the parts built directly from the official tensors
    llm = AutoModelForCausalLM.from_config(llm_config(TINY, model_type, len(tokenizer))).eval()
    llm.load_state_dict({k: state[k] for k in llm.state_dict()})
    vit = ViT3D(TINY.vision()).eval()
    vit.load_state_dict(strip(state, "model.vision_tower.vision_tower."))
    hidden = TINY.llm["hidden_size"]
    projector = SpatialPoolingProjector(TINY.width, hidden, TINY.grid)
    projector.load_state_dict(strip(state, "model.mm_projector."))

    questions = ["Where is the liver?", "Is there a cyst in the left kidney?"]
    prompts = encode_prompts(tokenizer, questions, model.config.proj_out_num, chat_template=False)
    volumes = images()
    with torch.no_grad():
        got = model(images=volumes, **prompts).logits
        embeds = llm.get_input_embeddings()(prompts["input_ids"]).clone()
        is_image = prompts["input_ids"] == model.config.image_token_id
        embeds[is_image] = projector(vit(volumes)[:, 1:]).flatten(0, 1)
        expected = llm(inputs_embeds=embeds, attention_mask=prompts["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    if seg:
        decoder = SegModule(TINY.seg()).eval()
        segvol = strip(state, "model.seg_module.")
        decoder.load_state_dict(
            {
                re.sub(r"mlp\.lin(\d)", r"mlp.linear\1", k): v
                for k, v in segvol.items()
                if not k.startswith(SEG_DROPPED)
            }
        )
        projection = seg_projector(hidden, TINY.width).eval()
        projection.load_state_dict(strip(state, "model.seg_projector."))
        seg_states = torch.randn(2, hidden, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = model.seg_module(volumes, model.seg_projector(seg_states))
            expected = decoder(volumes, projection(seg_states))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def official_clip(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict, BertConfig]:
    """A shrunk M3D-CLIP (state dict, config.json) whose text tower is a tiny BERT saved in a local folder."""
    bert_config = BertConfig(
        hidden_size=TINY.width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=30522,
    )
    bert_config.save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    bert = BertModel(bert_config)  # with its pooler, as M3D's BertModel.from_pretrained
    state = {
        **random_state(clip_shapes(TINY), seed=1),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        **{f"language_encoder.{k}": v for k, v in bert.state_dict().items()},
    }
    config = {
        "model_type": "m3d_clip",
        "architectures": ["M3DCLIP"],
        "language_model_name_or_path": str(tmp_path / "bert"),
        "in_channels": 1,
        "img_size": list(TINY.image),
        "patch_size": list(TINY.patch),
        "hidden_size": TINY.width,
        "mlp_dim": TINY.mlp,
        "num_layers": TINY.layers,
        "num_heads": TINY.heads,
        "pos_embed": "perceptron",
        "max_text_len": 128,
        "vocab_size": 30522,
    }
    return state, config, bert_config


def test_clip_conversion_covers_every_key_and_matches_the_parts(tmp_path):
    state, config, bert_config = official_clip(tmp_path)
    source = tmp_path / "official"
    write_weights(state, source, "safetensors")
    (source / "config.json").write_text(json.dumps(config))
    load_text_tokenizer("tiny-bert").save_pretrained(source)  # MiniLM's: bert-base-uncased's vocabulary
    report = convert_m3d_clip(source, tmp_path / "converted")

    assert set(report.mapped) | set(report.dropped) == set(state)
    assert sorted(report.dropped) == [
        "language_encoder.pooler.dense.bias",
        "language_encoder.pooler.dense.weight",
    ]
    model, tokenizer = load_clip(tmp_path / "converted" / "model")
    model.eval()
    assert (model.config.temperature, model.config.text_pooling) == ("m3d", "cls")

    vit = ViT3D(TINY.vision()).eval()
    vit.load_state_dict(strip(state, "vision_encoder."))
    bert = BertModel(bert_config).eval()
    bert.load_state_dict(strip(state, "language_encoder."))
    vision_proj, language_proj = nn.Linear(TINY.width, TINY.width), nn.Linear(TINY.width, TINY.width)
    vision_proj.load_state_dict(strip(state, "mm_vision_proj."))
    language_proj.load_state_dict(strip(state, "mm_language_proj."))
    text = tokenizer(["Liver cyst.", "No focal lesion in the pancreas."], padding=True, return_tensors="pt")
    volumes = images()
    with torch.no_grad():
        got = model(volumes, text.input_ids, text.attention_mask).logits_per_image
        image_embeds = F.normalize(vision_proj(vit(volumes)[:, 0]), dim=-1)
        text_states = bert(text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        text_embeds = F.normalize(language_proj(text_states[:, 0]), dim=-1)
        expected = state["logit_scale"] * image_embeds @ text_embeds.T  # M3D: the raw scale, no exp
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        vision_encoder = load_vision_encoder(tmp_path / "converted" / "vision_encoder")
        torch.testing.assert_close(vision_encoder(volumes), vit(volumes), rtol=0, atol=0)


def test_cli_converts_pretrained_vit_bin(tmp_path):
    state = random_state(vit_shapes(TINY), seed=4)
    torch.save(state, tmp_path / "pretrained_ViT.bin")
    geometry = ["--image-size", *map(str, TINY.image), "--patch-size", *map(str, TINY.patch)]
    out = tmp_path / "converted"
    argv = ["convert", "clip", str(tmp_path / "pretrained_ViT.bin"), "--out", str(out), *geometry]
    assert main([*argv, "--num-heads", str(TINY.heads)]) == 0

    report = json.loads((out / "conversion.json").read_text())
    assert set(report["mapped"]) == set(state) and report["dropped"] == {}
    vit = ViT3D(TINY.vision()).eval()
    vit.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(load_vision_encoder(out / "vision_encoder")(images()), vit(images()))


def meta_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_the_paper_scale_layout_fits_our_paper_scale_models():
    """On the meta device (no memory): the layout has M3D_STATE_DICT.md's totals, and the converters'
    rules, derived configs and fit check take it whole, into our paper-scale LaMed and CLIP."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llm_config(PAPER, "lamed_phi3", 32015))
        bert = BertModel(BertConfig())  # bert-base-uncased
    lamed = {**llm.state_dict(), **meta_state(lamed_shapes(PAPER, seg=True))}
    clip = {
        **meta_state(clip_shapes(PAPER)),
        **{f"language_encoder.{k}": v for k, v in bert.state_dict().items()},
    }
    assert (len(lamed), sum(t.numel() for t in lamed.values())) == (617, 4_049_101_904)
    assert (len(clip), sum(t.numel() for t in clip.values())) == (342, 198_052_609)

    checkpoint = Checkpoint(
        "paper", Path("."), lamed, official_config(PAPER, "lamed_phi3", 32015, True, 32014)
    )
    state, mapped, dropped = rename(checkpoint, LAMED_RULES, LAMED_DROPS, "M3D-LaMed")
    assert (len(mapped), len(dropped)) == (596, 21)
    token_ids = dict(zip((IMAGE_TOKEN, BOX_START, BOX_END, SEG_TOKEN), range(32011, 32015), strict=True))
    config = lamed_config(checkpoint, token_ids, vit_heads=12, decoder_heads=8)
    assert (config.proj_out_num, config.text_config.vocab_size) == (256, 32015)
    with torch.device("meta"):
        model = LaMedForCausalLM(config)
    load_into(model, state, mapped, "paper")  # raises on any key missing, left over or misshapen

    checkpoint = Checkpoint("paper", Path("."), clip, {})
    state, mapped, dropped = rename(checkpoint, CLIP_RULES, CLIP_DROPS, "M3D-CLIP")
    vision = vit_config(checkpoint, "vision_encoder.", PAPER.image, PAPER.patch, PAPER.heads)
    with torch.device("meta"):
        model = M3DClipModel(clip_config(checkpoint, vision))
    load_into(model, state, mapped, "paper")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.update({"model.foo.weight": torch.zeros(1)}), "model.foo.weight"),
        (
            lambda s: s.update({"model.vision_tower.vision_tower.head.weight": torch.zeros(1)}),
            "no place for model.vision_tower.vision_tower.head.weight",
        ),
        (lambda s: s.pop("model.norm.weight"), "missing: language_model.model.norm.weight"),
        (
            lambda s: s.update({"model.mm_projector.projector.2.bias": torch.zeros(3)}),
            "model.mm_projector.projector.2.bias: shape [3], but mm_projector.projector.2.bias is [64]",
        ),
    ],
    ids=["unknown", "no-place", "missing", "shape"],
)
def test_lamed_keys_that_do_not_fit_are_named(tokenizer, tmp_path, damage, message):
    state, config = official_lamed(tokenizer, "lamed_llama", seg=False)
    damage(state)
    source = write_lamed(tmp_path / "official", tokenizer, state, config)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_m3d_lamed(source, tmp_path / "converted", vit_heads=TINY.heads)
    assert not (tmp_path / "converted").exists()  # nothing half-written


class Payload:
    """An object that a checkpoint has no business holding."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pretrained_ViT.bin"
    torch.save({**random_state(vit_shapes(TINY), seed=5), "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"pretrained_ViT.bin: refused to unpickle.*weights_only=True"):
        convert_m3d_clip(path, tmp_path / "converted")


def test_wrong_geometry_and_missing_sources_are_explained(tmp_path):
    torch.save(random_state(vit_shapes(TINY), seed=6), tmp_path / "pretrained_ViT.bin")
    with pytest.raises(ValueError, match=r"32 patch tokens.*give the image_size and patch_size"):
        convert_m3d_clip(tmp_path / "pretrained_ViT.bin", tmp_path / "converted", num_heads=TINY.heads)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_m3d_clip(tmp_path / "nowhere", tmp_path / "converted")
    # offline in the tests (conftest); online, no such repository
    with pytest.raises(PretrainedNotFoundError, match="hf download GoodBaiBai88/M3D-CLIP-missing"):
        convert_m3d_clip("GoodBaiBai88/M3D-CLIP-missing", tmp_path / "converted")


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi3"])  # tied and untied embeddings
def test_our_lamed_in_m3d_layout_converts_back_to_the_same_model(tmp_path, llm):
    torch.manual_seed(0)
    model, tokenizer = build_lamed("ci", llm=llm, segmentation=True)
    model.eval()
    save_official_lamed(model, tokenizer, tmp_path / "official")

    saved = load_file(tmp_path / "official" / "model.safetensors")
    assert shapes_of(saved) == shapes_of(model.language_model.state_dict()) | lamed_shapes(CI, seg=True)
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["model_type"] == {"tiny-llama": "lamed_llama", "tiny-phi3": "lamed_phi3"}[llm]
    assert config["seg_token_id"] == model.config.seg_token_id

    seg = model.config.seg_config
    report = convert_m3d_lamed(
        tmp_path / "official", tmp_path / "converted", vit_heads=CI.heads, decoder_heads=seg.decoder_heads
    )
    assert set(report.mapped.values()) == set(model.state_dict())
    assert len(report.dropped) == 21  # the zero placeholders of SegVol's unused parts
    converted, converted_tokenizer = load_lamed(tmp_path / "converted")
    converted.eval()
    ours, theirs = model.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        torch.testing.assert_close(theirs[key], tensor, rtol=0, atol=0, msg=key)
    for field in own_fields(SegConfig):  # sizes from the tensors, heads as given
        assert getattr(converted.config.seg_config, field) == getattr(seg, field), field

    questions = ["Where is the liver?", "Is there a cyst in the left kidney?"]
    prompts = encode_prompts(converted_tokenizer, questions, model.config.proj_out_num, chat_template=False)
    volumes = torch.rand(2, 1, *CI.image, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = (m(images=volumes, **prompts).logits for m in (model, converted))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_seg_state_norm_is_folded_into_the_projector_in_m3d_layout(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_lamed("ci", llm="tiny-llama")
    model.add_seg_module(SegConfig.from_scale("ci"), state_norm=True)
    hidden = model.config.text_config.hidden_size
    states = torch.randn(40, hidden) * torch.rand(hidden) * 20 + torch.randn(hidden) * 50
    model.seg_state_norm.fit(states)
    save_official_lamed(model.eval(), tokenizer, tmp_path / "official")
    seg = model.config.seg_config
    convert_m3d_lamed(
        tmp_path / "official", tmp_path / "converted", vit_heads=CI.heads, decoder_heads=seg.decoder_heads
    )
    converted, _ = load_lamed(tmp_path / "converted")
    assert converted.seg_state_norm is None  # M3D's layout has no standardiser: it lives in the projector
    with torch.no_grad():
        expected, got = model.seg_prompts(states), converted.eval().seg_prompts(states)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(converted.seg_projector[0].weight, model.seg_projector[0].weight)


def test_our_clip_in_m3d_layout_converts_back_to_the_same_model(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_clip("ci", temperature="m3d", text_pooling="cls")
    model.eval()
    save_official_clip(model, tokenizer, tmp_path / "official")

    saved = load_file(tmp_path / "official" / "model.safetensors")
    bert = BertModel(model.text_encoder.config)  # with the pooler that M3D-CLIP's BERT carries
    release = clip_shapes(CI) | {f"language_encoder.{k}": v for k, v in shapes_of(bert.state_dict()).items()}
    assert shapes_of(saved) == release

    report = convert_m3d_clip(tmp_path / "official", tmp_path / "converted")
    assert set(report.mapped.values()) == set(model.state_dict()) and len(report.dropped) == 2
    converted, converted_tokenizer = load_clip(tmp_path / "converted" / "model")
    converted.eval()
    ours, theirs = model.state_dict(), converted.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        torch.testing.assert_close(theirs[key], tensor, rtol=0, atol=0, msg=key)
    text = converted_tokenizer(["Liver cyst.", "No focal lesion."], padding=True, return_tensors="pt")
    volumes = torch.rand(2, 1, *CI.image, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = (
            m(volumes, text.input_ids, text.attention_mask).logits_per_image for m in (model, converted)
        )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_our_paper_scale_lamed_in_m3d_layout_has_the_releases_keys():
    """On the meta device: the keys of M3D-LaMed-Phi-3-4B; the shapes too, but for the vocabulary (Phi-3's
    config has 32064 rows, which we keep; M3D shrank them to its tokenizer's 32015)."""
    with torch.device("meta"):
        model = stage_model("align", "paper")
        model.add_seg_module(SegConfig.from_scale("paper"))
        llm = AutoModelForCausalLM.from_config(llm_config(PAPER, "lamed_phi3", 32015))
    release = shapes_of(llm.state_dict()) | lamed_shapes(PAPER, seg=True)
    ours = shapes_of(official_lamed_state(model))
    assert ours.keys() == release.keys() and len(ours) == 617
    assert {k for k in ours if ours[k] != release[k]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert ours["lm_head.weight"] == (32064, 3072)


def test_what_m3d_layout_cannot_record_is_refused(tmp_path):
    model, tokenizer = build_clip("ci")  # standard temperature, mean pooling
    with pytest.raises(
        ValueError, match="temperature 'm3d' and text pooling 'cls'; this model has 'standard'"
    ):
        save_official_clip(model, tokenizer, tmp_path / "clip")
    assert not (tmp_path / "clip").exists()

    qwen = LaMedConfig(text_config=Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ValueError, match="holds a phi3 or llama LLM; this model's is 'qwen2'"):
        official_lamed_config(qwen)
    other_heads = LaMedConfig(seg_config=SegConfig(num_heads=8))
    with pytest.raises(ValueError, match=r"seg ViT the vision tower's .* this seg module has"):
        official_lamed_config(other_heads)
    with pytest.raises(ValueError, match="cannot be inverted"):
        invert_rule(r"(.+\.)?position_ids", "position_ids")
