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
# # 04 · Stage 2: instruction tuning with LoRA
#
# After stage 1 the LLM can *read* image tokens. Stage 2 teaches it to *do* things with them: write a
# report, answer multiple-choice and open questions, find an organ and answer with its **box**, and name
# what a box contains. M3D trains all of these at once, on one mixed dataset, with **LoRA** adapters on
# the LLM while the vision tower, the projector and the embeddings train in full.
#
# 1. the task mix, one example of each;
# 2. boxes as text (**exercise 1**: parse a box; **exercise 2**: box IoU);
# 3. LoRA: what it adds and where (**exercise 3**: choose the target layers);
# 4. training stage 2, and exactly which weights moved;
# 5. a gallery of answers next to the truth;
# 6. merging LoRA into a plain checkpoint that gives the same outputs.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small | paper
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/04_instruction_tuning"  # checkpoints, metrics and figures of this notebook
ALIGN_DIR = ""  # stage-1 run folder; empty: notebook 03 run next to OUTPUT_DIR, else a quick one here
ALIGN_STEPS = 20  # steps of the quick stage 1 when there is no notebook 03 run
NUM_VOLUMES = 64  # phantom volumes (written once, shared with the other notebooks)
MAX_STEPS = 0  # stage-2 optimizer steps; 0: as many as the preset says
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)

# %%
from pathlib import Path

import torch
from IPython.display import display
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from m3d_lite import viz
from m3d_lite.config import TrainConfig, default_data_dir
from m3d_lite.course.checks import check_function, summary
from m3d_lite.course.handoff import stage1_run
from m3d_lite.data.formats import parse_box
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.eval.boxes import box_iou, m3d_box_iou
from m3d_lite.infer import generate_answers
from m3d_lite.models.lamed import build_lamed, load_lamed
from m3d_lite.models.lora import LoraSettings, export_merged, load_lamed_lora, lora_targets, merge_lora
from m3d_lite.train.instruct import INSTRUCTION_TASKS, instruction_data, train_instruct

torch.manual_seed(SEED)
data_dir = ensure_phantom_dataset(
    Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE), NUM_VOLUMES, SCALE, SEED
)
out_dir = Path(OUTPUT_DIR)
align_run = stage1_run(ALIGN_DIR, out_dir, SCALE, data_dir, ALIGN_STEPS)
model, tokenizer = load_lamed(align_run / "model")
config = model.config
print(f"stage-1 model: {align_run / 'model'} ({config.llm_name}, {config.proj_out_num} image tokens)")

# %% [markdown]
# ## 1. The task mix
#
# M3D's stage 2 concatenates every task's dataset and lets the shuffling sampler draw from the whole:
# a task is seen in proportion to its size. Captions and VQA come from M3D-Cap and M3D-VQA as in stage 1;
# **REC** (referring expression comprehension: "where is the liver?" -> a box) and **REG** (generation:
# "what is in this box?" -> a name) come from the segmentation masks of M3D-Seg, four samples per image
# and class: by class name and by a definition of the class, absent classes answered "there is no ...".
# Every training volume also gets M3D's augmentation (90° rotations, flips, intensity jitter), and boxes
# are computed *after* it, from the augmented mask.

# %%
mix = instruction_data(data_dir, "train", tokenizer, config.proj_out_num, config.model_max_length)
for task, dataset in zip(INSTRUCTION_TASKS, mix.datasets, strict=True):
    share = len(dataset) / len(mix)
    print(f"{task:>18}: {len(dataset):>5} samples ({share:.0%} of the mix)")
print(f"{'total':>18}: {len(mix):>5}")

# %%
for task, dataset in zip(INSTRUCTION_TASKS, mix.datasets, strict=True):
    item = dataset[0]
    print(f"[{task}] Q: {item['question']}\n{' ' * (len(task) + 3)}A: {item['answer'][:150]}\n")

