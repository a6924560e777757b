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
# # 03 · Stage 1: turning a scan into words an LLM can read
#
# After stage 0 a 3D ViT turns a volume into hundreds of patch tokens. An LLM reads *token embeddings*:
# vectors of its own width, one per word piece. Stage 1 of M3D builds the bridge between the two, the
# **projector**, and trains only that bridge, so that the frozen LLM starts to treat image tokens as
# something worth describing. The model that results, ViT + projector + LLM, is M3D's **LaMed**.
#
# 1. from patch tokens to a handful of image tokens (**exercise 1**: M3D's spatial pooling);
# 2. prompts with `<im_patch>` placeholders, and which tokens the loss looks at (**exercise 2**: labels);
# 3. putting the image into the LLM's input (**exercise 3**: splicing by mask);
# 4. captions before alignment, stage-1 training, and what it did and did not change;
# 5. captions after alignment, next to the volume.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small | paper
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/03_projector_alignment"  # checkpoints, metrics and figures of this notebook
VISION_DIR = ""  # stage-0 run folder; empty: notebook 02 run next to OUTPUT_DIR, else a random ViT
LLM = ""  # LLM name or folder; empty: the preset one (ci: tiny random Llama, small: SmolLM2-135M)
NUM_VOLUMES = 64  # phantom volumes (written once, shared with the other notebooks)
MAX_STEPS = 0  # optimizer steps; 0: as many as the preset says
NUM_CAPTIONS = 2  # test volumes captioned before and after alignment
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)

# %%
from pathlib import Path

import torch
from accelerate.utils import set_seed
from IPython.display import display

from m3d_lite import viz
from m3d_lite.config import TrainConfig, default_data_dir
from m3d_lite.course.checks import check_function, summary
from m3d_lite.course.handoff import stage0_encoder
from m3d_lite.data.datasets import CaptionDataset, load_volume_tensor, read_report
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.infer import generate_answers
from m3d_lite.models.lamed import build_lamed, load_lamed, splice_image_features
from m3d_lite.models.projector import ProjectorConfig, spatial_pool
from m3d_lite.models.tokenizer import IMAGE_TOKEN, build_prompt, encode_example, join_prompt_answer
from m3d_lite.models.vision import VisionConfig
from m3d_lite.train.align import train_align

torch.manual_seed(SEED)
data_dir = ensure_phantom_dataset(
    Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE), NUM_VOLUMES, SCALE, SEED
)
out_dir = Path(OUTPUT_DIR)
vision_encoder = stage0_encoder(VISION_DIR, out_dir, SCALE)

# %% [markdown]
# ## 1. From patch tokens to image tokens
#
# Stage 0's ViT reads a volume as a grid of patches and gives one token per patch: 8 × 8 × 8 = 512 here,
# 8 × 16 × 16 = 2048 at the paper's scale. That is too many for an LLM whose whole context is a few
# thousand tokens. M3D's projector (`spp`, "spatial pooling") puts the tokens back on their 3D grid,
# **averages each 2 × 2 × 2 block** (the paper's 2048 become 256, ours 512 become 64), and maps every
# pooled token with a small MLP (Linear, GELU, Linear) to the LLM's width. No attention, no learned
# queries: the image tokens keep their places in the volume, in raster order.
#
# ### Exercise 1 · spatial pooling
# Write `my_spatial_pool(tokens, grid, pooling_size)`: `tokens` is B × N × C with N = d·h·w tokens in
# raster order (depth slowest, width fastest); return the B × N' × C tokens of the grid average-pooled by
# `pooling_size` along each axis, in the same raster order. Hint: `transpose` + `reshape` to
# B × C × d × h × w, then `torch.nn.functional.avg_pool3d`.


# %%
def my_spatial_pool(tokens: torch.Tensor, grid: tuple[int, int, int], pooling_size: int) -> torch.Tensor:
    """B x N x C tokens on ``grid`` -> B x N' x C tokens of the average-pooled grid."""
    ### BEGIN SOLUTION
    batch, _, channels = tokens.shape
    volume = tokens.transpose(1, 2).reshape(batch, channels, *grid)
    pooled = torch.nn.functional.avg_pool3d(volume, kernel_size=pooling_size, stride=pooling_size)
    return pooled.flatten(2).transpose(1, 2)
    ### END SOLUTION


