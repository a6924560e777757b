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
# # 05 · Segmentation through the `[SEG]` token
#
# An LLM writes tokens; a mask is a million voxels. M3D connects the two with one extra word: when the
# model answers "The liver is [SEG].", the LLM's hidden state at that moment becomes the **prompt** of a
# 3D mask decoder (SegVol's), which paints the voxels. The LLM decides *whether* and *what* to segment; the
# decoder decides *where*.
#
# 1. segmentation and referring-segmentation questions, and their masks;
# 2. which hidden state becomes the prompt (**exercise 1**);
# 3. the promptable 3D mask decoder, from this laptop to the paper;
# 4. Dice and BCE (**exercise 2**: M3D's soft Dice);
# 5. training stage 2 on the segmentation tasks, and overlays of predicted vs true masks.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small | paper
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/05_segmentation"  # checkpoints, metrics and figures of this notebook
ALIGN_DIR = ""  # stage-1 run folder; empty: notebook 03 run next to OUTPUT_DIR, else a quick one here
ALIGN_STEPS = 20  # steps of the quick stage 1 when there is no notebook 03 run
NUM_VOLUMES = 64  # phantom volumes (written once, shared with the other notebooks)
MAX_STEPS = 0  # stage-2 optimizer steps; 0: as many as the preset says
NUM_EXAMPLES = 3  # test cases shown with their masks
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)
LAUNCH_DEMO = False  # True: open the web demo of the trained model at the end (pip install "m3d-lite[demo]")

# %%
from pathlib import Path

import torch
from IPython.display import display
from monai.metrics import compute_dice

from m3d_lite import viz
from m3d_lite.config import default_data_dir
from m3d_lite.course.checks import check_function, summary
from m3d_lite.course.handoff import stage1_run
from m3d_lite.data import text
from m3d_lite.data.datasets import InstructCollator
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.data.seg_data import RefSegDataset, SegTaskDataset
from m3d_lite.infer import generate_with_masks, load_model
from m3d_lite.models.lamed import load_lamed
from m3d_lite.models.seg_pathway import seg_token_states
from m3d_lite.models.segmentation import SegConfig, SegModule, seg_losses
from m3d_lite.train.instruct import INSTRUCTION_TASKS, SEGMENTATION_TASKS, train_instruct

torch.manual_seed(SEED)
data_dir = ensure_phantom_dataset(
    Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE), NUM_VOLUMES, SCALE, SEED
)
out_dir = Path(OUTPUT_DIR)
align_run = stage1_run(ALIGN_DIR, out_dir, SCALE, data_dir, ALIGN_STEPS)
model, tokenizer = load_lamed(align_run / "model")
config = model.config
print(f"stage-1 model: {align_run / 'model'} ({config.llm_name})")

# %% [markdown]
# ## 1. Questions whose answer is a mask
#
# Three tasks join the stage-2 mix (M3D's `MultiSegDataset`):
# * **semantic segmentation** from M3D-Seg: "Can you segment the liver?" -> "The liver is [SEG]." with the
#   liver's mask; the same by a *definition* of the organ; and for an organ that is absent, an answer
#   without `[SEG]` ("there is no ...") and no mask;
# * **referring segmentation** from M3D-RefSeg: a free-form question about one specific finding ("the
#   cyst in the left lobe of the liver") whose answer holds `[SEG]` and some explanation.

# %%
seg_tasks = SegTaskDataset(data_dir, "test", tokenizer, config.proj_out_num, config.model_max_length)
refseg = RefSegDataset(data_dir, "test", tokenizer, config.proj_out_num, config.model_max_length)
print(f"test split: {len(seg_tasks)} segmentation samples, {len(refseg)} referring-segmentation samples")
for item in (seg_tasks[0], refseg[0]):
    texts = {"question": item["question"], "answer": item["answer"]}
    display(viz.volume_with_text(item["images"], texts, masks={"target": item["seg_mask"][0].numpy()}))

