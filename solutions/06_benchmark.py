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
# # 06 · M3D-Bench: eight tasks, one report
#
# M3D judges its model on eight tasks that cover everything the course has built: finding a scan's
# report (retrieval), writing one, answering closed and open questions, finding an organ with a box (REC),
# naming what a box holds (REG), and segmenting an organ or a described finding. This notebook runs all
# eight on the models of notebooks 02–05, with each metric in M3D's form and, where M3D's form is
# unusual, in the standard one next to it.
#
# 1. the eight tasks and their metrics;
# 2. Recall@K by hand (**exercise 1**);
# 3. a text metric by hand, checked against the library (**exercise 2**: ROUGE-1);
# 4. running the benchmark and reading its report;
# 5. M3D's published numbers as context.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small | paper
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/06_benchmark"  # benchmark results and report of this notebook
CLIP_DIR = ""  # CLIP run for retrieval; empty: notebook 02 run next to OUTPUT_DIR, else a quick one here
INSTRUCT_DIR = ""  # stage-2 run for the language tasks; empty: notebook 04 run, else a quick one here
SEG_DIR = ""  # stage-2 run for segmentation; empty: notebook 05 run, else the quick one above
NUM_VOLUMES = 64  # phantom volumes (written once, shared with the other notebooks)
LIMIT = 8  # test samples per generative task; 0: the whole test split
FORCE = False  # True: rerun tasks that already have results in OUTPUT_DIR
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)

# %%
import re
from collections import Counter
from pathlib import Path

import torch
from IPython.display import Image, Markdown, display

from m3d_lite.config import default_data_dir
from m3d_lite.course.checks import check_function, summary
from m3d_lite.course.handoff import clip_run, stage2_runs
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.eval.bench import merge_benches, run_bench
from m3d_lite.eval.metrics import rouge1
from m3d_lite.eval.report import headline_table, write_report
from m3d_lite.eval.retrieval import DIRECTIONS, recall_at_k

torch.manual_seed(SEED)
data_dir = ensure_phantom_dataset(
    Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE), NUM_VOLUMES, SCALE, SEED
)
out_dir = Path(OUTPUT_DIR)
clip = clip_run(CLIP_DIR, out_dir, SCALE, data_dir)
language_run, seg_run = stage2_runs(INSTRUCT_DIR, SEG_DIR, out_dir, SCALE, data_dir)

# %% [markdown]
# ## 1. The eight tasks
#
# | task | input → output | M3D's metric | added here |
# |---|---|---|---|
# | retrieval | volume ↔ report (CLIP) | Recall@1/5/10 both ways | — |
# | report generation | volume → findings | BLEU-1, ROUGE-1, METEOR, BERTScore | BLEU-4, ROUGE-L, judge |
# | closed VQA | question + 4 choices → letter | "answer contains 'A.'" | exact choice match |
# | open VQA | question → short answer | BLEU-1, ROUGE-1, METEOR, BERTScore | ROUGE-L |
# | REC | "where is the liver?" → box | intersection / *enclosing* box | true IoU, Acc@0.5 |
# | REG | box → "the liver" | BLEU-1, ROUGE-1, METEOR, BERTScore | class named |
# | segmentation | "segment the liver" → mask | Dice of the generated mask | teacher-forced |
# | referring segmentation | "segment the cyst ..." → mask | Dice of the generated mask | teacher-forced |
#
# Two of M3D's forms deserve a warning. Its closed-VQA rule counts an answer as right when the right
# letter followed by a period appears *anywhere* in it, so "B. liver A." passes for A. Its REC "IoU"
# divides by the box that encloses both boxes, never more than the true IoU. BERTScore here uses the
# small MiniLM encoder that works offline, not M3D's roberta-large: same idea, different numbers.
#
# ## 2. Recall@K
#
# For retrieval, each test volume ranks all test reports by similarity (and each report all volumes).
# Recall@K is the percentage of queries whose true partner ranks in the top K. Ties count *against* the
# true pair: a model that gives every pair the same score should not be rewarded by a lucky tie-break.
#
# ### Exercise 1 · Recall@K both ways
# Write `my_recall_at_k(similarity, k)`: `similarity` is N × N (rows volumes, columns reports, pair i on
# the diagonal). Return `(image_to_text, text_to_image)`, each in percent. The rank of the true partner is
# the number of candidates scoring at least as high as it (so ties count against it).


# %%
def my_recall_at_k(similarity: torch.Tensor, k: int) -> tuple[float, float]:
    """Recall@k in percent, volume -> report and report -> volume."""
    ### BEGIN SOLUTION
    true = similarity.diagonal()
    image_rank = (similarity >= true[:, None]).sum(dim=1)
    text_rank = (similarity >= true[None, :]).sum(dim=0)
    n = len(true)
    return 100.0 * int((image_rank <= k).sum()) / n, 100.0 * int((text_rank <= k).sum()) / n
    ### END SOLUTION


# %%
def reference_recall(similarity, k):
    result = recall_at_k(similarity, (k,))
    return tuple(result[direction][f"R@{k}"] for direction in DIRECTIONS)


