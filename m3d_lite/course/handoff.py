"""What one course notebook hands to the next: the run folders of the earlier stages.

Each notebook writes its runs under ``OUTPUT_DIR`` (``runs/course/<notebook>/`` in ``make course``); a
later notebook looks for them next to its own ``OUTPUT_DIR``, and when they are missing (a notebook run
alone, a test) trains a quick stand-in, so that every notebook also runs on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from m3d_lite.config import DataConfig
from m3d_lite.models.vision import VisionConfig
from m3d_lite.train.align import train_align
from m3d_lite.train.clip import train_clip
from m3d_lite.train.instruct import train_instruct

CLIP_RUN = ("02_clip_pretraining", "clip")
ALIGN_RUN = ("03_projector_alignment", "align")
INSTRUCT_RUN = ("04_instruction_tuning", "instruct")
SEG_RUN = ("05_segmentation", "seg")


def earlier_run(
    given: str | os.PathLike | None, out_dir: str | os.PathLike, run: tuple[str, str], marker: str
) -> Path | None:
    """The run folder ``given`` (it must hold ``marker``, else an error names it), else the notebook run
    ``run`` = (notebook, folder) next to ``out_dir`` when it holds ``marker``, else None."""
    if given:
        folder = Path(given)
        if not (folder / marker).exists():
            raise FileNotFoundError(f"{folder}: no {marker} in it; expected the folder of a {run[1]} run")
        return folder
    folder = Path(out_dir).parent / run[0] / run[1]
    return folder if (folder / marker).exists() else None


def stage0_encoder(
    vision_dir: str | os.PathLike | None, out_dir: str | os.PathLike, scale: str
) -> Path | None:
    """The stage-0 ``vision_encoder/`` folder a notebook builds on: from the run ``vision_dir`` when given,
    else from notebook 02's ``clip`` run next to ``out_dir``; None (a random ViT) when there is none.
    An encoder trained on another volume size than ``scale``'s is an error naming both. Prints which."""
    run = earlier_run(vision_dir, out_dir, CLIP_RUN, "vision_encoder")
    if run is None:
        print(f"no stage-0 run next to {out_dir}: the ViT is RANDOM (notebook 02 trains one)")
        return None
    encoder = run / "vision_encoder"
    trained, expected = list(VisionConfig.from_pretrained(encoder).image_size), DataConfig.from_scale(scale)
    if trained != list(expected.image_shape):
        raise ValueError(
            f"{encoder} was trained on {trained} volumes, scale {scale} has {list(expected.image_shape)}: "
            "give the stage-0 run of this scale"
        )
    print(f"stage-0 vision encoder: {encoder}")
    return encoder


def clip_run(
    clip_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    scale: str,
    data_dir: str | os.PathLike,
    quick_steps: int = 30,
) -> Path:
    """The CLIP run (holding ``model/``) for retrieval: ``clip_dir``, else notebook 02's, else a quick one
    of ``quick_steps`` steps trained into ``out_dir/clip``. Prints which."""
    run = earlier_run(clip_dir, out_dir, CLIP_RUN, "model/config.json")
    if run is None:
        print(f"no CLIP run next to {out_dir}: a quick one here ({quick_steps} steps)")
        run = Path(out_dir) / "clip"
        train_clip(scale, data_dir, run, max_steps=quick_steps, progress=False)
    print(f"CLIP run: {run}")
    return run


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
    run = earlier_run(align_dir, out_dir, ALIGN_RUN, "model/config.json")
    if run is None:
        print(f"no stage-1 run next to {out_dir}: a quick stage 1 here ({quick_steps} steps, random ViT)")
        run = Path(out_dir) / "align"
        train_align(scale, data_dir, None, run, max_steps=quick_steps, progress=False)
    print(f"stage-1 run: {run}")
    return run


def stage2_runs(
    instruct_dir: str | os.PathLike | None,
    seg_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    scale: str,
    data_dir: str | os.PathLike,
    quick_steps: int = 40,
) -> tuple[Path, Path]:
    """(language run, segmentation run) for the benchmark: notebook 04's stage 2 (or ``instruct_dir``) and
    notebook 05's (or ``seg_dir``); when either is missing, one quick stage 2 on all ten tasks (with a
    seg module) trained into ``out_dir/instruct`` serves as both. Prints which."""
    language = earlier_run(instruct_dir, out_dir, INSTRUCT_RUN, "model")
    seg = earlier_run(seg_dir, out_dir, SEG_RUN, "model")
    if language is None or seg is None:
        print(f"no stage-2 runs of notebooks 04 and 05 next to {out_dir}: a quick one on all tasks here")
        align = stage1_run(None, out_dir, scale, data_dir)
        language = seg = Path(out_dir) / "instruct"
        train_instruct(scale, data_dir, align, language, max_steps=quick_steps, progress=False)
    print(f"stage-2 runs: language tasks {language}, segmentation {seg}")
    return language, seg
