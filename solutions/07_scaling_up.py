# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Scaling up: from ci to the paper, and M3D's own weights
#
# Notebooks 01–06 ran every stage of M3D on a laptop at the `ci` scale. The same functions run M3D's
# real setting: 1 × 32 × 256 × 256 volumes, a 768-wide ViT and Phi-3-mini (3.8 B parameters) on eight
# GPUs. This notebook is about that step: what changes, what it costs, how to launch it, and how to start
# from the weights M3D released instead of training from scratch.
#
# 1. from ci to paper: the three presets side by side;
# 2. reading the estimator: memory per GPU and hours before renting GPUs (**exercise 1**: the bytes of
#    the training state under ZeRO; **exercise 2**: gradient accumulation for a global batch);
# 3. launching on 8 GPUs, and for real on 2 CPU processes here;
# 4. the official M3D weights: converted, inspected and asked a question.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small: the scale of the models this notebook launches and converts (plans cover all 3)
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/07_scaling_up"  # the launched run, the checkpoints in M3D's layout and their conversions
NUM_VOLUMES = 64  # phantom volumes (written once, shared with the other notebooks)
GPU_MEM_GIB = 80  # memory of the GPUs you plan for (A100/H100: 80; A100-40GB, L40S: 40-48)
LAPTOP_RAM_GIB = 16  # memory of the machine the ci and small plans are checked against
RUN_LAUNCH = True  # a real 2-process CPU launch of stage 2 (~25 s at ci); False: only the commands
LAUNCH_STEPS = 4  # optimizer steps of that launch
OFFICIAL_CLIP = ""  # M3D-CLIP: Hub id (GoodBaiBai88/M3D-CLIP) or folder; empty: a synthetic one, M3D's layout
OFFICIAL_LAMED = ""  # M3D-LaMed: Hub id (GoodBaiBai88/M3D-LaMed-Phi-3-4B) or folder; empty: a synthetic one
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)

# %%
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import yaml
from IPython.display import Markdown, display

from m3d_lite import viz
from m3d_lite.config import SCALES, TrainConfig, default_data_dir, load_preset
from m3d_lite.course.checks import check_function, summary
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.demo.inputs import phantom_examples
from m3d_lite.eval.report import markdown_table
from m3d_lite.infer import ask, load_model, load_scan
from m3d_lite.models.clip import build_clip, load_clip
from m3d_lite.models.lamed import build_lamed, load_lamed, save_lamed
from m3d_lite.models.lora import export_merged
from m3d_lite.models.official import (
    LAMED_RULES,
    convert_m3d_clip,
    convert_m3d_lamed,
)
from m3d_lite.models.official_export import official_lamed_state, save_official_clip, save_official_lamed
from m3d_lite.models.projector import ProjectorConfig
from m3d_lite.models.seg_pathway import fold_state_norm
from m3d_lite.models.segmentation import SegConfig
from m3d_lite.models.vision import VisionConfig
from m3d_lite.plan import GIB, STAGES, Setup, describe, format_plans, plan, stage_model
from m3d_lite.train.loop import accumulation_steps

torch.manual_seed(SEED)
data_dir = ensure_phantom_dataset(
    Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE), NUM_VOLUMES, SCALE, SEED
)
out_dir = Path(OUTPUT_DIR)
out_dir.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. From ci to paper
#
# A scale is a YAML preset (`m3d_lite/configs/{ci,small,paper}.yaml`) that every function reads; nothing
# else changes between scales. Each one has a job:
#
# * **ci** checks the *mechanics* in seconds: every test and every notebook runs on it, with a tiny random
#   BERT and a tiny random Llama. Its models learn the training pairs by heart and write no sentences.
# * **small** is the largest setting a 2-core laptop trains in minutes per stage: a pretrained text tower
#   (MiniLM) and a pretrained LLM (SmolLM2-135M), so the answers start to mean something.
# * **paper** is M3D's own setting (its `LaMed/script/*.sh`), for real data on 8 GPUs.
#
# The table reads the three presets, and the parameter counts come from the models themselves, built on
# PyTorch's *meta* device (shapes without memory, as section 2 explains).


# %%
def schedule(cfg: TrainConfig) -> str:
    return f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epochs"