# %% [markdown]
# ## 2. Which hidden state becomes the prompt?
#
# During training the answer is in the input, `... The liver is [SEG] . <end>`. Position t of the LLM's last
# layer predicts token t + 1, so the state that "decides" to write `[SEG]` sits one position *before* it.
# M3D (after LISA) takes exactly that state; several `[SEG]` in one answer are averaged; a row without
# `[SEG]` gets no mask.
#
# ### Exercise 1 · pick the `[SEG]` states
# Write `my_seg_states(hidden, input_ids, seg_token_id)`: `hidden` is B × L × H (the last layer's states),
# `input_ids` B × L. Return `(states, has_seg)`: B × H, the mean of the states at the positions whose
# *next* token is `[SEG]` (zeros for a row without one), and a B bool tensor, True where a row has one.


# %%
def my_seg_states(
    hidden: torch.Tensor, input_ids: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean hidden state of the positions that predict [SEG], per row, and whether a row has any."""
    ### BEGIN SOLUTION
    predicts = torch.zeros_like(input_ids, dtype=torch.bool)
    predicts[:, :-1] = input_ids[:, 1:] == seg_token_id
    weights = predicts.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(1)
    return (hidden * weights).sum(1) / counts.clamp(min=1), counts.squeeze(-1) > 0
    ### END SOLUTION


# %%
generator = torch.Generator().manual_seed(SEED)
my_seg_states = check_function(
    "05.seg_states",
    my_seg_states,
    seg_token_states,
    cases=[
        (torch.arange(12.0).reshape(1, 4, 3), torch.tensor([[1, 2, 9, 3]]), 9),
        (torch.rand(2, 6, 4, generator=generator), torch.tensor([[1, 9, 2, 9, 3, 4], [1, 2, 3, 4, 5, 6]]), 9),
        (torch.rand(1, 3, 2, generator=generator), torch.tensor([[9, 1, 2]]), 9),  # [SEG] first: no predictor
    ],
    hidden_cases=[
        (torch.rand(3, 5, 2, generator=generator), torch.tensor([[9] * 5, [1, 9, 9, 1, 1], [1] * 5]), 9)
    ],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# ### Why the answer names its target
# M3D's answers are "It is [SEG].", "Sure, the segmentation result is [SEG]." and the like: the state that
# predicts `[SEG]` then follows the same few words whatever was asked, and only a large LLM carries "liver"
# from the question into it. In SmolLM2-135M, before any training, the organ asked for is 4 % of that
# state's variance, the answer's wording the rest (`benchmarks/seg_prompt_probe.py`); every organ gets
# nearly the same prompt, the decoder learns one average mask, and the masks come out empty. Our answers
# name the target right before `[SEG]` ("The liver is [SEG].", "This is the cyst in the left lobe of the
# liver: [SEG]."), and the organ becomes 22 % of it. `evaluate_segmentation` reports the symptom as
# `prompt_cosine`: the mean cosine similarity of the prompts of different organs, which must stay well
# below 1 for masks to differ.

# %%
print("M3D's answers:", text.M3D_SEG_ANSWERS)
print("ours:         ", text.SEG_ANSWERS)

# %% [markdown]
# A second, smaller fix sits between the LLM and the projector. An LLM's last-layer states share a large
# common part: a few dimensions are huge and the same for every question. A fresh `seg_projector` trained
# on them turns every organ into nearly the same prompt (cosine 0.91 and test Dice 0.14 after 300 steps of
# `benchmarks/seg_decoder.py --prompts seg` on the small stage-1 model). Stage 2 therefore adds
# `seg_state_norm` (not in M3D): each dimension of the `[SEG]` states is standardised with the mean and
# std measured once on 64 training items of the stage-1 model. The same run then gives prompts of cosine
# 0.49 and Dice 0.20.
# (`m3d-lite train instruct --raw-seg-states` trains without it, as M3D does.)

# %% [markdown]
# In generation there is no answer yet: the model writes it token by token, and the states that
# generated each token are collected as it goes. A `[SEG]` as the very *first* new token is predicted by
# the prompt's last state; M3D's generation never looks there and silently returns no mask for such an
# answer. `LaMedForCausalLM.generate(..., seg_enable=True)` handles it (see `m3d_lite/models/seg_pathway.py`).
#
# ## 3. The promptable 3D mask decoder
#
# The decoder is SegVol's, as in M3D: its **own** 3D ViT encodes the volume (M3D does not reuse the LLM's
# vision tower here), the prompt becomes one token, a small two-way transformer lets that token and the
# image tokens attend to each other, transposed convolutions upsample the image tokens, and a
# hypernetwork turns the prompt token into a per-voxel dot product: the mask logits, upsampled to the
# input size.

# %%
for scale in ("ci", "small", "paper"):
    seg_config = SegConfig.from_scale(scale)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in SegModule(seg_config).parameters())
    print(
        f"{scale:>6}: image {seg_config.image_size}, ViT {seg_config.num_layers} x {seg_config.hidden_size}, "
        f"decoder depth {seg_config.decoder_depth} -> {parameters / 1e6:.2f} M parameters"
    )
seg_config = SegConfig.from_scale(SCALE)
decoder = SegModule(seg_config).eval()
with torch.no_grad():
    logits = decoder(seg_tasks[0]["images"][None], torch.randn(1, seg_config.embed_dim))
print(f"one volume + one prompt -> logits {tuple(logits.shape)}")

# %% [markdown]
# ## 4. Dice and BCE
#
# Masks are mostly background, so counting right voxels says little. **Dice** measures overlap:
# 2|P ∩ G| / (|P| + |G|), 1 for a perfect mask. Training needs it differentiable, so M3D uses a *soft* Dice
# on the probabilities p = sigmoid(logits) of each sample: 1 − 2 Σ p·g / (Σ p + Σ g + 1), averaged over
# the batch (the +1 keeps an empty mask from dividing by zero). It is added to the voxel-wise binary
# cross-entropy (BCE) and to the language-model loss, all with weight 1, and only on rows that have a
# mask and a `[SEG]`.
#
# ### Exercise 2 · M3D's soft Dice loss
# Write `my_soft_dice(logits, targets)` for B × 1 × D × H × W tensors, following the formula above.


# %%
def my_soft_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - 2 sum(p g) / (sum p + sum g + 1), p = sigmoid(logits), per sample."""
    ### BEGIN SOLUTION
    p = logits.sigmoid().flatten(1)
    g = targets.flatten(1).to(p.dtype)
    return (1 - 2 * (p * g).sum(1) / (p.sum(1) + g.sum(1) + 1)).mean()
    ### END SOLUTION


# %%
def reference_dice(logits, targets):
    return seg_losses(logits, targets)["dice"]


def volume_pair(seed: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 1, size, size, size)
    return torch.randn(shape, generator=gen), (torch.rand(shape, generator=gen) > 0.7).float()


my_soft_dice = check_function(
    "05.soft_dice",
    my_soft_dice,
    reference_dice,
    cases=[volume_pair(0), volume_pair(1, 4), (torch.full((1, 1, 2, 2, 2), 10.0), torch.ones(1, 1, 2, 2, 2))],
    hidden_cases=[volume_pair(2, 3), (torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# ## 5. Training on the segmentation tasks
#
# `train_instruct` gives the stage-1 model a fresh mask decoder and `[SEG]` projector (M3D too adds its
# SegVol module at stage 2) and trains them, the LoRA adapters and the rest as in notebook 04. Here the
# task weights keep only the three segmentation tasks, so that a short run is all about masks; the
# course's full stage 2 mixes all ten.
#
# Two choices stand in for SegVol's pretrained weights, which M3D starts from: the decoder's image
# encoder starts as a copy of the vision tower (the CLIP encoder of notebook 02; same geometry, no CLS
# token), and the preset's `module_learning_rates` can give `seg_module` and `seg_projector`, trained
# from scratch, a higher learning rate than the LoRA adapters (the `small` preset: 1e-3 against 2e-4).

# %%
weights = [0.0] * len(INSTRUCTION_TASKS) + [1.0] * len(SEGMENTATION_TASKS)
result = train_instruct(
    SCALE, data_dir, align_run, out_dir / "seg", task_weights=weights, max_steps=MAX_STEPS or None
)
print(f"{result.steps} steps in {result.seconds:.0f} s, final loss (LM + Dice + BCE) {result.final_loss:.3f}")
viz.training_curves(result.metrics_path, keys=("loss", "lr"), title="stage 2 on the segmentation tasks")

# %% [markdown]
# ## 6. Predicted vs true masks
#
# Two ways to look at the trained model on test cases:
# * **teacher-forced**: the true answer (with its `[SEG]`) goes in, and the decoder paints the mask from
#   the state that predicted `[SEG]`: how good the masks are when the LLM does say `[SEG]`;
# * **generated**: the model writes its own answer; a mask comes only if it writes `[SEG]`. (At the ci
#   scale the tiny LLM may not: the teacher-forced masks still show what the decoder learned.)

# %%
tuned, _ = load_model(out_dir / "seg")
collate = InstructCollator(tokenizer)
cases = [seg_tasks[i] for i in range(len(seg_tasks)) if seg_tasks[i]["seg_mask"].any()][: NUM_EXAMPLES - 1]
cases.append(refseg[0])
for i, item in enumerate(cases):
    with torch.no_grad():
        probability = tuned(**collate([item])).seg_logits.sigmoid()
    [answer], [generated] = generate_with_masks(
        tuned, tokenizer, item["images"][None], [item["question"]], 24
    )
    truth = item["seg_mask"][None].bool()
    forced = probability > 0.5
    dice = compute_dice(forced.float(), truth.float(), ignore_empty=False).item()
    inside, outside = probability[truth].mean().item(), probability[~truth].mean().item()
    print(f"case {i}: Dice {dice:.2f}; mean probability inside the true mask {inside:.3f}, out {outside:.3f}")
    masks = {"true": truth[0, 0].numpy(), f"teacher-forced (Dice {dice:.2f})": forced[0, 0].numpy()}
    if generated is not None:
        masks["generated"] = generated[0].numpy()
    texts = {"question": item["question"], "answer": answer, "truth": item["answer"]}
    figure = viz.volume_with_text(item["images"], texts, masks=masks, title=f"test case {i}")
    viz.save_figure(figure, out_dir / f"masks_{i}.png")
    display(figure)

# %% [markdown]
# At the ci scale, a few dozen steps teach the decoder *where to look* before they teach it to be sure:
# the probability inside the true mask rises above the probability outside it well before it crosses
# 0.5, so the thresholded Dice can still be 0. Give it more steps (`MAX_STEPS`), or the small scale.

# %% [markdown]
# From a shell, the same model segments any scan and writes the mask on the scan's own grid, so that it
# overlays the input in any viewer:
#
# ```
# m3d-lite infer --model runs/05_segmentation/seg --image scan.nii.gz --window "soft tissue" \
#     --question "Can you segment the liver?" --segment --out runs/infer
# ```
#
# ## Summary
# * `[SEG]` is an ordinary word for the LLM; the state that predicts it is the mask decoder's prompt.
# * The decoder (SegVol's) has its own 3D ViT, a two-way transformer and a hypernetwork dot product.
# * Training adds soft Dice and BCE to the language-model loss, only on rows with a mask and a `[SEG]`.
#
# **Exercises to explore:** train with all ten tasks (`task_weights=None`) and compare the Dice; set
# `MAX_STEPS` higher and watch the teacher-forced masks sharpen; ask the model about an organ that the
# phantom leaves out (the gallbladder after cholecystectomy) and check that it answers without `[SEG]`.

# %%
print(summary())

# %% [markdown]
# ## Try it in a web page
#
# The model you just trained, in the page of `m3d-lite demo`: upload a scan or pick a phantom test volume,
# ask for a mask (task "segmentation"), scroll through the three planes, download the mask as a NIfTI that
# overlays the scan. Set `LAUNCH_DEMO = True` to open it below (it keeps serving while the kernel runs);
# from a shell, `m3d-lite demo --model <OUTPUT_DIR>/seg` serves the same page.

# %%
if LAUNCH_DEMO:
    from m3d_lite.demo.app import build_demo, serve
    from m3d_lite.demo.inputs import phantom_examples

    examples = phantom_examples(data_dir, config.vision_config.image_size)
    serve(build_demo(tuned, tokenizer, examples, title="05 · the model trained here"), block=False)
