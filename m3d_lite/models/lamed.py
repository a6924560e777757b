"""LaMed: a 3D vision tower and a projector in front of ANY causal LM, as one Hugging Face model.

Composition, the way transformers builds its own vision-language models (Llava): ``LaMedConfig`` holds
a vision config, a text config (any ``model_type``: llama, phi3, ...) and the projector settings;
``LaMedForCausalLM`` holds ``vision_tower`` (M3D's ViT without CLS), ``mm_projector`` and
``language_model = AutoModelForCausalLM.from_config(text_config)``. M3D instead subclasses every LLM
(``LamedPhi3ForCausalLM``, ``LamedLlamaForCausalLM``: one 300-line copy per LLM).

How an image enters the LLM: the prompt holds ``proj_out_num`` ``<im_patch>`` tokens; their embeddings
are replaced, row by row, by the projector's image tokens, found by the ``<im_patch>`` mask. (M3D
splices by position, assuming one BOS then the image tokens; a prompt without BOS or with a chat
template would silently misplace the image there.) The LLM then runs on ``inputs_embeds``.

``generate`` hands the spliced embeddings to the LLM's own ``generate``, so every decoding option of
transformers works; like M3D's, it returns only the NEW tokens. Batches must be LEFT-padded
(``tokenizer.encode_prompts``). Registered with ``AutoConfig`` ("lamed") and ``AutoModelForCausalLM``:
after ``import m3d_lite.models``, ``AutoModelForCausalLM.from_pretrained(folder)`` reads a saved model
without ``trust_remote_code``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from m3d_lite.config import section_config
from m3d_lite.models.pretrained import load_llm, load_llm_tokenizer
from m3d_lite.models.projector import ProjectorConfig, build_projector
from m3d_lite.models.seg_pathway import (
    StateStandardizer,
    generated_seg_states,
    seg_projector,
    seg_token_states,
)
from m3d_lite.models.segmentation import SegConfig, SegModule, seg_losses
from m3d_lite.models.tokenizer import (
    BOX_END,
    BOX_START,
    IMAGE_TOKEN,
    SEG_TOKEN,
    add_m3d_tokens,
    resize_with_mean_init,
)
from m3d_lite.models.vision import VisionConfig, VisionTower, own_fields


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Section ``llm`` of a preset: which LLM, the longest sample in tokens (image tokens included; M3D:
    512 with 256 image tokens), and whether prompts use the LLM's chat template (see models.tokenizer)."""

    name: str
    max_length: int = 512
    chat_template: bool = True


