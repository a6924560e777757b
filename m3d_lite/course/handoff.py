"""What one course notebook hands to the next: the run folders of the earlier stages.

Each notebook writes its runs under ``OUTPUT_DIR`` (``runs/<notebook>/`` in ``make course``); a later
notebook looks for them next to its own ``OUTPUT_DIR``, and when they are missing (a notebook run alone,
a test) trains a quick stand-in, so that every notebook also runs on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from m3d_lite.config import DataConfig
from m3d_lite.models.vision import VisionConfig
from m3d_lite.train.align import train_align

CLIP_NOTEBOOK = "02_clip_pretraining"
ALIGN_NOTEBOOK = "03_projector_alignment"


def stage0_encoder(
    vision_dir: str | os.PathLike | None, out_dir: str | os.PathLike, scale: str
) -> Path | None:
    """The stage-0 ``vision_encoder/`` folder a notebook builds on: from the run ``vision_dir`` when given,
    else from notebook 02's ``clip`` run next to ``out_dir``; None (a random ViT) when there is none.
    An encoder trained on another volume size than ``scale``'s is an error naming both. Prints which."""
    run = Path(vision_dir) if vision_dir else Path(out_dir).parent / CLIP_NOTEBOOK / "clip"
    encoder = run / "vision_encoder"
    if not encoder.is_dir():
        if vision_dir:
            raise FileNotFoundError(f"{run}: no vision_encoder/; expected the folder of a `train clip` run")
        print(f"no stage-0 run in {run}: the ViT is RANDOM (run notebook 02 first for a trained one)")
        return None
    trained, expected = list(VisionConfig.from_pretrained(encoder).image_size), DataConfig.from_scale(scale)
    if trained != list(expected.image_shape):
        raise ValueError(
            f"{encoder} was trained on {trained} volumes, scale {scale} has {list(expected.image_shape)}: "
            "give the stage-0 run of this scale"
        )
    print(f"stage-0 vision encoder: {encoder}")
    return encoder


def stage1_run(
    align_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    scale: str,
    data_dir: str | os.PathLike,
    quick_steps: int = 20,
) -> Path:
    """The stage-1 run folder (holding ``model/``) a notebook builds on: ``align_dir`` when given, else
    notebook 03's ``align`` run next to ``out_dir``, else a quick stage 1 of ``quick_steps`` steps on a
    random ViT trained into ``out_dir/align``. Prints which one it is."""
    run = Path(align_dir) if align_dir else Path(out_dir).parent / ALIGN_NOTEBOOK / "align"
    if (run / "model" / "config.json").is_file():
        print(f"stage-1 run: {run}")
        return run
    if align_dir:
        raise FileNotFoundError(f"{run}: no model/config.json; expected the folder of a `train align` run")
    print(f"no stage-1 run in {run}: a quick stage 1 here ({quick_steps} steps, random ViT)")
    run = Path(out_dir) / "align"
    train_align(scale, data_dir, None, run, max_steps=quick_steps, progress=False)
    return run
