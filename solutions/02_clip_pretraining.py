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
# # 02 · Stage 0: teaching a 3D ViT to read scans with M3D-CLIP
#
# Before an LLM can talk about a CT, something has to turn the volume into features worth talking about.
# M3D trains that something first, on its own: a **3D Vision Transformer** learns, together with a text
# encoder, which report belongs to which scan (CLIP's contrastive learning). The ViT is then reused as the
# eyes of the multimodal LLM in every later stage.
#
# 1. 3D patches and tokens (**exercise 1**: patchify a volume the way MONAI's ViT does);
# 2. the ViT and its sizes, from this laptop to the paper;
# 3. the contrastive loss (**exercise 2**: symmetric InfoNCE) and M3D's temperature;
# 4. training with the course's one training loop (accelerate);
# 5. image–text retrieval, the first M3D-Bench task, and its failure cases.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small | paper
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/02_clip_pretraining"  # checkpoints, metrics and figures of this notebook
NUM_VOLUMES = 64  # phantom volumes (written once, shared with the other notebooks)
MAX_STEPS = 0  # optimizer steps; 0: as many as the preset says
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)

# %%
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3d_lite import viz
from m3d_lite.config import TrainConfig, default_data_dir
from m3d_lite.course.checks import check_function, summary
from m3d_lite.data import formats
from m3d_lite.data.datasets import load_volume_tensor
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.eval.retrieval import evaluate_retrieval
from m3d_lite.models.clip import clip_loss, load_clip
from m3d_lite.models.vision import VisionConfig, ViT3D, patchify
from m3d_lite.train.clip import train_clip

torch.manual_seed(SEED)
data_dir = ensure_phantom_dataset(
    Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE), NUM_VOLUMES, SCALE, SEED
)
out_dir = Path(OUTPUT_DIR)
vision_config = VisionConfig.from_scale(SCALE)
print(f"scale {SCALE}: images 1x{'x'.join(map(str, vision_config.image_size))}, data in {data_dir}")

# %% [markdown]
# ## 1. A volume becomes a sequence of 3D patches
#
# A transformer reads sequences. M3D's ViT cuts each 32 × 256 × 256 volume into non-overlapping
# **4 × 16 × 16 patches** — 8 × 16 × 16 = 2048 of them — flattens each patch into a vector of
# 4·16·16 = 1024 numbers, and maps it with one Linear layer to a 768-wide **token**. At this scale the
# volume is smaller and so are the patches:

# %%
cap = formats.read_cap_json(data_dir / "M3D_Cap" / "M3D_Cap.json")
volume = load_volume_tensor(data_dir / "M3D_Cap" / cap["train"][0].image)
print(
    f"volume {tuple(volume.shape)}, patch {vision_config.patch_size}, "
    f"grid {vision_config.grid} = {vision_config.num_patches} tokens"
)
viz.montage(volume, num_slices=4, title="one training volume")

# %% [markdown]
# ### Exercise 1 · patchify
#
# Write `patchify(images, patch_size)`: `images` is B × C × D × H × W, `patch_size` is (pd, ph, pw); return
# B × N × (pd·ph·pw·C). Tokens run over the patch grid in raster order (depth slowest, width fastest);
# inside a token the values run over (p1, p2, p3, c) with the channel fastest — the order MONAI's
# "perceptron" patch embedding uses, so that its Linear layer can be applied to your output.
# Hint: `einops.rearrange` says it in one line; `reshape` + `permute` works too.


