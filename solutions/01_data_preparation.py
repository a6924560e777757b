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
# # 01 · Data preparation: from scanner volumes to M3D's model input
#
# M3D reads every scan as one array of shape **1 × 32 × 256 × 256** with values in **[0, 1]**, and reads
# its texts from four file formats (M3D-Cap, M3D-VQA, M3D-Seg, M3D-RefSeg). This notebook builds that
# path from the ground up:
#
# 1. what a 3D medical image is: voxels, spacing, orientation, Hounsfield units — on a real MRI and a real CT;
# 2. CT windowing (**exercise 1**);
# 3. the preprocessing chain: orient, window, crop to the body, resize, normalise;
# 4. **M3D-Phantom**, the synthetic abdominal CT this course trains on, written in M3D's formats;
# 5. boxes as M3D writes them (**exercise 2**), and a validator that catches broken data.
#
# Exercises: replace the `raise NotImplementedError` line with your code, then run the check cell below.

# %% tags=["parameters"]
SCALE = "ci"  # ci | small | paper: sizes come from m3d_lite/configs/<SCALE>.yaml
DATA_DIR = ""  # phantom dataset folder; empty: $M3D_LITE_DATA_DIR/phantom_<SCALE>, else ~/.cache/m3d_lite/...
OUTPUT_DIR = "runs/01_data_preparation"  # figures and prepared files of this notebook
NUM_VOLUMES = 16  # phantom volumes to write (the ci preset has 64; 16 keep this notebook fast)
SEED = 0
STRICT_CHECKS = False  # True: a failed check stops the notebook (graded runs)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from nilearn.datasets import load_mni152_template
from pydicom.data import get_testdata_file

from m3d_lite import viz
from m3d_lite.config import DataConfig, default_data_dir
from m3d_lite.course.checks import check_function, summary
from m3d_lite.data import formats, preprocess
from m3d_lite.data.phantom import ORGANS, make_case, reslice
from m3d_lite.data.phantom_dataset import write_phantom_dataset

cfg = DataConfig.from_scale(SCALE, seed=SEED)
data_dir = Path(DATA_DIR) if DATA_DIR else default_data_dir(SCALE)
out_dir = Path(OUTPUT_DIR)
out_dir.mkdir(parents=True, exist_ok=True)
print(f"scale {SCALE}: prepared volumes 1x{'x'.join(map(str, cfg.image_shape))}; data in {data_dir}")

# %% [markdown]
# ## 1. A 3D image is a grid of voxels placed in the patient
#
# A scan is a 3D array plus geometry: the **spacing** (millimetres between voxel centres along each
# axis), the **origin** and the **direction** that place the grid in the patient. m3d-lite reads every
# format with SimpleITK and turns it to one orientation (LPS) so that the array axes always mean the
# same thing: `array[z, y, x]`, z from feet to head, y from front to back, x from the patient's right
# to left.
#
# Our first image is real: the MNI152 template, an average of adult brain MRIs that ships with nilearn.

# %%
mni_path = out_dir / "mni152_t1_2mm.nii.gz"
nib.save(load_mni152_template(resolution=2), mni_path)
mri = preprocess.load_volume(mni_path)
print(
    f"array {mri.array.shape} (z, y, x), spacing {mri.spacing} mm, "
    f"intensity {mri.array.min():.0f}..{mri.array.max():.0f}"
)
viz.orthogonal_views(mri.array)

# %% [markdown]
# ## 2. CT numbers are Hounsfield units
#
# MRI intensities have no fixed scale; CT values do. A CT scanner stores integers that DICOM's
# `RescaleSlope` and `RescaleIntercept` turn into **Hounsfield units (HU)**: air −1000, fat about −100,
# water 0, soft tissue 20–80, contrast-filled vessels 150–300, bone 400–1500. Here is a real CT slice
# from pydicom's test data.

# %%
ct_file = get_testdata_file("CT_small.dcm")
ct = pydicom.dcmread(ct_file)
ct_hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
print(
    f"stored {ct.pixel_array.min()}..{ct.pixel_array.max()} -> HU {ct_hu.min():.0f}..{ct_hu.max():.0f} "
    f"(slope {ct.RescaleSlope}, intercept {ct.RescaleIntercept}); pixel spacing {ct.PixelSpacing} mm"
)
fig, (ax_img, ax_hist) = plt.subplots(1, 2, figsize=(9, 3.5))
ax_img.imshow(ct_hu, cmap="gray")
ax_img.set_title("CT slice, full HU range")
ax_img.axis("off")
ax_hist.hist(ct_hu.ravel(), bins=100)
ax_hist.set_xlabel("HU")
ax_hist.set_title("histogram")
plt.show()