@strict
class LaMedConfig(PreTrainedConfig):
    """Vision tower (``vision_config``), LLM (``text_config``, any causal LM's config), projector
    (``projector_config``, a :class:`ProjectorConfig` as dict), the mask decoder (``seg_config``, a
    :class:`~m3d_lite.models.segmentation.SegConfig`; None: a model without segmentation), the ids of M3D's
    tokens, the prompt format (``chat_template``) and ``model_max_length``. Defaults are M3D's paper
    setting (ViT-B/3D + Phi-3-mini). ``seg_state_norm=True`` (added; M3D has none) standardises the
    ``[SEG]`` states before ``seg_projector`` (``seg_pathway.StateStandardizer``).
    """

    model_type = "lamed"
    sub_configs_defaults = {
        "vision_config": VisionConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
        "seg_config": SubConfigSpec(config_class=SegConfig, optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_config: dict | None = None
    seg_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    box_start_token_id: int | None = None
    box_end_token_id: int | None = None
    seg_token_id: int | None = None
    chat_template: bool = True
    model_max_length: int = 512
    llm_name: str | None = None
    seg_state_norm: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        self.projector_config = dataclasses.asdict(ProjectorConfig(**(self.projector_config or {})))
        super().__post_init__(**kwargs)

    @property
    def projector(self) -> ProjectorConfig:
        """``projector_config`` as the dataclass that builds the projector."""
        return ProjectorConfig(**self.projector_config)

    @property
    def proj_out_num(self) -> int:
        """Image tokens per volume: derived from the ViT's patch grid and the projector."""
        return self.projector.out_num(self.vision_config.grid)


@dataclasses.dataclass
class LaMedOutput(CausalLMOutputWithPast):
    """The LLM's output, plus, when ``seg_masks`` were given: ``seg_logits`` (rows with a mask and a
    ``[SEG]``, R x 1 x D x H x W), the mask prompts they were decoded from (``seg_prompts``, R x prompt
    width), and the parts of ``loss`` = ``lm_loss`` + ``dice_loss`` + ``bce_loss``."""

    seg_logits: torch.Tensor | None = None
    seg_prompts: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None
    bce_loss: torch.Tensor | None = None


class LaMedForCausalLM(PreTrainedModel, GenerationMixin):
    """``vision_tower`` -> ``mm_projector`` -> image tokens spliced into ``language_model``'s input; with a
    ``seg_config``, also (``seg_state_norm`` ->) ``seg_projector`` -> ``seg_module``: the ``[SEG]`` state
    becomes a mask.

    ``vision_tower`` / ``language_model`` given to the constructor (pretrained) are used as they are;
    missing ones are built from the config (random), as ``from_pretrained`` does before loading weights.
    """

    config_class = LaMedConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        config: LaMedConfig,
        vision_tower: VisionTower | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        self.vision_tower = VisionTower(config.vision_config) if vision_tower is None else vision_tower
        self.mm_projector = build_projector(
            config.projector,
            in_dim=config.vision_config.hidden_size,
            out_dim=config.text_config.hidden_size,
            grid=config.vision_config.grid,
        )
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:  # a LaMedConfig built around its config reset its attention choice to None (transformers 5)
            language_model.set_attn_implementation(config._attn_implementation)
        self.language_model = language_model
        self.seg_state_norm = self.seg_projector = self.seg_module = None
        if config.seg_config is not None:
            self.build_seg_parts(config.seg_config)
        self.post_init()

    def build_seg_parts(self, seg_config: SegConfig) -> None:
        """Fresh ``seg_projector`` and ``seg_module`` for ``seg_config`` (and ``seg_state_norm``, the
        identity until fitted, when the config asks for it)."""
        hidden = self.config.text_config.hidden_size
        self.seg_state_norm = StateStandardizer(hidden) if self.config.seg_state_norm else None
        self.seg_projector = seg_projector(hidden, seg_config.embed_dim)
        self.seg_module = SegModule(seg_config)

    def add_seg_module(
        self, seg_config: SegConfig, encoder_from_vision: bool = False, state_norm: bool = False
    ) -> None:
        """Give a model built without segmentation (stage 1) a fresh mask decoder and ``[SEG]`` projector,
        on its device and in its dtype, and record ``seg_config`` so that it saves and reloads with them.
        M3D too adds its seg module at stage 2. ``encoder_from_vision=True`` starts the seg image encoder
        from the vision tower's weights (``SegModule.init_encoder_from``). ``state_norm=True`` adds
        ``seg_state_norm``; fit it with ``model.seg_state_norm.fit(model.seg_states(items))``."""
        if self.seg_module is not None:
            raise ValueError("this model already has a seg module")
        self.config.seg_config = seg_config
        self.config.seg_state_norm = state_norm
        self.build_seg_parts(seg_config)
        if encoder_from_vision:
            self.seg_module.init_encoder_from(self.vision_tower.vision_tower)
        for part in (self.seg_state_norm, self.seg_projector, self.seg_module):
            if part is not None:
                part.to(self.device, self.dtype)

    def seg_prompts(self, states: torch.Tensor) -> torch.Tensor:
        """R x H ``[SEG]`` states -> R x prompt-width mask prompts (``seg_state_norm``, ``seg_projector``)."""
        if self.seg_state_norm is not None:
            states = self.seg_state_norm(states)
        return self.seg_projector(states)

    @torch.no_grad()
    def seg_states(self, items: Iterable[dict[str, Any]], progress: bool = False) -> torch.Tensor:
        """N x H: the last-layer state that predicts ``[SEG]`` (the mean when several) in each of ``items``,
        instruct items (``images`` 1 x D x H x W, ``input_ids`` L, ``image_path``) whose answer holds a
        ``[SEG]``; run one at a time in eval mode. An item without ``[SEG]`` is an error naming its image."""
        was_training, states = self.training, []
        self.eval()
        for item in tqdm(items, desc="[SEG] states", disable=not progress):
            input_ids = item["input_ids"][None].to(self.device)
            images = item["images"][None].to(self.device, self.dtype)
            output = self(images=images, input_ids=input_ids, output_hidden_states=True)
            state, has_seg = seg_token_states(output.hidden_states[-1], input_ids, self.config.seg_token_id)
            if not has_seg.all():
                raise ValueError(f"{item['image_path']}: this item's answer holds no [SEG] token")
            states.append(state[0])
        self.train(was_training)
        return torch.stack(states)

    def _init_weights(self, module: nn.Module) -> None:
        """Keep every part's own initialisation (see ``M3DClipModel._init_weights``): MONAI's for the ViT,
        PyTorch's for the projector; the LLM is a ``PreTrainedModel`` and initialises itself. transformers
        5's default would redraw every Linear of the ViT and projector from N(0, 0.02)."""

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """Resize the LLM's embeddings; ``config.text_config`` is the LLM's config, so it follows."""
        return self.language_model.resize_token_embeddings(*args, **kwargs)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """B x 1 x D x H x W volumes -> B x proj_out_num x LLM-width image tokens."""
        dtype = next(self.mm_projector.parameters()).dtype
        return self.mm_projector(self.vision_tower(images.to(dtype)))

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of ``input_ids`` with each row's ``<im_patch>`` positions replaced by its image.

        Every row must hold exactly ``config.proj_out_num`` image tokens when ``images`` is given, and none
        when it is not; anything else is an error naming the counts.
        """
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        expected = self.config.proj_out_num if images is not None else 0
        why = "the projector's image tokens per volume" if images is not None else "no images were given"
        if images is not None and images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {input_ids.shape[0]} rows of input_ids")
        for row, count in enumerate(is_image.sum(1).tolist()):
            if count != expected:
                raise ValueError(
                    f"row {row} of input_ids holds {count} {IMAGE_TOKEN} tokens but {expected} are expected "
                    f"({why}): build prompts with num_image_tokens=model.config.proj_out_num "
                    f"({self.config.proj_out_num})"
                )
        if images is None:
            return embeds
        return splice_image_features(embeds, is_image, self.encode_images(images))

    def forward(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        seg_masks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> LaMedOutput:
        """The LLM's output on the spliced embeddings; ``loss`` when ``labels`` (-100 = ignored) are given.

        ``seg_masks`` (B x 1 x D x H x W, all-zero rows: no mask) adds M3D's segmentation loss, Dice + BCE
        of the masks decoded from the ``[SEG]`` states, on the rows that have a mask and a ``[SEG]``.
        Other keyword arguments (``cache``, ``position_ids``, ...) go to the LLM.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, images)
        segmenting = seg_masks is not None and bool(seg_masks.flatten(1).any(1).any())
        if segmenting and self.seg_module is None:
            raise ValueError("seg_masks were given, but this model has no seg module (seg_config is None)")
        if segmenting:
            kwargs["output_hidden_states"] = True
        output = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )
        output = LaMedOutput(**output)
        if not segmenting:
            return output
        states, has_seg = seg_token_states(output.hidden_states[-1], input_ids, self.config.seg_token_id)
        rows = has_seg & seg_masks.flatten(1).any(1)
        if not rows.any():
            return output
        output.seg_prompts = self.seg_prompts(states[rows])
        output.seg_logits = self.seg_module(images[rows], output.seg_prompts)
        losses = seg_losses(output.seg_logits, seg_masks[rows].to(output.seg_logits.dtype))
        output.lm_loss, output.dice_loss, output.bce_loss = output.loss, losses["dice"], losses["bce"]
        if output.loss is not None:
            output.loss = output.loss + losses["dice"] + losses["bce"]
        return output

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        seg_enable: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """New token ids (B x new) for LEFT-padded prompts; ``kwargs`` are ``generate``'s (max_new_tokens,
        do_sample, ...). Defaults: this model's ``generation_config`` (saved with it), lent to the LLM.

        ``seg_enable=True`` returns ``(new ids, seg_logits)``: B x 1 x D x H x W mask logits decoded from
        the states that generated ``[SEG]`` (the mean when several), ``-inf`` for rows without one.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.language_model.generation_config = self.generation_config
        inputs_embeds = self.embed_inputs(input_ids, images)
        if not seg_enable:
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
            )
        if self.seg_module is None:
            raise ValueError("seg_enable=True, but this model has no seg module (seg_config is None)")
        kwargs |= {"output_hidden_states": True, "return_dict_in_generate": True}
        output = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )
        states, has_seg = generated_seg_states(
            output.hidden_states, output.sequences, self.config.seg_token_id
        )
        seg_logits = torch.full(
            (len(images), 1, *images.shape[2:]), float("-inf"), dtype=states.dtype, device=states.device
        )
        if has_seg.any():
            seg_logits[has_seg] = self.seg_module(images[has_seg], self.seg_prompts(states[has_seg])).to(
                seg_logits.dtype
            )
        return output.sequences, seg_logits


def splice_image_features(
    embeds: torch.Tensor, is_image: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """B x L x E token embeddings with the positions where ``is_image`` (B x L) is True replaced, in order,
    by the rows of ``features`` (B x K x E, K = image positions per row): a new tensor, gradients flow to
    both. Position-free: the image tokens may sit anywhere (after a chat header, behind left padding)."""
    return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))


def split_overrides(overrides: dict[str, Any], sections: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """Route each override to the section that owns its key; an unknown key lists the known ones."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = set().union(*sections.values())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(f"lamed: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return {name: {k: v for k, v in overrides.items() if k in keys} for name, keys in sections.items()}