laptop = Setup(gpus=0, zero=0, gpu_mem_gib=LAPTOP_RAM_GIB)
paper_setup = Setup(gpus=8, gpu_mem_gib=GPU_MEM_GIB, zero=2)
plans = {"ci": plan("ci", laptop), "small": plan("small", laptop), "paper": plan("paper", paper_setup)}
columns = {}  # scale -> what -> value
for scale in SCALES:
    preset, vision = load_preset(scale), VisionConfig.from_scale(scale)
    image_tokens = ProjectorConfig.from_scale(scale).out_num(vision.grid)
    columns[scale] = {
        "volume": " × ".join(map(str, [1, *preset["data"]["image_shape"]])),
        "ViT": f"{vision.hidden_size} wide, {vision.num_layers} blocks, {vision.num_patches} patch tokens",
        "text tower (CLIP)": preset["clip"]["text_model"],
        "LLM": preset["llm"]["name"],
        "image tokens / sample length": f"{image_tokens} / {preset['llm']['max_length']}",
        **{
            f"params, stage {i} {p.stage}": f"{p.parameters / 1e6:,.1f} M ({p.trainable / 1e6:,.1f} M train)"
            for i, p in enumerate(plans[scale])
        },
    }
    for i, stage in enumerate(STAGES):
        cfg = TrainConfig.from_scale(scale, stage)
        global_batch = cfg.global_batch_size or cfg.batch_size
        columns[scale][f"stage {i} {stage}: schedule, batch / global, lr"] = (
            f"{schedule(cfg)}, {cfg.batch_size} / {global_batch}, {cfg.learning_rate:g}"
        )
rows = [[name, *(columns[scale][name] for scale in SCALES)] for name in columns["ci"]]
display(Markdown(markdown_table(["", *SCALES], rows)))

# %% [markdown]
# Three things grow by orders of magnitude on the way up. The **volume** goes from 131 k to 2.1 M voxels,
# and with a 16 × 16 patch the ViT sees 2048 tokens instead of 512. The **LLM** goes from a few million
# parameters to 3.8 billion, which is where almost all of stage 1 and 2's weights are. And the **data**
# goes from 64 phantom volumes to M3D's 120 k real scans: the paper schedule counts epochs of it, the ci
# and small schedules count steps.
#
# The batch is *per GPU*; the **global batch** is what one optimizer step sees. M3D trained on 8 GPUs, so
# the paper preset writes its global batch as 8 × the per-GPU batch, and the loop keeps that number on
# any count of GPUs by accumulating micro-batches (exercise 2).
#
# ## 2. Reading the estimator
#
# Renting eight GPUs for days is expensive; finding out on day one that stage 2 does not fit is worse.
# `m3d_lite.plan` (and `m3d-lite plan` in a shell) answers before you start. It builds each stage's model
# on the meta device, freezes it with the stage's own code (so the trainable count is exact), and adds up
# what a GPU holds during training:
#
# * **weights**: every parameter, frozen or not (bf16: 2 bytes each);
# * **gradients**: one per *trainable* parameter;
# * **optimizer states**: AdamW keeps two moments per trainable parameter, and mixed precision an fp32
#   master copy of it;
# * **activations**: what the forward pass keeps for the backward, per sample, times the batch;
# * **overhead**: CUDA context and workspaces, and memory the allocator holds in reserve.
#
# Here is M3D's schedule on eight GPUs of `GPU_MEM_GIB`, with DeepSpeed ZeRO-2 (section 3):

# %%
print(format_plans(plans["paper"], title=describe("paper", paper_setup)))

# %% [markdown]
# Read it column by column. Stage 0 trains all of its 197 M parameters, but they are small next to its
# **activations**: 2048 image tokens through 12 blocks, 32 volumes per GPU. Stages 1 and 2 carry the whole
# LLM as weights, yet train only 5-11 % of it (the projector and new token rows; LoRA, the ViT and the seg
# module): gradients and optimizer states stay small. In every stage, activations are the largest item.
#
# What the knobs change, on one picture: ZeRO-3 shards the weights too, gradient checkpointing keeps one
# tensor per block instead of all of them (and recomputes the rest), one GPU holds everything alone, and
# 40 GiB cards have half the room.