# %%
def my_patchify(images: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """B x C x D x H x W -> B x N x (pd*ph*pw*C) patch vectors in MONAI's order."""
    ### BEGIN SOLUTION
    b, c, d, h, w = images.shape
    pd, ph, pw = patch_size
    grid = images.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    # -> b, d', h', w', p1, p2, p3, c
    return grid.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(
        b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c
    )
    ### END SOLUTION


# %%
generator = torch.Generator().manual_seed(SEED)
my_patchify = check_function(
    "02.patchify",
    my_patchify,
    patchify,
    cases=[
        (torch.arange(2 * 1 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4, 4), (2, 2, 2)),
        (torch.rand(1, 2, 4, 6, 8, generator=generator), (2, 3, 4)),
        (volume[None], tuple(vision_config.patch_size)),
    ],
    hidden_cases=[(torch.rand(3, 1, 8, 4, 6, generator=generator), (4, 2, 3))],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# Your patches fed to the ViT's own patch-embedding Linear give exactly what MONAI's patch embedding
# computes (before it adds the learnable position embedding):

# %%
vit = ViT3D(vision_config).eval()
embedding = vit.patch_embedding
with torch.no_grad():
    by_hand = embedding.patch_embeddings[1](my_patchify(volume[None], vision_config.patch_size))
    by_monai = embedding(volume[None]) - embedding.position_embeddings
print(f"tokens {tuple(by_hand.shape)}; max difference from MONAI: {(by_hand - by_monai).abs().max():.2e}")

# %% [markdown]
# ## 2. The 3D ViT
#
# The tokens get a learnable **position embedding** (a patch must know where it sits), a learnable
# **CLS token** is put in front, and a stack of transformer blocks mixes them. CLIP reads the CLS token as
# the summary of the whole volume; the later stages read the patch tokens. Here are the sizes from this
# notebook's scale up to M3D's (built on PyTorch's `meta` device, so the 87 M-parameter paper model costs
# no memory):

# %%
for scale in ("ci", "small", "paper"):
    config = VisionConfig.from_scale(scale)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in ViT3D(config).parameters())
    print(
        f"{scale:>6}: image {config.image_size}, patch {config.patch_size}, {config.num_patches} tokens x "
        f"{config.hidden_size}, {config.num_layers} layers -> {parameters / 1e6:.2f} M parameters"
    )
with torch.no_grad():
    tokens = vit(volume[None])
print(f"ViT output {tuple(tokens.shape)} = batch x (CLS + {vision_config.num_patches} patches) x width")

# %% [markdown]
# ## 3. Contrastive learning
#
# A batch holds N (volume, report) pairs. Both encoders map their input to a unit vector; the N × N
# matrix of cosine similarities, multiplied by an inverse temperature τ⁻¹, is read two ways: each row is
# an N-way classification "which report is mine?" and each column "which volume is mine?". The right
# answer is always the diagonal. The **symmetric InfoNCE** loss is the mean of the two cross-entropies.
#
# ### Exercise 2 · InfoNCE
# Write `info_nce(image_embeds, text_embeds, inverse_temperature)` for N × E unit vectors; return a scalar.


# %%
def info_nce(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, inverse_temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is (image i, text i)."""
    ### BEGIN SOLUTION
    logits = inverse_temperature * image_embeds @ text_embeds.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    ### END SOLUTION


# %%
def reference_info_nce(image_embeds, text_embeds, inverse_temperature):
    return clip_loss(inverse_temperature * image_embeds @ text_embeds.T)


def unit(n: int, e: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, e, generator=torch.Generator().manual_seed(seed)), dim=-1)


info_nce = check_function(
    "02.info_nce",
    info_nce,
    reference_info_nce,
    cases=[
        (unit(4, 8, 0), unit(4, 8, 1), 14.3),
        (unit(6, 16, 2), unit(6, 16, 2), 2.66),
        (unit(3, 5, 3), unit(3, 5, 4), 1.0),
    ],
    hidden_cases=[(unit(5, 7, 9), unit(5, 7, 10), 50.0), (unit(2, 3, 11), unit(2, 3, 11), 0.5)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# With random embeddings the loss is about ln N (chance); with perfectly matched pairs it falls towards
# zero, faster the larger τ⁻¹ is:

# %%
pairs = unit(8, 32, 5)
for inverse_temperature in (2.66, 14.3, 100.0):
    random_loss = info_nce(unit(8, 32, 6), pairs, inverse_temperature)
    matched_loss = info_nce(pairs, pairs, inverse_temperature)
    print(f"τ⁻¹ = {inverse_temperature:>6}: random pairs {random_loss:.3f}, matched pairs {matched_loss:.3f}")
print(f"chance level ln 8 = {np.log(8):.3f}")

# %% [markdown]
# **M3D's temperature.** OpenAI's CLIP learns log τ⁻¹ and uses exp(log τ⁻¹), initialised at 1/0.07 = 14.3
# and clamped at 100. M3D initialises its parameter at ln(1/0.07) = 2.659 but multiplies by it *directly*,
# so its effective τ⁻¹ starts at 2.66 — a much softer softmax. m3d-lite offers both (`clip.temperature`:
# `"standard"` or `"m3d"` in the preset); the paper preset keeps M3D's, the small ones use the standard one,
# which learns faster on few steps.
#
# ## 4. Training
#
# Every stage of this course trains with the same loop (`m3d_lite/train/loop.py`, on 🤗 accelerate):
# AdamW, a cosine schedule with warm-up, gradient accumulation, mixed precision where the device has
# it, checkpoints with exact resume, and metrics appended to `metrics.jsonl`. On 8 GPUs the very same
# function runs under `accelerate launch`, and the loss all-gathers the embeddings of every process so
# that each image competes against the texts of the whole global batch.

# %%
train_config = TrainConfig.from_scale(SCALE, "clip")
print(train_config)
result = train_clip(SCALE, data_dir, out_dir / "clip", max_steps=MAX_STEPS or None, seed=SEED)
print(f"{result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}")

# %%
viz.training_curves(result.metrics_path, keys=("loss", "lr"), title="M3D-CLIP training")

# %% [markdown]
# ## 5. Image–text retrieval
#
# M3D-Bench's first task asks the CLIP model to find, for each test volume, its report among all test
# reports (**image → text**), and for each report its volume (**text → image**). Recall@K is the share of
# queries whose true partner is among the K most similar. Beware the names: M3D's code calls image → text
# "IR" and text → image "TR"; check the direction before comparing papers. We evaluate on the training
# pairs (what the model has seen) and on the held-out test pairs (what it has learned).

# %%
model, tokenizer = load_clip(out_dir / "clip" / "model")
seen = evaluate_retrieval(model, tokenizer, data_dir, split="train", pool_size=32, seed=SEED, progress=False)
held_out = evaluate_retrieval(
    model, tokenizer, data_dir, split="test", pool_size=100, seed=SEED, progress=False
)
for name, res in (("train pool", seen), ("test pool", held_out)):
    print(
        f"{name} ({res.pool_size} pairs): image->text {res.metrics['image_to_text']}, "
        f"text->image {res.metrics['text_to_image']}"
    )
viz.retrieval_matrix(seen.similarity, title=f"training pairs ({seen.pool_size}): similarity after training")

# %% [markdown]
# A matrix is an average; the failures teach more. For the test volumes whose best report is not their
# own, here is what the model preferred:

# %%
best_text = held_out.similarity.argmax(dim=1)
wrong = [i for i in range(held_out.pool_size) if best_text[i] != i]
print(f"{len(wrong)} of {held_out.pool_size} test volumes retrieve another report first")
for i in wrong[:3]:
    print(
        f"\nvolume {held_out.image_paths[i]}\n  its report : {held_out.texts[i][:160]}"
        f"\n  retrieved  : {held_out.texts[best_text[i]][:160]}"
    )

# %% [markdown]
# Phantom reports share most of their words (every case has the same organs), so the text encoder must
# learn to attend to the few words that differ: phase, plane, window and the lesions. Near-duplicate
# reports are also why retrieval can never be perfect here — two cases with no lesion in the same phase
# and plane read almost alike.
#
# ## Summary
# * A 3D ViT reads a volume as a sequence of patch tokens plus a CLS summary token.
# * CLIP aligns volume and report embeddings with a symmetric InfoNCE loss; M3D's temperature is softer
#   than OpenAI CLIP's.
# * The trained ViT is saved alone (`vision_encoder/`) for the next stage, where its patch tokens become
#   the words an LLM reads.
#
# **Exercises to explore:** train with `clip.temperature = "m3d"` (pass `temperature="m3d"` to
# `train_clip`) and compare the curves; double `MAX_STEPS`; evaluate on the train pool and explain the gap.

# %%
print(summary())