# %%
generator = torch.Generator().manual_seed(SEED)
my_spatial_pool = check_function(
    "03.spatial_pool",
    my_spatial_pool,
    spatial_pool,
    cases=[
        (torch.arange(8.0).reshape(1, 8, 1), (2, 2, 2), 2),
        (torch.rand(2, 4 * 4 * 4, 3, generator=generator), (4, 4, 4), 2),
        (torch.rand(1, 2 * 4 * 6, 5, generator=generator), (2, 4, 6), 2),
    ],
    hidden_cases=[(torch.rand(3, 4 * 8 * 8, 2, generator=generator), (4, 8, 8), 4)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# The number of image tokens, `proj_out_num`, follows from the ViT's grid and the pooling; nobody sets it
# by hand. Each scale's LaMed:

# %%
for scale in ("ci", "small", "paper"):
    grid = VisionConfig.from_scale(scale).grid
    projector = ProjectorConfig.from_scale(scale)
    print(
        f"{scale:>6}: patch grid {grid} = {grid[0] * grid[1] * grid[2]} tokens -> pooled by "
        f"{projector.pooling_size} -> {projector.out_num(grid)} image tokens"
    )

# %% [markdown]
# ## 2. The prompt, and what the loss looks at
#
# Now the model itself: the stage-0 ViT (without its CLS token), a fresh projector, and the LLM with four
# new tokens: `<im_patch>` (a placeholder for one image token), `<bx_start>` and `<bx_end>` (around boxes,
# notebook 04) and `[SEG]` (segmentation, notebook 05). Their embedding rows start as the mean of the
# existing rows. We seed exactly as stage-1 training does, so this is the very model training starts from.

# %%
set_seed(TrainConfig.from_scale(SCALE, "align").seed)
model, tokenizer = build_lamed(SCALE, vision_encoder=vision_encoder, llm=LLM or None)
model.eval()
config = model.config
print(
    f"LLM {config.llm_name}: {sum(p.numel() for p in model.language_model.parameters()) / 1e6:.1f} M "
    f"parameters; projector {sum(p.numel() for p in model.mm_projector.parameters()) / 1e3:.0f} k; "
    f"{config.proj_out_num} image tokens of width {config.text_config.hidden_size}"
)

# %% [markdown]
# A sample's text is the **prompt** (the image placeholders and the question, in the LLM's chat template)
# followed by the **answer** and the end-of-sequence token. M3D uses the raw string `<im_patch>…question
# answer` instead; `chat_template: false` in the preset gives exactly that. Here is a caption prompt, with
# the 64 placeholders folded into one:

# %%
captions = CaptionDataset(data_dir, "test", tokenizer, config.proj_out_num, config.model_max_length)
image_path, question, report = captions.example(0)
prompt = build_prompt(tokenizer, question, config.proj_out_num, config.chat_template)
print(prompt.replace(IMAGE_TOKEN * config.proj_out_num, f"<im_patch> x {config.proj_out_num}"))
print(f"answer: {report[:150]}...")

# %% [markdown]
# The LLM learns by predicting each next token. We want it to learn the *answer*, not to reproduce the
# question or the template, so every prompt position gets the label **-100**, which PyTorch's
# cross-entropy ignores. A long answer is cut to fit `max_length`, never the prompt: cutting an image
# placeholder would leave fewer slots than the projector has tokens.
#
# ### Exercise 2 · labels
# Write `my_join(prompt_ids, answer_ids, max_length)`: return `{"input_ids": ..., "labels": ...}`, two 1D
# LongTensors. `input_ids` is the prompt followed by the answer, cut to `max_length` tokens by dropping
# the answer's tail; `labels` is the same with every prompt position set to -100. (A prompt that leaves
# no room for a single answer token deserves a `ValueError`; the checks do not test that.)


# %%
def my_join(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> dict[str, torch.Tensor]:
    """Prompt + answer (cut to max_length) and labels that are -100 on the prompt."""
    ### BEGIN SOLUTION
    if max_length <= len(prompt_ids):
        raise ValueError(f"the prompt alone is {len(prompt_ids)} tokens, max_length is {max_length}")
    answer_ids = list(answer_ids)[: max_length - len(prompt_ids)]
    return {
        "input_ids": torch.tensor(list(prompt_ids) + answer_ids),
        "labels": torch.tensor([-100] * len(prompt_ids) + answer_ids),
    }
    ### END SOLUTION


# %%
my_join = check_function(
    "03.labels",
    my_join,
    join_prompt_answer,
    cases=[
        ([5, 6, 7], [8, 9, 2], 10),
        ([5, 6, 7], [8, 9, 2], 4),
        ([1] + [50] * 8 + [11, 12], [20, 21, 22, 23, 2], 14),
    ],
    hidden_cases=[([3], [4, 5, 6, 7], 2), ([9, 9], [2], 3)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# The library encodes whole samples the same way (`encode_example`); this is what one caption sample
# looks like around the prompt/answer boundary, token by token:

# %%
sample = encode_example(tokenizer, question, report, config.proj_out_num, config.model_max_length)
boundary = int((sample["labels"] != -100).nonzero()[0])
for position in range(boundary - 4, boundary + 6):
    token = tokenizer.convert_ids_to_tokens(int(sample["input_ids"][position]))
    print(f"{position:>4}  {token!r:>20}  label {int(sample['labels'][position]):>6}")
print(f"{len(sample['input_ids'])} tokens, {int((sample['labels'] != -100).sum())} of them in the loss")

# %% [markdown]
# ## 3. Splicing the image into the LLM's input
#
# The LLM never sees `<im_patch>` as a word. Before its first layer, the embedding of each placeholder is
# **replaced** by one image token from the projector: the first placeholder of a row gets the first
# image token, and so on. Finding the placeholders by a mask (`input_ids == image_token_id`) works
# wherever they sit, behind a chat header or left padding; M3D finds them by position instead (right
# after BOS), which breaks with any other prompt format.
#
# ### Exercise 3 · splice by mask
# Write `my_splice(embeds, input_ids, image_token_id, features)`: `embeds` is B × L × E (the LLM's token
# embeddings of `input_ids`, B × L), `features` is B × K × E with K the placeholders per row. Return a new
# B × L × E tensor where the placeholder positions of row b hold `features[b]` in order. Hint:
# `Tensor.masked_scatter`, or a loop over rows with boolean indexing.


# %%
def my_splice(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """Replace the image-placeholder embeddings of each row by that row's image features."""
    ### BEGIN SOLUTION
    is_image = (input_ids == image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(is_image, features.to(embeds.dtype))
    ### END SOLUTION


# %%
def reference_splice(embeds, input_ids, image_token_id, features):
    return splice_image_features(embeds, input_ids == image_token_id, features)


my_splice = check_function(
    "03.splice",
    my_splice,
    reference_splice,
    cases=[
        (torch.zeros(1, 5, 2), torch.tensor([[1, 7, 7, 2, 3]]), 7, torch.ones(1, 2, 2)),
        (torch.rand(2, 6, 3), torch.tensor([[0, 0, 1, 9, 9, 4], [1, 9, 9, 5, 6, 4]]), 9, torch.rand(2, 2, 3)),
        (
            torch.rand(1, 8, 4),
            torch.tensor([[1, 2, 5, 5, 5, 5, 3, 4]]),
            5,
            torch.arange(16.0).reshape(1, 4, 4),
        ),
    ],
    hidden_cases=[
        (
            torch.rand(3, 4, 2),
            torch.tensor([[8, 1, 2, 3], [1, 8, 2, 3], [1, 2, 3, 8]]),
            8,
            torch.rand(3, 1, 2),
        )
    ],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# Your splice on the real model gives exactly the embeddings the model computes itself. And a prompt with
# one placeholder too few is refused with a message that says why, instead of silently misplacing the
# image as M3D would:

# %%
volume = load_volume_tensor(image_path)
row = encode_example(tokenizer, question, report, config.proj_out_num, config.model_max_length)["input_ids"][
    None
]
with torch.no_grad():
    by_hand = my_splice(
        model.get_input_embeddings()(row), row, config.image_token_id, model.encode_images(volume[None])
    )
    by_model = model.embed_inputs(row, volume[None])
print(
    f"spliced {tuple(by_hand.shape)}; max difference from the model: {(by_hand - by_model).abs().max():.1e}"
)
first = int((row[0] == config.image_token_id).nonzero()[0])
one_short = torch.cat([row[:, :first], row[:, first + 1 :]], dim=1)
try:
    model.embed_inputs(one_short, volume[None])
except ValueError as error:
    print(f"ValueError: {error}")

# %% [markdown]
# ## 4. Before alignment
#
# What does the LLM write about a scan before stage 1? The projector is random, so the image tokens are
# noise in the LLM's embedding space. (At the ci scale the LLM itself is a random 2-layer model, so every
# text below is token soup: ci checks that the machinery runs; run this notebook with `SCALE = "small"`,
# SmolLM2 and notebook 02's small encoder for real sentences.)

# %%
test_volumes = [captions.example(i) for i in range(NUM_CAPTIONS)]
images = torch.stack([load_volume_tensor(path) for path, _, _ in test_volumes])
questions = [q for _, q, _ in test_volumes]
before = generate_answers(model, tokenizer, images, questions, max_new_tokens=48)
for (path, q, _), text in zip(test_volumes, before, strict=True):
    print(f"{path.parent.name}/{path.name}\n  Q: {q}\n  A: {text}\n")

# %% [markdown]
# ## 5. Training stage 1
#
# `train_align` builds the same model (same seed), freezes the ViT and the LLM, and trains the projector
# (plus the rows of the four new tokens, through a gradient mask) on M3D's stage-1 data: captions, closed
# and open VQA of the training split, mixed in proportion to their sizes. Weight decay must be 0, or
# AdamW would shrink frozen rows of the LM head. The training loop is the one of notebook 02.

# %%
train_config = TrainConfig.from_scale(SCALE, "align")
print(train_config)
result = train_align(
    SCALE, data_dir, vision_encoder, out_dir / "align", llm=LLM or None, max_steps=MAX_STEPS or None
)
print(f"{result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}")

# %%
viz.training_curves(result.metrics_path, keys=("loss", "lr"), title="stage 1: projector alignment")

# %% [markdown]
# What changed? Compare every tensor of the aligned model with the model before training: the projector
# moved, the embedding matrix moved only in the rows of the new tokens, and everything else, the whole
# ViT and every weight the LLM came with, is **bit-identical**.

# %%
aligned, _ = load_lamed(out_dir / "align" / "model")
aligned.eval()
new_token_ids = sorted(tokenizer.convert_tokens_to_ids(["<im_patch>", "<bx_start>", "<bx_end>", "[SEG]"]))
counts = {"vision_tower": [0, 0], "mm_projector": [0, 0], "language_model": [0, 0]}  # [changed, all]
trained = dict(aligned.named_parameters())
for name, weight in model.named_parameters():
    part = name.split(".")[0]
    differs = trained[name] != weight
    counts[part][0] += int(differs.any())
    counts[part][1] += 1
    if part == "language_model" and differs.any():
        rows = differs.any(dim=-1).nonzero().flatten().tolist()
        print(f"{name}: rows {rows} changed (the new tokens are {new_token_ids})")
for part, (changed, total) in counts.items():
    print(f"{part:>15}: {changed} of {total} tensors changed")

# %% [markdown]
# ## 6. After alignment
#
# The same test volumes and questions, now through the aligned projector, shown next to the volume and the
# reference report. (Again: at ci, a frozen random LLM cannot write a report whatever its input; the loss
# fell because the projector learned to push its outputs towards the frequent words of the answers.)

# %%
after = generate_answers(aligned, tokenizer, images, questions, max_new_tokens=48)
for i, ((path, q, _), image) in enumerate(zip(test_volumes, images, strict=True)):
    reference = read_report(captions.folder / captions.items[i].text)
    texts = {"question": q, "before": before[i], "after": after[i], "reference": reference}
    figure = viz.volume_with_text(image, texts, title=f"test volume {path.parent.name}/{path.name}")
    viz.save_figure(figure, out_dir / f"captions_{i}.png")
    display(figure)

# %% [markdown]
# ## Summary
# * The projector turns 512 (paper: 2048) patch tokens into 64 (256) image tokens by 2 × 2 × 2 average
#   pooling and a token-wise MLP; their number follows from the grid.
# * Image tokens enter the LLM by replacing the embeddings of `<im_patch>` placeholders, found by mask.
# * The loss only looks at the answer: every prompt position has the label -100.
# * Stage 1 trains the projector (and the new tokens' rows) and leaves the ViT and the LLM untouched.
#
# At the small scale (`SCALE = "small"`, SmolLM2-135M-Instruct and notebook 02's encoder) stage 1 takes
# about a quarter of an hour on two cores, and SmolLM2 starts to answer in the phantom reports' style;
# `benchmarks/align_small.py` reproduces it with five captions next to their references.
#
# **Exercises to explore:** set `LLM = "tiny-phi3"` and look at Phi-3's prompt format; train with
# `pooling_size=4` (8 image tokens: pass it to `train_align`) and compare the loss; at small scale, compare
# the captions after 50 and after 150 steps.

# %%
print(summary())