# %% [markdown]
# ## 2. Boxes as text
#
# An LLM writes text, so M3D writes a box as text: the first and last voxel index of the mask along
# depth, height and width, each divided by that axis's size and rounded to 3 decimals,
# `[d0, h0, w0, d1, h1, w1]`, between the two new tokens `<bx_start>` and `<bx_end>`. The digits are
# ordinary text tokens. Here is an REC sample and its box drawn on the volume:

# %%
rec = mix.datasets[INSTRUCTION_TASKS.index("REC")]
positive = next(i for i in range(len(rec)) if not torch.isnan(rec[i]["box"]).any())
item = rec[positive]
texts = {"question": item["question"], "answer": item["answer"]}
viz.volume_with_text(item["images"], texts, boxes={item["class_name"]: item["box"].tolist()})

# %% [markdown]
# ### Exercise 1 · read a box back
# Write `my_parse_box(text)`: return the first box in `text` as a tuple of 6 floats, or `None` when
# there is none. A box is `[` six numbers separated by commas (spaces allowed) `]`; the numbers may be
# negative or have decimals. Anything else (five numbers, words inside) is not a box. Hint: `re`.


# %%
def my_parse_box(text: str) -> tuple[float, ...] | None:
    """The first [a, b, c, d, e, f] box in ``text`` as 6 floats, else None."""
    ### BEGIN SOLUTION
    import re

    number = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    match = re.search(r"\[\s*" + r"\s*,\s*".join([number] * 6) + r"\s*\]", text)
    return None if match is None else tuple(float(v) for v in match.groups())
    ### END SOLUTION