generator = torch.Generator().manual_seed(SEED)
my_recall_at_k = check_function(
    "06.recall_at_k",
    my_recall_at_k,
    reference_recall,
    cases=[
        (torch.eye(4), 1),
        (torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.2, 0.3], [0.1, 0.2, 0.3]]), 1),
        (torch.rand(6, 6, generator=generator), 2),
    ],
    hidden_cases=[(torch.ones(3, 3), 2), (torch.rand(10, 10, generator=generator), 5)],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# ## 3. A text metric by hand
#
# ROUGE-1 compares the *words* of an answer with those of the reference: precision is the share of the
# answer's words found in the reference, recall the share of the reference's words found in the
# answer (each word counted at most as often as it appears on the other side), and ROUGE-1 is their
# harmonic mean (F1). The `rouge-score` library lowercases and keeps only letters and digits.
#
# ### Exercise 2 · ROUGE-1 F1
# Write `my_rouge1(prediction, reference)`: tokens are `re.findall(r"[a-z0-9]+", text.lower())`; return
# the F1 of clipped unigram overlap (0 when either side has no token).


# %%
def my_rouge1(prediction: str, reference: str) -> float:
    """Unigram-overlap F1 between two texts, as rouge-score's ROUGE-1."""
    ### BEGIN SOLUTION
    predicted = Counter(re.findall(r"[a-z0-9]+", prediction.lower()))
    wanted = Counter(re.findall(r"[a-z0-9]+", reference.lower()))
    overlap = sum((predicted & wanted).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(predicted.values()), overlap / sum(wanted.values())
    return 2 * precision * recall / (precision + recall)
    ### END SOLUTION


# %%
my_rouge1 = check_function(
    "06.rouge1",
    my_rouge1,
    rouge1,
    cases=[
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("A cyst in the liver.", "The liver holds a 2 cm cyst."),
        ("axial", "coronal"),
    ],
    hidden_cases=[("the the the", "the cat"), ("Left kidney, lower pole.", "lower pole of the left kidney")],
    strict=STRICT_CHECKS,
)

# %% [markdown]
# ## 4. Running the benchmark
#
# `run_bench` (and `m3d-lite bench` from a shell) loads a model once, runs each task on the test split
# with batched greedy decoding, writes one CSV of per-sample rows per task, the summaries to
# `bench.json`, and a report (`report.md`, `report.html`). A task already done is not run again, so an
# interrupted benchmark resumes where it stopped (`FORCE = True` reruns). Here: the language and box
# tasks on notebook 04's model with notebook 02's CLIP, the two segmentation tasks on notebook 05's.

# %%
limit = LIMIT or None
language = run_bench(
    language_run, data_dir, out_dir / "bench", clip_dir=clip, limit=limit, force=FORCE, progress=False
)
segmentation = run_bench(
    seg_run,
    data_dir,
    out_dir / "bench_segmentation",
    tasks=("segmentation", "referring_segmentation"),
    limit=limit,
    force=FORCE,
    progress=False,
)
runs = [(language, out_dir / "bench"), (segmentation, out_dir / "bench_segmentation")]
bench = merge_benches(runs, out_dir)
markdown_report, html_report = write_report(bench, out_dir)
print(f"report: {html_report} (and {markdown_report})")
display(Markdown(headline_table(bench)))

# %% [markdown]
# The report holds more than the table: per-question-type accuracy, example volumes with their true and
# predicted boxes, and example answers next to their references. Open `report.html` in a browser, or
# read the per-sample CSVs in `OUTPUT_DIR` to find the failures behind an average.

# %%
for picture in sorted(out_dir.glob("report_*.png")):
    display(Image(filename=picture))

# %% [markdown]
# ## 5. M3D's numbers, as context
#
# M3D-LaMed (Llama-2-7B, trained on 120 k real CT volumes with 8 GPUs) reports, on its own test set:
#
# | task | M3D-LaMed |
# |---|---|
# | retrieval R@1 (2,000-pair pool) | 19.10 % |
# | report generation METEOR | 14.38 % |
# | open VQA METEOR | 33.58 % |
# | closed VQA accuracy | 75.78 % |
# | by type: plane, phase, organ, abnormality, location | 98.8, 79.8, 74.8, 66.7, 58.9 (unchecked) |
#
# These numbers are **context, not a target for this notebook**: a different dataset (real scans and
# radiologists' reports instead of the phantom), a 50× larger LLM, and weeks of GPU time. What carries
# over is the *method*: the same eight tasks and the same metrics, so a model you train at the paper scale
# on the real M3D data can be compared with theirs line by line.
#
# ## Summary
# * M3D-Bench covers retrieval, generation, VQA, boxes and masks; each has M3D's metric, and where M3D's
#   form is unusual (closed-VQA substring rule, enclosing-box IoU) the standard one sits next to it.
# * The benchmark is resumable and writes per-sample CSVs: averages hide the failures, the rows show them.
#
# **Exercises to explore:** set `LIMIT = 0` for the whole test split; compare the closed-VQA accuracy in
# M3D's form and the exact form on the CSV rows where they disagree; score reports with an LLM judge
# (`m3d_lite.eval.judge.judge_reports`) and compare it with BLEU-1.

# %%
print(summary())