def token_id_fields(token_ids: Mapping[str, int]) -> dict[str, int]:
    """:class:`LaMedConfig`'s token-id fields from ``{token: id}`` of M3D's four tokens (what
    ``add_m3d_tokens`` returns)."""
    return {
        "image_token_id": token_ids[IMAGE_TOKEN],
        "box_start_token_id": token_ids[BOX_START],
        "box_end_token_id": token_ids[BOX_END],
        "seg_token_id": token_ids[SEG_TOKEN],
    }


def build_lamed(
    scale: str,
    vision_encoder: str | os.PathLike | None = None,
    llm: str | os.PathLike | None = None,
    segmentation: bool = False,
    **overrides: Any,
) -> tuple[LaMedForCausalLM, PreTrainedTokenizerBase]:
    """A LaMed model at ``scale`` and its tokenizer: the stage-0 ViT in folder ``vision_encoder`` (None:
    random, from the preset's ``vision`` section), a fresh projector, and the pretrained LLM ``llm`` (None:
    the preset's ``llm.name``; tiny LLMs are random: seed torch first) with M3D's tokens added; with
    ``segmentation``, a fresh mask decoder from the preset's ``segmentation`` section (stage 2 adds it
    otherwise, see :meth:`LaMedForCausalLM.add_seg_module`).

    ``overrides`` go to the section that owns the key: ``vision`` (only without ``vision_encoder``),
    ``projector`` (``pooling_size=4``) or ``llm`` (``max_length``, ``chat_template``).
    """
    sections = {
        "vision": own_fields(VisionConfig),
        "projector": {f.name for f in dataclasses.fields(ProjectorConfig)},
        "llm": {f.name for f in dataclasses.fields(LLMConfig)} - {"name"},
    }
    groups = split_overrides(overrides, sections)
    if vision_encoder is not None and groups["vision"]:
        raise ValueError(f"{sorted(groups['vision'])} set a fresh ViT's shape; {vision_encoder} has its own")
    if vision_encoder is not None:
        tower = VisionTower.from_pretrained(vision_encoder)
    else:
        tower = VisionTower(VisionConfig.from_scale(scale, **groups["vision"]))
    projector = ProjectorConfig.from_scale(scale, **groups["projector"])
    name = None if llm is None else os.fspath(llm)
    settings = section_config(LLMConfig, scale, "llm", **groups["llm"], name=name)

    language_model, tokenizer = load_llm(settings.name), load_llm_tokenizer(settings.name)
    token_ids = add_m3d_tokens(tokenizer)
    resize_with_mean_init(language_model, tokenizer)
    tokenizer.model_max_length = settings.max_length
    config = LaMedConfig(
        vision_config=tower.config,
        text_config=language_model.config,
        projector_config=dataclasses.asdict(projector),
        **token_id_fields(token_ids),
        chat_template=settings.chat_template,
        model_max_length=settings.max_length,
        llm_name=settings.name,
        seg_config=SegConfig.from_scale(scale) if segmentation else None,
    )
    model = LaMedForCausalLM(config, vision_tower=tower, language_model=language_model)
    model.generation_config = copy.deepcopy(language_model.generation_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_lamed(model: LaMedForCausalLM, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Save model and tokenizer into one self-contained folder that :func:`load_lamed` reads offline."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def load_lamed(path: str | os.PathLike, **kwargs: Any) -> tuple[LaMedForCausalLM, PreTrainedTokenizerBase]:
    """Read a folder written by :func:`save_lamed`: ``(model, tokenizer)``; ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    return LaMedForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


AutoConfig.register("lamed", LaMedConfig, exist_ok=True)
AutoModelForCausalLM.register(LaMedConfig, LaMedForCausalLM, exist_ok=True)
