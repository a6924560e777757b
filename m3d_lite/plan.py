"""Plan a training run before renting GPUs: parameters, memory per device and hours of each stage.

``plan("paper", Setup(gpus=8, gpu_mem_gib=80))`` answers, for stage 0 ``clip``, 1 ``align`` and 2
``instruct``: how many parameters, how many of them train, how much memory each device needs (weights,
gradients, optimizer states, activations, overhead), whether that fits, and how long the preset's schedule
takes.
:func:`format_plans` prints the table; ``m3d-lite plan`` is the command line.

**Counts are exact.** Each stage's model is built on PyTorch's ``meta`` device (shapes only: no memory, well
under a second for Phi-3-mini) from the preset's configs, then frozen or wrapped by the very functions its
training stage calls: :func:`~m3d_lite.train.align.freeze_for_alignment` (stage 1),
:func:`~m3d_lite.models.lora.apply_lora` and :func:`~m3d_lite.train.instruct.unfreeze_for_instruction`
(stage 2). The paper's LLMs are built from their official sizes (:data:`PAPER_LLMS`): nothing is downloaded.
"Trainable" counts every parameter with ``requires_grad``, as the optimizer sees them: in stage 1 that is
the whole embedding matrix, although its gradient mask lets only the 4 new rows move.

**Memory per device** (P parameters, T trainable, G weights of the Linear layers a gradient passes through,
N devices sharing the states; bytes):

    precision                          weights              gradients               AdamW states
    fp32 (mixed_precision "no"; CPU)   4P                   4T                      8T (m, v)
    bf16 autocast, ZeRO 0 (DDP)        4P + 2G (1)          4T, x2 with DDP (2)     8T
    bf16 DeepSpeed ZeRO-z              2P, /N at z = 3      2T, /N at z >= 2        12T/N (m, v, fp32 master)

(1) autocast keeps the bf16 copy of every weight the backward needs; (2) DDP's reducer buckets.
FSDP's FULL_SHARD shards like ZeRO-3, SHARD_GRAD_OP like ZeRO-2.

**Activations per sample**, in elements (x 2 bytes in bf16, 4 in fp32), counted from what autograd saves
for the backward and checked against ``torch.autograd.graph.saved_tensors_hooks`` on the real models
(``tests/test_plan.py``, within 3 %); s tokens, h width, m or i MLP width, a heads:

- ViT (stages 0, 2) and BERT (stage 0) blocks that train: s (8h + 2m) each; BERT's dropout adds 2 masks of
  s h; the ViT's input adds its voxels (the patch vectors). A frozen ViT (stage 1) keeps nothing.
- LLM blocks with frozen weights and a gradient passing through (stages 1, 2): s (4h + 2h_kv + 3i) each
  (norm inputs, attention q, k, v and output, SiLU input and output, up projection: a frozen Linear keeps
  no input); LoRA adds, per adapted Linear, its dropped-out input and the dropout mask. s is the preset's
  ``max_length``: m3d_lite pads a batch to its longest sample, so this is the longest batch (M3D pads every
  sample to 512).
- Attention probabilities, a s per token and block, only without SDPA's fused kernels (``sdpa=False``), or
  with attention dropout on a CPU, where PyTorch takes the explicit path (3 a s: probabilities, mask,
  output).
- Dropout masks: bool on a GPU (1 byte), float on a CPU (a whole element).
- Logits: 12 bytes x s x vocabulary at the loss's backward (fp32 log-softmax, its gradient and the logits'
  gradient; 14 when the logits are bf16): at the small scale more than the whole LLM's activations.
- Seg module (stage 2; every row assumed to hold a mask): its ViT as above, the mask decoder
  (25 + 7 x depth) N C on its N-token grid at width C (fitted to the saved tensors at two widths and two
  grids, within 3 %), and 3 x D H W for the full-size mask logits and losses.
- Gradient checkpointing keeps each block's input (s h) and one block being recomputed.

**Overhead**: :data:`GPU_CONTEXT_GIB` for the CUDA context and library workspaces, or on a CPU
:data:`CPU_BASE_GIB`, the resident size of the process with torch, transformers, MONAI and the data
loaded; plus :data:`FRAGMENTATION` of the rest (freed blocks the allocator keeps).

**Time**: a Linear of w weights on t tokens costs 2wt FLOPs forward, 2wt more to pass the gradient to its
input, 2wt more for its weight gradient when it trains: 6wt for a trained part, 4wt for a frozen part a
gradient passes through (the LLM in stages 1 and 2), 2wt for a frozen part no gradient reaches (the ViT in
stage 1). Self-attention adds 4 s^2 h per block forward, 3x that with a backward; gradient checkpointing
one more forward. Hours = FLOPs per sample x samples / (devices x achieved FLOP/s), samples being the
preset's ``max_steps`` x global batch, or its epochs x :data:`M3D_SAMPLES_PER_EPOCH` at the paper scale.

**How close** (``benchmarks/plan_check.py``; 2-core CPU, fp32, peak RSS): at small within -12 % .. +7 %
of measured peaks (few-step runs and full runs of 250-500 steps: clip 2.28 / 2.5 GiB, align 3.44 / 3.8,
instruct 5.32 / 6.0 against 2.20, 3.59, 5.68 planned); at ci +6 % for clip and up to +30 % for the LLM
stages, whose ci samples are far shorter than ``max_length``. Time per step: within a factor 2 of the
small runs at the default 0.1 TFLOP/s. The GPU figures (bf16, ZeRO, CUDA overhead) are the same rules
and not yet checked on a GPU (``benchmarks/gpu_throughput.py`` prints the peaks to check them against).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, LlamaConfig, Phi3Config, PreTrainedConfig

from m3d_lite.config import TrainConfig, section_config
from m3d_lite.models.clip import M3DClipConfig, M3DClipModel
from m3d_lite.models.lamed import LaMedConfig, LaMedForCausalLM, LLMConfig, token_id_fields
from m3d_lite.models.lora import LoraSettings, apply_lora
from m3d_lite.models.pretrained import TINY_LLMS, load_llm_tokenizer, resolve_llm, tiny_llm_config
from m3d_lite.models.projector import ProjectorConfig
from m3d_lite.models.segmentation import SegConfig
from m3d_lite.models.tokenizer import M3D_TOKENS, add_m3d_tokens
from m3d_lite.models.vision import VisionConfig
from m3d_lite.train.align import freeze_for_alignment
from m3d_lite.train.instruct import unfreeze_for_instruction
from m3d_lite.train.loop import accumulation_steps

STAGES = ("clip", "align", "instruct")
GIB = 2**30

# The paper's LLMs from their official config.json files on the Hub (microsoft/Phi-3-mini-4k-instruct,
# meta-llama/Llama-2-7b-chat-hf), with the size of their tokenizers before M3D's 4 tokens (M3D_FACTS 1.5:
# Phi-3-mini 32011 -> 32015, Llama-2 32000 -> 32004): (config class, sizes, tokenizer length).
PAPER_LLMS: dict[str, tuple[type[PreTrainedConfig], dict[str, int | bool], int]] = {
    "microsoft/Phi-3-mini-4k-instruct": (
        Phi3Config,
        dict(
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        32011,
    ),
    "meta-llama/Llama-2-7b-chat-hf": (
        LlamaConfig,
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        32000,
    ),
}
LLM_ALIASES = {"phi3": "microsoft/Phi-3-mini-4k-instruct", "llama2": "meta-llama/Llama-2-7b-chat-hf"}

# Samples per epoch of M3D's data at the paper scale: the whole releases (M3D_FACTS 3.1-3.4; their train
# splits are most of them, sizes unpublished), so these are upper bounds. Stage 1: captions + each VQA row
# closed and open; stage 2 adds 4 REC/REG samples and 2 seg samples per M3D-Seg mask, and RefSeg's QAs.
M3D_SAMPLES_PER_EPOCH = {
    "clip": 120_092,  # M3D-Cap image-report pairs
    "align": 120_092 + 2 * 509_755,  # + M3D-VQA
    "instruct": 120_092 + 2 * 509_755 + 6 * 149_196 + 6 * 2_778,  # + M3D-Seg masks, M3D-RefSeg regions
}

GPU_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
FRAGMENTATION = 0.10  # freed blocks that PyTorch's caching allocator (GPU) or malloc (CPU) keep
CPU_BASE_GIB = 0.75  # RSS of the training process before the model: libraries, tokenizer, data loader
DEFAULT_GPU_TFLOPS = 125.0  # achieved bf16 TFLOP/s per GPU: 40 % of an A100's 312 (H100: ~400)
DEFAULT_CPU_TFLOPS = 0.1  # achieved fp32 TFLOP/s of a 2-core laptop CPU (benchmarks/plan_check.py)
LOGIT_BYTES = 12  # per token and vocabulary entry at the loss's backward, fp32 (+2 when logits are bf16)


@dataclass(frozen=True)
class Setup:
    """Where and how the stages run.

    ``gpus``: devices (0: one CPU process, memory = RAM); ``gpu_mem_gib``: memory of one device;
    ``zero``: DeepSpeed ZeRO stage (0: DDP, the stage's ``mixed_precision`` by autocast);
    ``gradient_checkpointing`` of every transformer stack and ``batch_size`` per device (None: each
    stage's preset); ``sdpa``: fused attention kernels; ``tflops`` achieved per device (None:
    :data:`DEFAULT_GPU_TFLOPS`, or :data:`DEFAULT_CPU_TFLOPS` with ``gpus=0``).
    """

    gpus: int = 8
    gpu_mem_gib: float = 80.0
    zero: int = 2
    gradient_checkpointing: bool | None = None
    sdpa: bool = True
    batch_size: int | None = None
    tflops: float | None = None

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0 (0: one CPU process), got {self.gpus}")
        if self.gpu_mem_gib <= 0:
            raise ValueError(f"gpu_mem_gib must be > 0 GiB, got {self.gpu_mem_gib}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be a DeepSpeed ZeRO stage 0, 1, 2 or 3, got {self.zero}")
        if self.zero and not self.gpus:
            raise ValueError(f"ZeRO-{self.zero} shards over GPUs: with gpus=0 (CPU) use zero=0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 sample per device, got {self.batch_size}")
        if self.tflops is not None and self.tflops <= 0:
            raise ValueError(f"tflops must be > 0, got {self.tflops}")

    @property
    def devices(self) -> int:
        return max(self.gpus, 1)

    @property
    def achieved_flops(self) -> float:
        """Achieved FLOP/s per device."""
        return 1e12 * (self.tflops or (DEFAULT_GPU_TFLOPS if self.gpus else DEFAULT_CPU_TFLOPS))


@dataclass(frozen=True)
class StagePlan:
    """One stage's plan; memory in bytes per device (see the module docstring for how each is estimated)."""

    stage: str
    precision: str
    batch_size: int
    accumulation: int
    gradient_checkpointing: bool
    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    memory_limit: float
    flops_per_sample: float
    samples: int | None
    activation_parts: dict[str, float]  # bytes per device by part, "logits" included
    achieved_flops: float
    devices: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.memory_limit

    @property
    def seconds_per_step(self) -> float:
        """Time of one optimizer step (``accumulation`` batches per device) at the achieved FLOP/s."""
        return self.flops_per_sample * self.batch_size * self.accumulation / self.achieved_flops

    @property
    def hours(self) -> float | None:
        """Training time of ``samples`` at the achieved FLOP/s of every device; None without ``samples``."""
        if self.samples is None:
            return None
        return self.flops_per_sample * self.samples / (self.devices * self.achieved_flops) / 3600


@dataclass(frozen=True)
class Part:
    """A piece of a stage's model as the estimates see it: tokens per sample through its Linear layers,
    whether a gradient passes through it to an earlier part, its activations (elements per sample) and its
    self-attention ``(blocks, tokens, width)`` for the FLOPs."""

    name: str
    module: nn.Module
    tokens: int
    input_grad: bool
    activations: float
    attention: tuple[int, int, int] = (0, 0, 0)


def llm_config(name: str) -> tuple[PreTrainedConfig, list[int]]:
    """The config of causal LM ``name`` with room for M3D's tokens, and their ids (``M3D_TOKENS`` order).

    The paper's LLMs (``phi3``, ``llama2`` or their Hub ids) come from :data:`PAPER_LLMS`, the tiny ones from
    ``tiny_llm_config``, any other from its config file and tokenizer (local folder, offline package or Hub
    cache; read once per process); no weights are read. The vocabulary grows to the tokenizer's length but
    never shrinks, as in ``resize_with_mean_init``.
    """
    config, ids = read_llm_config(LLM_ALIASES.get(name.lower(), name))
    return copy.deepcopy(config), list(ids)


@functools.lru_cache
def read_llm_config(name: str) -> tuple[PreTrainedConfig, tuple[int, ...]]:
    """:func:`llm_config` without the copy (a cached object must not be changed)."""
    if name in PAPER_LLMS:
        config_class, sizes, length = PAPER_LLMS[name]
        config = config_class(**sizes)
        ids = tuple(range(length, length + len(M3D_TOKENS)))  # added at the end, in M3D_TOKENS order
        length += len(M3D_TOKENS)
    else:
        if name in TINY_LLMS:
            config = tiny_llm_config(name)
        else:
            path, kwargs = resolve_llm(name)
            config = AutoConfig.from_pretrained(path, **kwargs)
        tokenizer = load_llm_tokenizer(name)
        ids = tuple(add_m3d_tokens(tokenizer).values())
        length = len(tokenizer)
    config.vocab_size = max(config.vocab_size, length)
    return config, ids


def stage_model(stage: str, scale: str, llm: str | None = None) -> nn.Module:
    """Stage ``stage``'s model at ``scale`` on the meta device, frozen and wrapped as its training stage
    leaves it (``llm``: another LLM than the preset's, e.g. ``"llama2"``)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    with torch.device("meta"):
        if stage == "clip":
            return M3DClipModel(M3DClipConfig.from_scale(scale))
        settings = section_config(LLMConfig, scale, "llm", name=llm)
        text_config, ids = llm_config(settings.name)
        config = LaMedConfig(
            vision_config=VisionConfig.from_scale(scale),
            text_config=text_config,
            projector_config=dataclasses.asdict(ProjectorConfig.from_scale(scale)),
            **token_id_fields(dict(zip(M3D_TOKENS, ids, strict=True))),
            chat_template=settings.chat_template,
            model_max_length=settings.max_length,
            llm_name=settings.name,
            seg_config=SegConfig.from_scale(scale) if stage == "instruct" else None,
        )
        model = LaMedForCausalLM(config)
        if stage == "align":
            freeze_for_alignment(model, ids)
            return model
        model = apply_lora(model, LoraSettings.from_scale(scale))
        unfreeze_for_instruction(model)
        return model


def trains(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` has ``requires_grad``."""
    return any(p.requires_grad for p in module.parameters())


def dropout_mask(width: float, setup: Setup, element_bytes: int) -> float:
    """Elements-equivalent of a dropout mask of ``width``: bool on a GPU, a float tensor on a CPU."""
    return width / element_bytes if setup.gpus else width


def attention_probs(heads: int, tokens: int, dropout: float, setup: Setup, element_bytes: int) -> float:
    """Attention probabilities kept per token and block: none with fused SDPA kernels, else a x s, and with
    dropout its mask and output too (PyTorch's CPU SDPA takes the explicit path when there is dropout)."""
    if setup.sdpa and not (dropout and not setup.gpus):
        return 0
    probs = heads * tokens
    return probs * (2 + dropout_mask(1, setup, element_bytes)) if dropout else probs


def stack(tokens: int, blocks: int, per_token: float, width: int, setup: Setup) -> float:
    """Elements a stack of ``blocks`` keeps per sample; with gradient checkpointing each block's input and
    one block being recomputed."""
    if setup.gradient_checkpointing:
        return tokens * (blocks * width + per_token)
    return tokens * blocks * per_token


def vit_activations(config: VisionConfig, cls: bool, setup: Setup, element_bytes: int) -> float:
    """A training ViT3D (with its CLS token when ``cls``): the patch vectors, the blocks, the final norm."""
    tokens = config.num_patches + cls
    probs = attention_probs(config.num_heads, tokens, 0.0, setup, element_bytes)
    per_token = 8 * config.hidden_size + 2 * config.mlp_dim + probs
    voxels = math.prod(config.image_size) * config.in_channels
    return (
        voxels
        + tokens * config.hidden_size
        + stack(tokens, config.num_layers, per_token, config.hidden_size, setup)
    )


def bert_activations(config: PreTrainedConfig, tokens: int, setup: Setup, element_bytes: int) -> float:
    """A training BERT text tower on ``tokens``: embeddings' norm and dropout, then the blocks."""
    h = config.hidden_size
    masks = dropout_mask(h, setup, element_bytes) if config.hidden_dropout_prob else 0
    probs = attention_probs(
        config.num_attention_heads, tokens, config.attention_probs_dropout_prob, setup, element_bytes
    )
    per_token = 8 * h + 2 * config.intermediate_size + 2 * masks + probs
    return tokens * (h + masks) + stack(tokens, config.num_hidden_layers, per_token, h, setup)


def llm_activations(
    model: nn.Module, config: PreTrainedConfig, tokens: int, setup: Setup, element_bytes: int
) -> float:
    """The LLM with frozen weights and a gradient passing through, its LoRA adapters (if any), the final
    norm and the LM head's input; the logits are :func:`logit_bytes`."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = head_dim * (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    probs = attention_probs(config.num_attention_heads, tokens, 0.0, setup, element_bytes)
    blocks = config.num_hidden_layers
    adapters = [m for name, m in model.named_modules() if name.endswith("lora_A.default")]
    lora = sum(m.in_features * (1 + dropout_mask(1, setup, element_bytes)) + m.out_features for m in adapters)
    per_token = 4 * h + 2 * kv + 3 * i + probs + lora / blocks
    return tokens * 2 * h + stack(tokens, blocks, per_token, h, setup)


def seg_activations(config: SegConfig, setup: Setup, element_bytes: int) -> float:
    """The seg module on a row with a mask: its ViT, the decoder on the grid, the full-size mask losses."""
    decoder = (25 + 7 * config.decoder_depth) * config.vision_config.num_patches * config.hidden_size
    return (
        vit_activations(config.vision_config, False, setup, element_bytes)
        + decoder
        + 3 * math.prod(config.image_size)
    )


def stage_parts(stage: str, model: nn.Module, setup: Setup, element_bytes: int) -> list[Part]:
    """The parts of a :func:`stage_model` in the order data flows, with their activations per sample."""
    if stage == "clip":
        vision = VisionConfig(**model.config.vision_config)
        text = model.text_encoder.config
        tokens = model.config.max_text_len
        return [
            Part(
                "vision_encoder",
                model.vision_encoder,
                vision.num_patches + 1,
                False,
                vit_activations(vision, True, setup, element_bytes),
                (vision.num_layers, vision.num_patches + 1, vision.hidden_size),
            ),
            Part(
                "text_encoder",
                model.text_encoder,
                tokens,
                False,
                bert_activations(text, tokens, setup, element_bytes),
                (text.num_hidden_layers, tokens, text.hidden_size),
            ),
            Part("projections", nn.ModuleList([model.mm_vision_proj, model.mm_language_proj]), 1, False, 0),
        ]
    lamed = model.get_base_model() if isinstance(model, PeftModel) else model
    config = lamed.config
    vision, text = config.vision_config, config.text_config
    vision_trains = trains(lamed.vision_tower)
    projector_width = text.hidden_size * (2 if config.projector.layer_type == "mlp" else 0)
    tokens = config.model_max_length
    parts = [
        Part(
            "vision_tower",
            lamed.vision_tower,
            vision.num_patches + 1,
            False,
            vit_activations(vision, True, setup, element_bytes) if vision_trains else 0,
            (vision.num_layers, vision.num_patches + 1, vision.hidden_size),
        ),
        Part(
            "mm_projector",
            lamed.mm_projector,
            config.proj_out_num,
            vision_trains,
            config.proj_out_num * (vision.hidden_size + projector_width),
        ),
        Part(
            "language_model",
            lamed.language_model,
            tokens,
            True,
            llm_activations(lamed.language_model, text, tokens, setup, element_bytes),
            (text.num_hidden_layers, tokens, text.hidden_size),
        ),
    ]
    if lamed.seg_module is not None:
        seg = config.seg_config
        parts += [
            Part("seg_projector", lamed.seg_projector, 1, True, 0),
            Part(
                "seg_module",
                lamed.seg_module,
                seg.vision_config.num_patches,
                False,
                seg_activations(seg, setup, element_bytes),
                (seg.num_layers, seg.vision_config.num_patches, seg.hidden_size),
            ),
        ]
    return parts


def logit_bytes(stage: str, model: nn.Module, sixteen_bit: bool) -> float:
    """Bytes per sample of the logits at the loss's backward (0 for CLIP, whose logits are batch x batch)."""
    if stage == "clip":
        return 0
    config = model.config
    return (LOGIT_BYTES + 2 * sixteen_bit) * config.model_max_length * config.text_config.vocab_size


def part_flops(part: Part, setup: Setup) -> float:
    """Training FLOPs per sample of ``part`` (see the module docstring's "Time")."""
    grad = part.input_grad or trains(part.module)
    recompute = setup.gradient_checkpointing and part.activations > 0
    linears = [m for m in part.module.modules() if isinstance(m, nn.Linear)]
    flops = sum(
        2 * m.weight.numel() * part.tokens * (1 + grad + m.weight.requires_grad + recompute) for m in linears
    )
    blocks, tokens, width = part.attention
    return flops + 4 * blocks * tokens**2 * width * (1 + 2 * grad + recompute)


def samples_of(stage: str, scale: str, cfg: TrainConfig, global_batch: int) -> int | None:
    """Samples the stage trains on: max_steps x global batch, else epochs x M3D's data (paper scale)."""
    if cfg.max_steps:
        return cfg.max_steps * global_batch
    if scale == "paper":
        return round(cfg.epochs * M3D_SAMPLES_PER_EPOCH[stage])
    return None


def precision_of(cfg: TrainConfig, setup: Setup) -> str:
    """``"fp32"``, ``"bf16"``/``"fp16"`` (autocast) or ``"bf16 ZeRO-2"``-like, as the stage would run."""
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if setup.gpus else "no"
    name = "fp32" if mixed == "no" else mixed
    return f"{name} ZeRO-{setup.zero}" if setup.zero else name


def plan_stage(stage: str, scale: str, setup: Setup | None = None, llm: str | None = None) -> StagePlan:
    """Parameters, memory per device and time of stage ``stage`` at ``scale`` on ``setup`` (default: 8 GPUs
    of 80 GiB, ZeRO-2); ``llm`` replaces the preset's LLM (``"phi3"``, ``"llama2"``, any LLM name)."""
    cfg = TrainConfig.from_scale(scale, stage, batch_size=setup and setup.batch_size)
    setup = setup or Setup()
    if setup.gradient_checkpointing is None:
        setup = dataclasses.replace(setup, gradient_checkpointing=cfg.gradient_checkpointing)
    batch, accumulation = cfg.batch_size, accumulation_steps(cfg, setup.devices)
    precision = precision_of(cfg, setup)
    sixteen_bit = not precision.startswith("fp32")
    deepspeed = setup.zero > 0
    element_bytes = 2 if sixteen_bit else 4
    n = setup.devices

    model = stage_model(stage, scale, llm)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = stage_parts(stage, model, setup, element_bytes)

    if deepspeed and sixteen_bit:
        weights = 2 * parameters / (n if setup.zero == 3 else 1)
        gradients = 2 * trainable / (n if setup.zero >= 2 else 1)
        optimizer = 12 * trainable / n
    else:
        weights = 4 * parameters / (n if setup.zero == 3 else 1)
        gradients = 4 * trainable / (n if setup.zero >= 2 else 1)
        optimizer = 8 * trainable / (n if setup.zero else 1)
        if sixteen_bit:  # autocast: the bf16 copies of the weights the backward needs
            on_path = [p for p in parts if p.input_grad or trains(p.module)]
            weights += 2 * sum(
                m.weight.numel() for p in on_path for m in p.module.modules() if isinstance(m, nn.Linear)
            )
        if not setup.zero and setup.gpus > 1:
            gradients *= 2  # DDP's reducer buckets
    activation_parts = {p.name: batch * element_bytes * p.activations for p in parts if p.activations}
    logits = batch * logit_bytes(stage, model, sixteen_bit)
    if logits:
        activation_parts["logits"] = logits
    activations = sum(activation_parts.values())
    states = weights + gradients + optimizer + activations
    overhead = (GPU_CONTEXT_GIB if setup.gpus else CPU_BASE_GIB) * GIB + FRAGMENTATION * states
    return StagePlan(
        stage=stage,
        precision=precision,
        batch_size=batch,
        accumulation=accumulation,
        gradient_checkpointing=setup.gradient_checkpointing,
        parameters=parameters,
        trainable=trainable,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        overhead=overhead,
        memory_limit=setup.gpu_mem_gib * GIB,
        flops_per_sample=sum(part_flops(p, setup) for p in parts),
        samples=samples_of(stage, scale, cfg, batch * setup.devices * accumulation),
        activation_parts=activation_parts,
        achieved_flops=setup.achieved_flops,
        devices=n,
    )


def plan(
    scale: str, setup: Setup | None = None, llm: str | None = None, stages: Sequence[str] = STAGES
) -> list[StagePlan]:
    """:func:`plan_stage` for each of ``stages`` (default: all three)."""
    return [plan_stage(stage, scale, setup, llm) for stage in stages]


def format_plans(plans: Sequence[StagePlan], title: str = "") -> str:
    """The plans as a text table: counts in millions, memory in GiB per device, hours; then each stage's
    activations by part. ``batch`` is per device x accumulated micro-batches; ``+ckpt``: checkpointing."""
    header = (
        f"{'stage':<9}{'params':>9}{'trainable':>10}{'precision':>19}{'batch':>7}{'weights':>9}{'grads':>8}"
        f"{'optim':>8}{'activ.':>8}{'other':>7}{'total':>8}{'fits':>6}{'hours':>8}"
    )
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for p in plans:
        memory = (p.weights, p.gradients, p.optimizer, p.activations, p.overhead, p.total)
        hours = "-" if p.hours is None else f"{p.hours:.2f}" if p.hours < 10 else f"{p.hours:.0f}"
        precision = p.precision + (" +ckpt" if p.gradient_checkpointing else "")
        lines.append(
            f"{p.stage:<9}{p.parameters / 1e6:>8.1f}M{p.trainable / 1e6:>9.1f}M{precision:>19}"
            + f"{f'{p.batch_size}x{p.accumulation}':>7}"
            + "".join(f"{m / GIB:>{w}.2f}" for m, w in zip(memory, (9, 8, 8, 8, 7, 8), strict=True))
            + f"{'yes' if p.fits else 'NO':>6}{hours:>8}"
        )
    lines.append("memory in GiB per device; activations by part (GiB):")
    for p in plans:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in p.activation_parts.items())
        lines.append(f"  {p.stage}: {parts}")
    return "\n".join(lines)


def describe(scale: str, setup: Setup, llm: str | None = None) -> str:
    """One line saying what a plan assumes (the title of :func:`format_plans`)."""
    where = (
        f"{setup.gpus} GPU(s) x {setup.gpu_mem_gib:g} GiB"
        if setup.gpus
        else f"CPU, {setup.gpu_mem_gib:g} GiB RAM"
    )
    sharding = f"DeepSpeed ZeRO-{setup.zero}" if setup.zero else ("DDP" if setup.gpus > 1 else "one process")
    options = [
        "SDPA" if setup.sdpa else "explicit attention",
        {None: "gradient checkpointing as the presets say", True: "gradient checkpointing"}.get(
            setup.gradient_checkpointing, "no gradient checkpointing"
        ),
        f"{setup.achieved_flops / 1e12:g} TFLOP/s per device",
    ]
    name = section_config(LLMConfig, scale, "llm", name=llm and LLM_ALIASES.get(llm.lower(), llm)).name
    return f"plan at scale {scale!r}, LLM {name}: {where}, {sharding}, {', '.join(options)}"