# %%
setups = {
    "8 GPUs, ZeRO-2\n(M3D's preset)": paper_setup,
    "8 GPUs, ZeRO-3": Setup(gpus=8, gpu_mem_gib=GPU_MEM_GIB, zero=3),
    "8 GPUs, ZeRO-2\n+ checkpointing": Setup(
        gpus=8, gpu_mem_gib=GPU_MEM_GIB, zero=2, gradient_checkpointing=True
    ),
    "1 GPU, no ZeRO\n(8 micro-batches)": Setup(gpus=1, gpu_mem_gib=GPU_MEM_GIB, zero=0),
    "8 GPUs of 40 GiB,\nZeRO-2": Setup(gpus=8, gpu_mem_gib=40, zero=2),
}
setup_plans = {name: plan("paper", setup) for name, setup in setups.items()}
items = ("weights", "gradients", "optimizer", "activations", "overhead")
fig, axes = plt.subplots(1, len(setups), figsize=(3 * len(setups), 3.8), sharey=True, layout="constrained")
for ax, (name, stage_plans) in zip(axes, setup_plans.items(), strict=True):
    bottom = [0.0] * len(stage_plans)
    for item in items:
        heights = [getattr(p, item) / GIB for p in stage_plans]
        ax.bar([p.stage for p in stage_plans], heights, bottom=bottom, label=item)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.axhline(stage_plans[0].memory_limit / GIB, color="k", linestyle="--", linewidth=1)
    for x, p in enumerate(stage_plans):
        if not p.fits:
            ax.annotate("does not fit", (x, p.total / GIB), ha="center", va="bottom", color="firebrick")
    hours = sum(p.hours for p in stage_plans)
    ax.set_title(f"{name}\n{hours:,.0f} h for all 3 stages", fontsize="small")
axes[0].set_ylabel("GiB per GPU (dashed: the GPU)")
axes[-1].legend(fontsize="small", loc="upper right")
plt.show()

# %% [markdown]
# * **ZeRO-3** removes 7 of the 8 shards of the bf16 weights from each GPU: about 6.5 GiB less in stages 1
#   and 2, at the same hours (the shards travel between GPUs before each layer, which the estimator, a
#   count of FLOPs, does not see).
# * **Gradient checkpointing** cuts the activations 4-6×, the largest saving by far, for a third to a half
#   more compute: a second forward pass inside the backward.
# * **One GPU** holds everything alone. With the same global batch it takes 8 × longer: over 10 days of
#   stage 2 at the estimator's 125 TFLOP/s. Without ZeRO, mixed precision keeps fp32 weights *and* a bf16
#   copy of those the backward needs, so the weights take 3× the ZeRO-2 figure.
# * **40 GiB cards**: stages 0 and 1 fit, stage 2 does not. ZeRO-3 or gradient checkpointing (or a
#   smaller per-GPU batch, with more accumulation) brings it back under the line.
#
# **How far to trust it?** The memory rules were checked against peak memory measured on a CPU (fp32, no
# CUDA): `benchmarks/plan_check.py` runs a few steps of each stage as its own process and prints the peak
# resident memory next to the plan. Its figures on a busy 2-core machine:

# %%
# (peak RSS GiB, seconds per step) printed by benchmarks/plan_check.py: ci, 5 steps of each stage; small,
# the full runs of benchmarks/{clip,align,instruct}_small.py (MEASURED_SMALL there)
MEASURED = {
    "ci": {"clip": (0.85, 1.35), "align": (1.12, 1.79), "instruct": (1.20, 2.20)},
    "small": {"clip": (2.5, 3.76), "align": (3.8, 4.94), "instruct": (6.0, 6.83)},
}
rows = [
    [scale, p.stage, f"{p.total / GIB:.2f}", f"{peak:.2f}", f"{p.total / GIB / peak - 1:+.0%}"]
    + [f"{p.seconds_per_step:.2f}", f"{seconds:.2f}"]
    for scale, measured in MEASURED.items()
    for p in plans[scale]
    for peak, seconds in [measured[p.stage]]
]
header = ["scale", "stage", "planned GiB", "measured GiB", "error", "planned s/step", "measured s/step"]
display(Markdown(markdown_table(header, rows)))

