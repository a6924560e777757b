"""Training throughput and peak memory of each stage at the paper shapes on one GPU.

    python benchmarks/gpu_throughput.py                                  # paper scale, cuda, bf16 autocast
    python benchmarks/gpu_throughput.py --llm /models/Phi-3-mini-4k-instruct --stages instruct
    python benchmarks/gpu_throughput.py --scale ci --steps 2 --warmup 1  # CPU smoke run, a minute

For each stage (``clip``: ViT + BERT, all trained; ``align``: projector + new token rows; ``instruct``: LoRA
on the LLM + ViT, projector, embeddings and the seg module, on batches that hold a ``[SEG]`` and a mask) it
builds the model as the stage does, then times ``--steps`` training steps (forward, backward, AdamW) after
``--warmup`` untimed ones, for every combination of gradient checkpointing off/on and attention
``sdpa``/``eager``: the ViTs' ``use_sdpa`` (MONAI's ``use_flash_attention``) and the LLM's or BERT's
``attn_implementation`` switched together. SDPA lets PyTorch pick its fused FlashAttention or
memory-efficient kernels on a GPU; eager is the explicit softmax(QK^T / sqrt(d)) V that M3D ran.

Inputs are random tensors of the preset's shapes (volumes 1 x D x H x W, ``max_text_len`` text tokens for
CLIP, ``model_max_length`` tokens with the image tokens for LaMed), so only the model's cost is measured, not
data loading. Weights stay fp32 under bf16 autocast, as ``accelerate`` runs the loop (``--precision no``:
fp32).
Peak memory is ``torch.cuda.max_memory_allocated`` per row on a GPU; on the CPU it is the process's peak
RSS so far (it only grows, so later rows repeat earlier peaks). The paper LLM and BERT come from the Hub
(``--llm``: a Hub id or a local folder; default the preset's, M3D's Phi-3-mini-4k-instruct).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import resource
import time
from collections.abc import Callable

import torch
from monai.networks.blocks.selfattention import SABlock
from torch import nn

from m3d_lite.config import TrainConfig
from m3d_lite.models.clip import build_clip
from m3d_lite.models.lamed import LaMedForCausalLM, build_lamed
from m3d_lite.models.lora import LoraSettings, apply_lora
from m3d_lite.models.tokenizer import M3D_TOKENS
from m3d_lite.train.align import freeze_for_alignment
from m3d_lite.train.instruct import unfreeze_for_instruction
from m3d_lite.train.loop import enable_gradient_checkpointing, parameter_groups

STAGES = ("clip", "align", "instruct")
ROW = "{:9} {:>5} {:>9} {:>9} {:>10} {:>8} {:>10}"


def set_attention(model: nn.Module, text_model: nn.Module, sdpa: bool) -> None:
    """SDPA or eager attention in every MONAI ViT block of ``model`` and in its transformers
    ``text_model``."""
    for module in model.modules():
        if isinstance(module, SABlock):
            module.use_flash_attention = sdpa
    text_model.set_attn_implementation("sdpa" if sdpa else "eager")


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing on (the training loop's switch) or off."""
    if on:
        enable_gradient_checkpointing(model)
    else:
        model.activation_checkpointing_disable()


def clip_case(scale: str, batch_size: int, device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    """M3D-CLIP with a batch of volumes and full-length reports."""
    model, _ = build_clip(scale)
    vision, text = model.config.vision_config, model.config.text_config
    input_ids = torch.randint(1000, text["vocab_size"], (batch_size, model.config.max_text_len))
    batch = {"images": torch.rand(batch_size, 1, *vision["image_size"]), "input_ids": input_ids}
    return model.to(device), model.text_encoder, batch


def lamed_batch(model: LaMedForCausalLM, batch_size: int, segmentation: bool) -> dict[str, torch.Tensor]:
    """Full-length samples: the image tokens, then random text (loss on it), a ``[SEG]`` and a mask cube."""
    config = model.config
    length, images = config.model_max_length, config.proj_out_num
    input_ids = torch.randint(1000, 20000, (batch_size, length))
    input_ids[:, 1 : 1 + images] = config.image_token_id
    if segmentation:
        input_ids[:, -2] = config.seg_token_id
    labels = input_ids.masked_fill(input_ids == config.image_token_id, -100)
    shape = config.vision_config.image_size
    batch = {"images": torch.rand(batch_size, 1, *shape), "input_ids": input_ids, "labels": labels}
    if segmentation:
        masks = torch.zeros(batch_size, 1, *shape)
        masks[..., : shape[0] // 2, : shape[1] // 2, : shape[2] // 2] = 1
        batch["seg_masks"] = masks
    return batch


def align_case(scale: str, llm: str | None, batch_size: int, device: torch.device):
    """Stage 1: LaMed with all but the projector and the new token rows frozen."""
    model, tokenizer = build_lamed(scale, llm=llm)
    freeze_for_alignment(model, tokenizer.convert_tokens_to_ids(list(M3D_TOKENS)))
    return model.to(device), model.language_model, lamed_batch(model, batch_size, segmentation=False)


def instruct_case(scale: str, llm: str | None, batch_size: int, device: torch.device):
    """Stage 2: LoRA on the LLM, ViT, projector, embeddings and the seg module trained in full."""
    lamed, _ = build_lamed(scale, llm=llm, segmentation=True)
    model = apply_lora(lamed, LoraSettings.from_scale(scale))
    unfreeze_for_instruction(model)
    return model.to(device), lamed.language_model, lamed_batch(lamed, batch_size, segmentation=True)


def measure(
    model: nn.Module, batch: dict, steps: int, warmup: int, device: torch.device, precision: str
) -> tuple[float, float]:
    """Seconds per training step (forward, backward, AdamW) and peak memory in GiB."""
    batch = {key: value.to(device) for key, value in batch.items()}
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0, 1e-5))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for index in range(warmup + steps):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    del optimizer
    release(device)
    return seconds, peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="paper", choices=["ci", "small", "paper"])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--llm", default=None, help="LLM Hub id or folder (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's per-GPU batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernels, allocator)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="autocast dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{where}, torch {torch.__version__}, scale {args.scale}, precision {args.precision}")
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    print(ROW.format("stage", "batch", "grad ckpt", "attention", "samples/s", "s/step", memory))
    builders: dict[str, Callable] = {
        "clip": lambda batch_size: clip_case(args.scale, batch_size, device),
        "align": lambda batch_size: align_case(args.scale, args.llm, batch_size, device),
        "instruct": lambda batch_size: instruct_case(args.scale, args.llm, batch_size, device),
    }
    for stage in args.stages:
        batch_size = args.batch_size or TrainConfig.from_scale(args.scale, stage).batch_size
        torch.manual_seed(0)
        model, text_model, batch = builders[stage](batch_size)
        for checkpointing, sdpa in itertools.product((False, True), (True, False)):
            set_checkpointing(model, checkpointing)
            set_attention(model, text_model, sdpa)
            try:
                seconds, peak = measure(model, batch, args.steps, args.warmup, device, args.precision)
                cells = (f"{batch_size / seconds:.2f}", f"{seconds:.3f}", f"{peak:.2f}")
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                release(device)
                cells = ("OOM", "-", "-")
            attention = "sdpa" if sdpa else "eager"
            print(ROW.format(stage, batch_size, "on" if checkpointing else "off", attention, *cells))
        del model, text_model, batch
        release(device)


if __name__ == "__main__":
    main()