# %% [markdown]
# ### Exercise 1 · HU windowing
#
# A display **window** maps a HU range `[lower, upper]` to `[0, 1]`: values below `lower` become 0,
# values above `upper` become 1, and values in between are scaled linearly. Radiologists read soft
# tissue at about `[-160, 240]`, bone at `[-450, 1050]` and lungs at `[-1350, 150]`. The window decides
# what the model can see. Write `window_hu(hu, lower, upper)`; it returns `float32`.


# %%
def window_hu(hu: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through the window [lower, upper]."""
    ### BEGIN SOLUTION
    scaled = (np.asarray(hu, dtype=np.float32) - lower) / (upper - lower)
    return np.clip(scaled, 0.0, 1.0)
    ### END SOLUTION


# %%
window_hu = check_function(
    "01.window_hu",
    window_hu,
    preprocess.window_hu,
    cases=[
        (np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), -160.0, 240.0),
        (ct_hu[:8, :8], -450.0, 1050.0),
        (np.arange(-5, 5, dtype=np.int16), -2.0, 2.0),
    ],
    hidden_cases=[(np.linspace(-2000, 2000, 17), -1350.0, 150.0), (ct_hu[40:44, 60:64], 0.0, 0.5)],
    strict=STRICT_CHECKS,
)

# %%
fig, axes = plt.subplots(1, len(preprocess.WINDOWS), figsize=(10, 3.5))
for ax, (name, (lower, upper)) in zip(axes, preprocess.WINDOWS.items(), strict=True):
    ax.imshow(window_hu(ct_hu, lower, upper), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{name} [{lower:.0f}, {upper:.0f}]")
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. The preprocessing chain
#
# M3D prepares every scan the same way: scale intensities to `[0, 1]` (a window for CT, min–max for
# other images), **crop to the foreground** so that the air around the body does not waste voxels, and
# **resize** to 32 × 256 × 256 (trilinear for images, nearest neighbour for masks so labels stay labels).
# `preprocess.prepare_file` does it for NIfTI, DICOM (a file, a multi-frame file or a series folder) and
# `.npy`; the same call is `m3d-lite data prepare` on the command line.

# %%
prepared_mri, _ = preprocess.prepare_file(mni_path, cfg.image_shape)
print(
    f"{mri.array.shape} -> {prepared_mri.image.shape}, {prepared_mri.image.dtype}, "
    f"range {prepared_mri.image.min():.2f}..{prepared_mri.image.max():.2f}"
)
viz.montage(prepared_mri.image, num_slices=8, title=f"prepared MRI {prepared_mri.image.shape}")

# %% [markdown]
# Notice what resizing did: 2 mm voxels became very anisotropic ones, because M3D resizes every scan to
# the same grid whatever its spacing. The model sees shapes, not millimetres.
#
# ## 4. M3D-Phantom: an abdominal CT with known ground truth
#
# M3D's data cannot be redistributed (M3D-Cap was taken down), so we generate our own: every phantom
# case is an abdominal CT in HU with organs, lesions, a contrast phase, an acquisition plane and a
# window, and every text of every M3D task is written from that known truth. Let us build one case.

# %%
case = make_case("phantom_demo", seed=SEED, raw_shape=cfg.raw_shape, raw_spacing=cfg.raw_spacing)
print(
    f"raw scan {case.hu.shape} at {case.spacing} mm; phase {case.findings.phase}, "
    f"plane {case.findings.plane}, window {case.findings.window}"
)
for lesion in case.findings.lesions:
    print(
        f"  lesion {lesion.lesion_id}: {lesion.kind} in the {lesion.organ} ({lesion.sublocation}), "
        f"{lesion.size_mm:.0f} mm, {lesion.attenuation}"
    )
organ_masks = {name: case.organ_labels == label for label, name in ORGANS.items()}
viz.montage(case.hu, masks=organ_masks, num_slices=6, window="soft tissue", title="raw HU with organ labels")

# %% [markdown]
# M3D-Cap's series are stacks of 2D slices in the plane they were acquired in. A coronal or sagittal
# series therefore looks different from an axial one, and that is what lets a model answer
# "In which plane is this image?".

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
for ax, plane in zip(axes, ("axial", "coronal", "sagittal"), strict=True):
    view = reslice(case.hu, plane)
    ax.imshow(window_hu(view[view.shape[0] // 2], *preprocess.WINDOWS["soft tissue"]), cmap="gray")
    ax.set_title(f"{plane}: middle slice of {view.shape}")
    ax.axis("off")
plt.show()

# %% [markdown]
# Now the whole dataset, in the four M3D formats (this takes a few seconds at `ci`). The same command
# on the terminal is `m3d-lite data phantom --out DIR --num-volumes N --scale ci --seed 0`.

# %%
summary_written = write_phantom_dataset(data_dir, num_volumes=NUM_VOLUMES, scale=SCALE, seed=SEED)
print(summary_written)

# %%
cap = formats.read_cap_json(data_dir / "M3D_Cap" / "M3D_Cap.json")
first = cap["train"][0]
print({split: len(items) for split, items in cap.items()})
print("image:", first.image)
print("report:", (data_dir / "M3D_Cap" / first.text).read_text()[:400])

# %%
vqa = pd.DataFrame(formats.read_vqa_csv(data_dir / "M3D_VQA" / "M3D_VQA_train.csv"))
vqa[vqa["Image Path"] == first.image][["Question Type", "Question", "Choice A", "Choice B", "Answer Choice"]]

# %%
refseg = pd.DataFrame(formats.read_refseg_csv(data_dir / "M3D_RefSeg" / "M3D_RefSeg_train.csv"))
refseg[["Image", "Mask_ID", "Question_Type", "Question", "Answer"]].head(4)

# %% [markdown]
# ## 5. Boxes as M3D writes them
#
# For referring expression comprehension (REC) the model answers with a box, and for REG it reads one.
# M3D turns a mask of shape D × H × W into the smallest and largest voxel index along each axis,
# **divided by the axis length** and rounded to 3 decimals, in the order
# `[d_min, h_min, w_min, d_max, h_max, w_max]`, wrapped in `<bx_start>` … `<bx_end>`, e.g.
# `<bx_start>[0.125, 0.316, 0.402, 0.781, 0.598, 0.711]<bx_end>`. The maximum is `index / size`, so it
# never reaches 1.0.
#
# ### Exercise 2 · mask → M3D box text
# Write `mask_to_box_text(mask)` for a boolean D × H × W mask. Python's `str()` of a list of rounded
# floats gives exactly M3D's spelling.


# %%
def mask_to_box_text(mask: np.ndarray) -> str:
    """M3D's box text of a non-empty D x H x W mask."""
    ### BEGIN SOLUTION
    coords = np.argwhere(mask)
    lows, highs = coords.min(axis=0), coords.max(axis=0)
    box = [round(float(i) / n, 3) for i, n in zip(lows, mask.shape, strict=True)]
    box += [round(float(i) / n, 3) for i, n in zip(highs, mask.shape, strict=True)]
    return f"<bx_start>{box}<bx_end>"
    ### END SOLUTION


# %%
def reference_box_text(mask: np.ndarray) -> str:
    return formats.box_to_text(formats.mask_to_box(mask))


# M3D-Seg stores one mask file per class: masks/mask_<k>.npy, k indexing the dataset's class list
seg = formats.read_seg_dataset(data_dir / "M3D_Seg" / "phantom" / "phantom.json")
liver_item = next(item for item in seg.splits["train"] if item.class_index == 0)  # class 0: liver
seg_image = np.load(data_dir / "M3D_Seg" / liver_item.image)
liver = np.load(data_dir / "M3D_Seg" / liver_item.label)[0]
print(liver_item)
cube = np.zeros((8, 16, 16), dtype=bool)
cube[2:5, 4:12, 1:3] = True
mask_to_box_text = check_function(
    "01.mask_to_box_text",
    mask_to_box_text,
    reference_box_text,
    cases=[(cube,), (liver,), (np.ascontiguousarray(cube[:, ::-1]),)],
    hidden_cases=[(np.pad(cube, ((5, 0), (0, 3), (2, 2))),), (np.ones((3, 7, 5), dtype=bool),)],
    strict=STRICT_CHECKS,
)

# %%
liver_box = formats.parse_box(mask_to_box_text(liver))
print(f"liver: {mask_to_box_text(liver)}")
viz.montage(seg_image, masks={"liver": liver}, boxes=[liver_box], num_slices=6, title="liver mask and box")

# %% [markdown]
# ## 6. Validate before you train
#
# Broken data fails late and silently: M3D's loaders retry a random other sample on any error, so a
# missing file is never reported. m3d-lite checks a dataset root up front and lists every problem
# (`m3d-lite data validate DIR` on the terminal).

# %%
report = formats.validate_dataset(data_dir)
print(report.counts)
print("problems:", report.problems or "none")

# %% [markdown]
# Scroll through a volume yourself: in JupyterLab the slider is live (a papermill run shows no picture
# here, since widgets need a live kernel).

# %%
viz.slice_viewer(seg_image, masks={"liver": liver})

# %% [markdown]
# ## Summary
#
# * A scan is an array plus geometry; m3d-lite reads NIfTI, DICOM and `.npy` into one orientation.
# * CT values are HU; the window decides what the model sees.
# * M3D's input is 1 × 32 × 256 × 256 in [0, 1]: window, crop, resize (nearest for masks).
# * M3D-Phantom writes the four M3D formats from known truth; boxes are normalised voxel indices.
#
# Next: `02_clip_pretraining` trains a 3D ViT on these volumes and their reports.

# %%
print(summary())