# %% [markdown]
# Memory is within about ±12 % at small. At ci the plan is 25-30 % high for the LLM stages: it assumes
# every batch is as long as `max_length`, and ci's samples are far shorter. Time is the weaker estimate:
# it counts FLOPs, which is close at small (a factor ~2) but not at ci, where Python and kernel launches,
# not arithmetic, take the time. On GPUs the memory rules are the same, not yet checked against a GPU
# run (`benchmarks/gpu_throughput.py` prints the peaks to check them with): treat the plan as a good first
# answer, and leave a margin.
#
# ### Exercise 1 · the training state under ZeRO
# DeepSpeed with bf16 keeps, for `P` parameters of which `T` train: the weights in bf16 (2 bytes each),
# the gradients in bf16 (2 bytes per trainable parameter), and the AdamW state in fp32 (an fp32 master
# copy of each trainable weight, and its two moments: 12 bytes). ZeRO shards them over the `N` GPUs in
# stages: **ZeRO-1** the optimizer states, **ZeRO-2** also the gradients, **ZeRO-3** also the weights.
#
# Write `my_zero_state_bytes(parameters, trainable, gpus, zero)` returning the bytes *per GPU* of
# `(weights, gradients, optimizer)` for `zero` in 1, 2, 3. The check compares it with the estimator's own
# figures for M3D's stages.


# %%
def my_zero_state_bytes(parameters: int, trainable: int, gpus: int, zero: int) -> tuple[float, float, float]:
    """Bytes per GPU of bf16 weights, bf16 gradients and fp32 AdamW states under DeepSpeed ZeRO-``zero``."""
    ### BEGIN SOLUTION
    weights = 2 * parameters / (gpus if zero >= 3 else 1)
    gradients = 2 * trainable / (gpus if zero >= 2 else 1)
    optimizer = 12 * trainable / gpus
    return weights, gradients, optimizer
    ### END SOLUTION


# %%
zero_setups = [(8, 2), (8, 3), (1, 1), (4, 1), (2, 3), (2, 2)]  # (GPUs, ZeRO stage)
planned = {}
for gpus, zero in zero_setups:
    for p in plan("paper", Setup(gpus=gpus, zero=zero)):
        planned[(p.parameters, p.trainable, gpus, zero)] = (p.weights, p.gradients, p.optimizer)
cases = [key for key in planned if key[2:] in zero_setups[:3]]


def planned_state_bytes(parameters, trainable, gpus, zero):
    return planned[(parameters, trainable, gpus, zero)]