# %%
my_parse_box = check_function(
    "04.parse_box",
    my_parse_box,
    parse_box,
    cases=[
        ("Coordinates are <bx_start>[0.125, 0.316, 0.402, 0.781, 0.598, 0.711]<bx_end>.",),
        ("Sorry, there is no liver in this image.",),
        ("[0.1, 0.2, 0.3, 0.4, 0.5] is five numbers; [1,2,3,4,5,6] is a box",),
    ],
    hidden_cases=[("two: [0, 0, 0, 1, 1, 1] and [0.5, 0.5, 0.5, 0.6, 0.6, 0.6]",), ("[a, b, c, d, e, f]",)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# How good is a predicted box? The usual answer is the **IoU**, intersection over union: the volume
# both boxes share divided by the volume either covers. 1 is a perfect box, 0 a box elsewhere;
# "accuracy at 0.5" counts boxes with IoU ≥ 0.5.
#
# ### Exercise 2 · 3D box IoU
# Write `my_box_iou(a, b)` for two boxes `[d0, h0, w0, d1, h1, w1]` (starts ≤ ends). Two identical boxes
# of zero volume have IoU 1.


# %%
def my_box_iou(a: list[float], b: list[float]) -> float:
    """Intersection volume / union volume of two 3D boxes."""
    ### BEGIN SOLUTION
    inter = 1.0
    for i in range(3):
        inter *= max(0.0, min(a[i + 3], b[i + 3]) - max(a[i], b[i]))
    volume_a = (a[3] - a[0]) * (a[4] - a[1]) * (a[5] - a[2])
    volume_b = (b[3] - b[0]) * (b[4] - b[1]) * (b[5] - b[2])
    union = volume_a + volume_b - inter
    if union == 0:
        return 1.0 if list(a) == list(b) else 0.0
    return inter / union
    ### END SOLUTION


# %%
my_box_iou = check_function(
    "04.box_iou",
    my_box_iou,
    box_iou,
    cases=[
        ([0, 0, 0, 0.5, 0.5, 0.5], [0, 0, 0, 0.5, 0.5, 0.5]),
        ([0, 0, 0, 0.5, 0.5, 0.5], [0.25, 0, 0, 0.75, 0.5, 0.5]),
        ([0, 0, 0, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.9, 0.9, 0.9]),
    ],
    hidden_cases=[([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.2, 0.1, 0.3, 0.5, 0.4, 0.7]), ([0.5] * 6, [0.5] * 6)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# **M3D's "IoU" is not this one.** Its evaluation divides the intersection by the volume of the box that
# *encloses* both boxes, not by their union. That is never larger than the IoU, and much smaller for two
# boxes that overlap diagonally. Its REC numbers and ours are therefore not comparable unless the same
# formula is used; the benchmark (notebook 06) reports both.

# %%
a, b = [0, 0, 0, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.75, 0.75, 0.75]
print(f"IoU {box_iou(a, b):.4f} (1/15), M3D's enclosing-box ratio {m3d_box_iou(a, b):.4f} (1/27)")

# %% [markdown]
# ## 3. LoRA
#
# Fine-tuning every weight of a 3.8 B-parameter LLM needs an optimizer state three times its size. LoRA
# freezes a weight matrix W (out × in) and learns a low-rank update next to it: W x + (α / r) · B A x,
# with A (r × in) and B (out × r), B starting at zero so that training starts from the frozen model. Only
# A and B train: r · (in + out) numbers instead of in · out. After training, B A can be added into W once
# ("merging"), and the model is a plain one again.
#
# Where to put adapters? M3D puts one on every Linear layer of the LLM (attention and MLP), and nowhere
# else: not the LM head, not the vision tower or projector, which stage 2 trains in full anyway.
#
# ### Exercise 3 · LoRA targets
# Write `my_lora_targets(model)`: the full names (as in `model.named_modules()`) of every `nn.Linear` of
# `model.language_model` except its LM head (`model.language_model.get_output_embeddings()`), in module
# order. One rule that works for every architecture: Llama has `q_proj, k_proj, v_proj, o_proj, gate_proj,
# up_proj, down_proj`; Phi-3 fuses them into `qkv_proj` and `gate_up_proj`.


# %%
def my_lora_targets(model: nn.Module) -> list[str]:
    """Names of the LLM's Linear layers, LM head excluded."""
    ### BEGIN SOLUTION
    head = model.language_model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if name.startswith("language_model.") and isinstance(module, nn.Linear) and module is not head
    ]
    ### END SOLUTION


# %%
torch.manual_seed(SEED)
phi3_model, _ = build_lamed("ci", llm="tiny-phi3")
my_lora_targets = check_function(
    "04.lora_targets",
    my_lora_targets,
    lora_targets,
    cases=[(model,)],
    hidden_cases=[(phi3_model,)],
    strict=STRICT_CHECKS,
)


# %%
def lora_budget(llm: nn.Module, r: int) -> tuple[int, int, int]:
    """(target layers, weights they hold, weights LoRA of rank r adds) for every Linear but the LM head."""
    head = llm.get_output_embeddings()
    linears = [m for m in llm.modules() if isinstance(m, nn.Linear) and m is not head]
    covered = sum(m.weight.numel() for m in linears)
    return len(linears), covered, sum(r * (m.in_features + m.out_features) for m in linears)


lora = LoraSettings.from_scale(SCALE)
with torch.device("meta"):  # Phi-3-mini's shapes, no memory
    phi3_mini = Phi3ForCausalLM(Phi3Config())
for name, llm, r in (
    (f"{SCALE}: {config.llm_name}", model.language_model, lora.r),
    ("paper: Phi-3-mini", phi3_mini, 16),
):
    layers, covered, added = lora_budget(llm, r)
    print(f"{name}: {layers} target layers, {covered / 1e6:,.2f} M weights;", end=" ")
    print(f"LoRA r={r} adds {added / 1e6:,.3f} M ({added / covered:.2%})")
print(f"targets here: {lora_targets(model)[:3]} ...")

# %% [markdown]
# ## 4. Training stage 2
#
# `train_instruct` loads the stage-1 model *completely* (M3D's stage 2 silently drops the embedding rows
# stage 1 trained; ours checks that every weight was restored), wraps it with peft's LoRA, makes the
# vision tower, projector and embeddings trainable, and runs the same training loop as before.

# %%
print(TrainConfig.from_scale(SCALE, "instruct"), lora, sep="\n")
result = train_instruct(  # the three segmentation tasks join the mix in notebook 05
    SCALE, data_dir, align_run, out_dir / "instruct", segmentation=False, max_steps=MAX_STEPS or None
)
print(f"{result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}")
viz.training_curves(result.metrics_path, keys=("loss", "lr"), title="stage 2: instruction tuning")

# %% [markdown]
# Which weights moved? LoRA's A and B, and everything trained in full; the LLM's own weights are exactly
# those it came with:

# %%
tuned, _ = load_lamed_lora(out_dir / "instruct")
before = dict(model.named_parameters())
moved, kept = {}, {}
for name, weight in tuned.get_base_model().named_parameters():
    part = "LoRA" if "lora_" in name else name.split(".")[0]
    key = name.replace(".base_layer", "")
    changed = "lora_" in name or not torch.equal(weight, before[key])
    (moved if changed else kept)[part] = (moved if changed else kept).get(part, 0) + 1
print(f"tensors that changed: {moved}")
print(f"tensors that did not: {kept}")

# %% [markdown]
# ## 5. Answers next to the truth
#
# One test volume per task, greedy decoding. (At the ci scale the LLM is a tiny random model and stage 2
# runs a few dozen steps: expect the *form* of the answers, a letter for closed VQA, a box for REC, to
# appear before their content is right. `SCALE = "small"` with SmolLM2 gives real answers.)

# %%
merged = merge_lora(tuned).eval()
test_mix = instruction_data(data_dir, "test", tokenizer, config.proj_out_num, config.model_max_length)
for task, dataset in zip(INSTRUCTION_TASKS, test_mix.datasets, strict=True):
    item = dataset[0]
    [answer] = generate_answers(
        merged, tokenizer, item["images"][None], [item["question"]], max_new_tokens=48
    )
    boxes = {}
    if task.startswith("REC") and not torch.isnan(item["box"]).any():
        boxes["true box"] = item["box"].tolist()
        predicted = parse_box(answer)
        if predicted is not None:
            boxes[f"predicted (IoU {box_iou(predicted, boxes['true box']):.2f})"] = predicted
    texts = {"question": item["question"], "answer": answer, "truth": item["answer"][:300]}
    figure = viz.volume_with_text(item["images"], texts, boxes=boxes, title=task)
    viz.save_figure(figure, out_dir / f"gallery_{task.replace(' ', '_')}.png")
    display(figure)

# %% [markdown]
# ## 6. Merge and export
#
# For inference, the adapter is folded into the LLM's weights and the model saved as a plain LaMed
# checkpoint: one folder any `from_pretrained` reads, with no peft needed. The merged model computes
# what the adapter model computed, up to float rounding:

# %%
exported = export_merged(out_dir / "instruct", out_dir / "merged")
plain, _ = load_lamed(exported)
adapter_model, _ = load_lamed_lora(out_dir / "instruct")
item = test_mix.datasets[0][0]
batch = {"images": item["images"][None], "input_ids": item["input_ids"][None]}
with torch.no_grad():
    difference = (plain.eval()(**batch).logits - adapter_model.eval()(**batch).logits).abs().max()
print(f"exported to {exported}; max |logit difference| merged vs adapter: {difference:.2e}")
print("the same export from a shell: m3d-lite export --model", out_dir / "instruct", "--out", exported)

# %% [markdown]
# ## Summary
# * Stage 2 mixes every task in one dataset; REC and REG come from segmentation masks, with boxes as text.
# * A box answer is scored by IoU; M3D's "IoU" uses the enclosing box and is not comparable with it.
# * LoRA trains a low-rank update on every Linear layer of the LLM, a small share of its weights; the ViT,
#   projector and embeddings train in full; merging gives back a plain model with the same outputs.
#
# **Exercises to explore:** set `task_weights` in `train_instruct` to train only REC (weights
# `[0, 0, 0, 1, 1, 0, 0]`) and watch the box IoU; change the LoRA rank (`r=4`, `r=32`) and compare
# parameter counts and loss.

# %%
print(summary())