my_zero_state_bytes = check_function(
    "07.zero_state_bytes",
    my_zero_state_bytes,
    planned_state_bytes,
    cases=cases,
    hidden_cases=[key for key in planned if key not in cases],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# ### Exercise 2 · gradient accumulation for a global batch
# M3D's stage 0 used 32 volumes per GPU on 8 GPUs: a global batch of 256 per optimizer step. On fewer
# GPUs the loop keeps 256 by running several micro-batches before each step and summing their gradients.
#
# Write `my_accumulation_steps(global_batch_size, batch_size, gpus)`: the number of micro-batches per
# optimizer step, so that `batch_size × gpus × steps == global_batch_size`. When no whole number of steps
# gives the global batch (it is not a multiple of `batch_size × gpus`, or smaller than it), raise a
# `ValueError` saying so: a run must not silently train with another batch than the one asked for.


# %%
def my_accumulation_steps(global_batch_size: int, batch_size: int, gpus: int) -> int:
    """Micro-batches per optimizer step that keep ``global_batch_size`` on ``gpus`` GPUs."""
    ### BEGIN SOLUTION
    steps, rest = divmod(global_batch_size, batch_size * gpus)
    if rest or not steps:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of {batch_size} x {gpus} GPUs")
    return steps
    ### END SOLUTION


# %%
def outcome(fn):
    """``fn``'s result, or "ValueError" when it raises one: refusing is the right answer for some cases."""

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except ValueError:
            return "ValueError"

    return run


def loop_accumulation_steps(global_batch_size, batch_size, gpus):
    cfg = TrainConfig(batch_size=batch_size, learning_rate=1e-4, global_batch_size=global_batch_size)
    return accumulation_steps(cfg, gpus)


accumulation = check_function(
    "07.accumulation_steps",
    outcome(my_accumulation_steps),
    outcome(loop_accumulation_steps),
    cases=[(256, 32, 8), (256, 32, 1), (64, 8, 4), (64, 8, 3), (128, 16, 16)],
    hidden_cases=[(96, 4, 6), (100, 8, 2), (8, 8, 1), (256, 32, 5)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# With it, the micro-batches per step of M3D's three stages on 1 to 8 GPUs ("—": that count of GPUs
# cannot keep the global batch; pick another per-GPU batch with `--set batch_size=...`):

# %%
rows = []
for stage in STAGES:
    cfg = TrainConfig.from_scale("paper", stage)
    steps = [accumulation(cfg.global_batch_size, cfg.batch_size, gpus) for gpus in range(1, 9)]
    rows.append(
        [stage, f"{cfg.batch_size} / {cfg.global_batch_size}"]
        + ["—" if s == "ValueError" else s for s in steps]
    )
display(
    Markdown(
        markdown_table(
            ["stage", "batch per GPU / global", *(f"{g} GPU{'s' * (g > 1)}" for g in range(1, 9))], rows
        )
    )
)

# %% [markdown]
# Accumulation keeps the *optimizer* the same, not everything: stage 0's contrastive loss compares each
# volume with the other reports *in its micro-batch* (gathered over the GPUs). On one GPU that is 31
# negatives per pair instead of 255, so stage 0 learns differently on fewer GPUs even at the same global
# batch.
#
# ## 3. Launching on 8 GPUs
#
# Every stage is one module entry point, `python -m m3d_lite.train STAGE`, that runs the same training
# loop in a notebook, in one process, or in many under 🤗 accelerate's launcher. What changes is the
# *launch config*: these files, read from the package:

# %%
launch_dir = resources.files("m3d_lite.configs") / "accelerate"
rows = []
for path in sorted(launch_dir.iterdir(), key=lambda p: p.name):
    text = path.read_text()
    launch = yaml.safe_load(text)
    zero = launch.get("deepspeed_config", {}).get("zero_stage")
    sharded = f"ZeRO-{zero}" if zero else launch.get("fsdp_config", {}).get("fsdp_sharding_strategy", "—")
    prose = " ".join(line[2:] for line in text.splitlines() if line.startswith("# ") and line[2] != " ")
    purpose = prose.split(". ")[0].rstrip(".") + "."  # the first sentence of the file's comment
    row = [launch[key] for key in ("distributed_type", "num_processes", "mixed_precision")]
    rows.append([f"`{path.name}`", *row, sharded, purpose])
header = ["launch config", "kind", "processes", "precision", "sharded", "what for"]
display(Markdown(markdown_table(header, rows)))

# %% [markdown]
# The estimator said ZeRO-2 fits every stage on 80 GiB cards; on 40 GiB ones stage 2 needs ZeRO-3 or
# `--set gradient_checkpointing=true`. M3D's whole run, on the real data (`docs/REAL_DATA.md`), is then:
#
# ```bash
# LAUNCH="accelerate launch --config_file m3d_lite/configs/accelerate/8gpu_zero2.yaml -m m3d_lite.train"
# $LAUNCH clip --scale paper --data /data/M3D --out runs/clip_paper
# $LAUNCH align --scale paper --data /data/M3D --vision runs/clip_paper --out runs/align_paper
# $LAUNCH instruct --scale paper --data /data/M3D --model runs/align_paper --out runs/instruct_paper
# m3d-lite export --model runs/instruct_paper --out runs/lamed_paper   # LoRA merged: one plain checkpoint
# ```
#
# `batch_size` in the preset is per GPU, so the same lines run on any count of GPUs (change
# `--num_processes`, or use `1gpu.yaml`): the loop derives the accumulation from the global batch and
# records what it derived under `"derived"` in the run's `run.json`. bf16 comes from the launch config.
#
# **Consolidation before the LoRA merge.** Under ZeRO-3 or FSDP no GPU holds a whole weight: each holds
# 1/8 of every tensor, and the model object on a GPU has empty (zero-size) parameters between uses.
# Merging LoRA there (`W + B·A`) fails, or worse, writes empty tensors: M3D's own merge script hit exactly
# that (its issue #59). So at the end of a run the loop first *consolidates*: it gathers the full weights
# onto the main process (`accelerator.get_state_dict`), loads them into a plain copy of the model, and
# saves that. `m3d-lite export` then merges LoRA on a whole model. (Checkpoints for `--resume` stay in each
# backend's sharded format: they are for resuming, not for using.)
#
# The same path runs here, on two CPU processes talking over gloo instead of NCCL: stage 2 from a
# stand-in stage-1 model (random: we want the mechanics, not the answers), with a global batch of 8 from
# 2 samples per process, so the loop must accumulate 2 micro-batches per step.

# %%
launch_out = out_dir / "instruct_2proc"
if RUN_LAUNCH:
    stand_in = out_dir / "align_stand_in"
    save_lamed(*build_lamed(SCALE), stand_in / "model")
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(launch_dir / "cpu.yaml"), "--multi_gpu"]
    command += ["--num_processes", "2", "--main_process_port", "0"]
    command += ["-m", "m3d_lite.train", "instruct", "--scale", SCALE, "--data", str(data_dir)]
    command += ["--model", str(stand_in), "--out", str(launch_out), "--max-steps", str(LAUNCH_STEPS)]
    command += ["--set", "batch_size=2", "--set", "global_batch_size=8", "--set", "log_every=1"]
    print("ACCELERATE_USE_CPU=1", shlex.join(command))
    # ACCELERATE_USE_CPU: accelerate's multi-process launcher does not pass use_cpu on to the workers
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the launch failed:\n{done.stderr[-3000:]}")
    print("derived:", json.loads((launch_out / "run.json").read_text())["derived"])
    for line in (launch_out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        print(f"step {record['step']}: loss {record['loss']:.3f}, {record['samples_per_s']:.1f} samples/s")
else:
    print("RUN_LAUNCH = False: nothing launched (the commands for 8 GPUs are in the text above)")

# %% [markdown]
# Two processes, two micro-batches of 2 per process and step: a global batch of 8, as asked. One process
# wrote the metrics and the model (rank 0 only; the others wait). The run folder holds the model as
# stage 2 leaves it, base weights plus LoRA adapter; `export_merged` (`m3d-lite export`) folds the
# adapter in:

# %%
if RUN_LAUNCH:
    merged_dir = export_merged(launch_out, out_dir / "instruct_2proc_merged")
    print(
        sorted(p.name for p in (launch_out / "model").iterdir()),
        "->",
        sorted(p.name for p in merged_dir.iterdir()),
    )

# %% [markdown]
# ## 4. The official M3D weights
#
# M3D released its trained models on the Hugging Face Hub: M3D-CLIP (stage 0) and M3D-LaMed with Phi-3-4B
# or Llama-2-7B (stage 2). Their files follow M3D's code, not ours: other tensor names
# (`model.layers.0...` where we have `language_model.model.layers.0...`), parts we do not have (SegVol's
# point and box prompts, which M3D never uses), and a `config.json` in M3D's keys. `convert_m3d_clip` and
# `convert_m3d_lamed` (`m3d-lite convert`) read them into our classes:
#
# * every official tensor is either **mapped** to one of ours (by a short list of renaming rules) or
#   **dropped with a reason**; a tensor that is neither, a tensor missing, or a shape that does not fit
#   stops the conversion with its name;
# * nothing in the files is executed: safetensors, or `torch.load(weights_only=True)`, and no
#   `trust_remote_code`;
# * sizes are read off the tensors; head counts, which no tensor shows, are M3D's (12, and 8 in the mask
#   decoder) unless given.
#
# The Hub is not reachable everywhere (nor in this course's tests), and M3D-LaMed-Phi-3-4B is 16 GB. So,
# with `OFFICIAL_LAMED` empty, this notebook writes one of *our* models in M3D's layout, with
# `save_official_lamed`, the converters' rules run backwards, and converts that; set `OFFICIAL_LAMED =
# "GoodBaiBai88/M3D-LaMed-Phi-3-4B"` (or a downloaded folder) and the same cells convert the real one.
# The layout of the paper-scale model, from our own Phi-3 LaMed on the meta device:

# %%
with torch.device("meta"):
    paper_lamed = stage_model("align", "paper")
    paper_lamed.add_seg_module(SegConfig.from_scale("paper"))
paper_layout = official_lamed_state(paper_lamed)
groups = Counter(".".join(key.split(".")[:2]) for key in paper_layout)
print(
    f"our paper-scale LaMed in M3D's layout: {len(paper_layout)} tensors, "
    f"{sum(t.numel() for t in paper_layout.values()):,} parameters"
)
print(", ".join(f"{group} {count}" for group, count in groups.most_common()))

# %% [markdown]
# 617 tensors, as in M3D-LaMed-Phi-3-4B. One difference shows in the count of parameters: Phi-3's config
# has 32064 embedding rows, which we keep; M3D shrank them to its tokenizer's 32015 (the converter takes
# the vocabulary from the tensors, so both read in).
#
# Now the scaled-down checkpoint: the stage-2 model launched above (or a fresh one), written as M3D lays
# it out.

# %%
if RUN_LAUNCH:
    ours, our_tokenizer = load_lamed(merged_dir)
else:
    ours, our_tokenizer = build_lamed(SCALE, segmentation=True)
ours.eval()
lamed_source = OFFICIAL_LAMED or save_official_lamed(ours, our_tokenizer, out_dir / "m3d_layout_lamed")
if not OFFICIAL_LAMED:
    official_config = json.loads((lamed_source / "config.json").read_text())
    print(sorted(p.name for p in lamed_source.iterdir()))
    print(
        {
            k: official_config[k]
            for k in ("model_type", "image_size", "mm_projector_type", "segmentation_module")
        }
    )

# %% [markdown]
# Convert it. Head counts are not in the files, so a scaled-down model needs them given (M3D's releases
# use the defaults, 12 and 8):

# %%
heads = (
    {}
    if OFFICIAL_LAMED
    else {
        "vit_heads": ours.config.vision_config.num_heads,
        "decoder_heads": ours.config.seg_config.decoder_heads,
    }
)
report = convert_m3d_lamed(lamed_source, out_dir / "m3d_lamed", **heads)
print(report)

# %% [markdown]
# The report (also saved as `conversion.json`) accounts for every tensor. Four renaming rules map all of
# M3D-LaMed's names to ours, the first rule that matches winning (one example of each), and the rest is
# dropped for a stated reason:

# %%
examples = {}
for official, our in report.mapped.items():
    rule = next(pattern for pattern, _ in LAMED_RULES if re.fullmatch(pattern, official))
    examples.setdefault(rule, [f"`{official}`", f"`{our}`"])
rules = [
    [f"`{pattern}` → `{template}`", *examples[pattern]]
    for pattern, template in LAMED_RULES
    if pattern in examples
]
display(Markdown(markdown_table(["rule", "for example", "becomes"], rules)))
dropped = [
    [why, count, f"`{next(key for key, reason in report.dropped.items() if reason == why)}`"]
    for why, count in Counter(report.dropped.values()).items()
]
display(Markdown(markdown_table(["dropped because", "tensors", "the first of them"], dropped)))

# %% [markdown]
# The dropped tensors are SegVol's point, box and mask prompt encoders and its IoU head: M3D prompts the
# mask decoder with the `[SEG]` state only and keeps mask 0, so they never touch an output. (Our writer
# puts zeros there, so that the file has the release's keys.) Back in our classes, the round trip must be
# exact. One part of ours has no place in M3D's layout: the standardiser of the `[SEG]` states that stage 2
# adds (`seg_state_norm`, see notebook 05). The writer folds it into the seg projector's first Linear
# (`fold_state_norm`), which gives the same prompts, so we compare with the folded tensors:

# %%
converted, converted_tokenizer = load_model(out_dir / "m3d_lamed")
if not OFFICIAL_LAMED:
    ours_state, converted_state = fold_state_norm(ours.state_dict()), converted.state_dict()
    differences = [(ours_state[k] - converted_state[k]).abs().max().item() for k in ours_state]
    print(f"{len(ours_state)} tensors, largest difference {max(differences)}")
print(
    f"converted: {converted.config.llm_name}, {converted.config.proj_out_num} image tokens, "
    f"chat template: {converted.config.chat_template}, seg module: {converted.seg_module is not None}"
)

# %% [markdown]
# Two things M3D's layout cannot say come back as M3D's: the prompt format (M3D's own: BOS, the image
# tokens, the question, no chat template) and the sample length (512). A model trained here with a chat
# template therefore reads its prompts differently after the round trip; the real releases were trained
# in exactly this format.
#
# Now use it like any model of the course, through `m3d_lite.infer`: a test scan of the phantom, prepared
# to the model's input size, and a question. **The answer is noise**: this is a random ci LLM trained for
# a few steps (with the real weights, it is M3D's answer).

# %%
image_size = tuple(converted.config.vision_config.image_size)
scan_path = next(iter(phantom_examples(data_dir, image_size).values()))  # a test-split scan, raw NIfTI
scan = load_scan(scan_path, image_size, window="soft tissue")
segment = converted.seg_module is not None
answer = ask(
    converted,
    converted_tokenizer,
    scan,
    "Can you segment the liver in this image?",
    max_new_tokens=24,
    segment=segment,
)
masks = {"[SEG] mask": answer.mask[0]} if answer.mask is not None else None
display(viz.volume_with_text(scan.image, {"question": answer.question, "answer": answer.text}, masks=masks))

# %% [markdown]
# M3D-CLIP goes the same way: `save_official_clip` writes our CLIP in its layout (a model with M3D's
# temperature and CLS pooling, which is all its layout can express), `convert_m3d_clip` reads it back into
# `model/` (retrieval) and `vision_encoder/` (the ViT that stage 1 builds on:
# `m3d-lite train align --vision runs/m3d_clip ...`). With `OFFICIAL_CLIP = "GoodBaiBai88/M3D-CLIP"` it
# converts the release.

# %%
clip, clip_tokenizer = build_clip(SCALE, temperature="m3d", text_pooling="cls")
clip_source = OFFICIAL_CLIP or save_official_clip(clip, clip_tokenizer, out_dir / "m3d_layout_clip")
clip_report = convert_m3d_clip(clip_source, out_dir / "m3d_clip")
print(clip_report)
if (out_dir / "m3d_clip" / "model").is_dir():
    m3d_clip, m3d_clip_tokenizer = load_clip(out_dir / "m3d_clip" / "model")
    clip_scan = load_scan(scan_path, m3d_clip.config.vision_config["image_size"], window="soft tissue")
    reports = ["A cyst in the liver.", "No focal lesion.", "A stone in the left kidney."]
    text = m3d_clip_tokenizer(reports, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = m3d_clip.encode_image(clip_scan.image[None])
        similarity = image_embeds @ m3d_clip.encode_text(text.input_ids, text.attention_mask).T
    print("cosine similarity of the scan and each report:")
    print({report: round(score, 3) for report, score in zip(reports, similarity[0].tolist(), strict=True)})

# %% [markdown]
# ## Summary
# * The presets are the only difference between a laptop and eight GPUs: shapes, models, batch, global
#   batch and schedule. The global batch is kept on any number of GPUs by accumulation.
# * Activations, not weights, fill a GPU in M3D's training; gradient checkpointing is the big lever, ZeRO-3
#   the next one. Plan first (`m3d-lite plan`), and leave a margin: the estimator's memory rules were
#   checked on a CPU, within about 12 % at small.
# * One command per stage, one launch config per setup; sharded runs are consolidated before saving, so
#   the LoRA merge works on whole weights.
# * M3D's released weights convert into the course's classes with every tensor accounted for, and our
#   models can be written in M3D's layout: the round trip is exact.
#
# **Exercises to explore:** plan M3D's other model, Llama-2-7B (`plan("paper", setup, llm="llama2")`), on
# 40 GiB cards: which stages stop fitting, and is ZeRO-3 enough to bring them back? Plan stage 2 with
# `Setup(batch_size=4)` and read the batch column. Launch with `global_batch_size=6` and read the error.

# %%
print(summary())
