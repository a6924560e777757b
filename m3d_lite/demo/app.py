"""The Gradio page of ``m3d-lite demo``: load a scan, scroll through it, ask the model, see and download
the answer.

Every step calls the package: :func:`~m3d_lite.demo.inputs.read_upload` (that is
:func:`~m3d_lite.infer.load_scan`) to read a scan, :func:`~m3d_lite.infer.ask` to answer, as
``m3d-lite infer`` does, :func:`~m3d_lite.infer.save_answer_mask` for the mask NIfTI on the upload's grid,
and :func:`~m3d_lite.viz.orthogonal_views` for the pictures. The model is loaded once; Gradio's queue
runs one answer at a time, while the slice sliders stay responsive.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from matplotlib.figure import Figure
from transformers import PreTrainedTokenizerBase

from m3d_lite.data.phantom import ORGANS
from m3d_lite.data.preprocess import WINDOWS, Volume
from m3d_lite.demo.inputs import (
    MAX_UPLOAD,
    MAX_VOXELS,
    TASKS,
    phantom_examples,
    read_upload,
    task_question,
)
from m3d_lite.infer import Answer, ScanInput, ask, check_question, load_model, save_answer_mask
from m3d_lite.models.lamed import LaMedForCausalLM
from m3d_lite.viz import PLANES, draw_box, orthogonal_views

MIN_MAX = "min-max (MRI, scaled arrays)"
BOX_COLOR = "tab:orange"  # the mask takes viz's first colour, the box the next
PROGRESS = gr.Progress()  # as a handler's default, Gradio reports that handler's progress through it
_PYPLOT = threading.Lock()  # pyplot's figure list is global: handlers of two events may draw at once


@dataclass
class Shown:
    """One session's scan: the model's ``scan``, the file it came from (``path``, shown as ``name``), the
    prepared image with its voxel size in mm (``display``), and the latest ``answer`` about it."""

    scan: ScanInput
    path: Path
    name: str
    display: Volume
    answer: Answer | None = None


def display_volume(scan: ScanInput, name: str) -> Volume:
    """The prepared image as a :class:`~m3d_lite.data.preprocess.Volume` whose spacing is that of its
    voxels in the scan (crop size x spacing / prepared size), so slices keep their proportions; a
    prepared ``.npy`` has no spacing and gets 1 mm."""
    image = scan.image[0].numpy()
    spacing = (1.0, 1.0, 1.0)
    if scan.prepared is not None and scan.volume is not None:
        start, end = scan.prepared.crop_box
        spacing = tuple(
            (e - s) * mm / n for s, e, mm, n in zip(start, end, scan.volume.spacing, image.shape, strict=True)
        )
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return Volume(image, spacing, (0.0, 0.0, 0.0), identity, name)


def answer_point(answer: Answer | None, shape: tuple[int, ...]) -> list[int]:
    """Where to look: the centre of the answer's mask, else of its box, else of the volume."""
    if answer is not None and answer.mask is not None and answer.mask.any():
        return [int(c) for c in np.argwhere(answer.mask[0].numpy()).mean(0).round()]
    if answer is not None and answer.box is not None:
        centre = [(answer.box[a] + answer.box[a + 3]) / 2 for a in range(3)]
        return [min(max(int(c * n), 0), n - 1) for c, n in zip(centre, shape, strict=True)]
    return [n // 2 for n in shape]


def draw_views(shown: Shown, point: list[int]) -> Figure:
    """Axial, coronal and sagittal slices through ``point`` with the answer's mask and box."""
    answer = shown.answer
    masks = None
    if answer is not None and answer.mask is not None:
        masks = {"answer mask": answer.mask[0].numpy()}
    with _PYPLOT:
        figure = orthogonal_views(shown.display, masks=masks, point=point)
    if answer is not None and answer.box is not None:
        for axis, ax in enumerate(figure.axes[:3]):
            draw_box(ax, answer.box, axis, point[axis], shown.display.array.shape, BOX_COLOR)
    return figure


def _error(message: str) -> str:
    return f"**Error:** {message}"


def build_demo(
    model: LaMedForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[str, Path] | None = None,
    max_voxels: int = MAX_VOXELS,
    title: str = "m3d-lite demo",
) -> gr.Blocks:
    """The demo page for a loaded ``model``; ``examples`` (name -> scan file, e.g. from
    :func:`~m3d_lite.demo.inputs.phantom_examples`) fill the "phantom test volume" menu."""
    config = model.config
    shape = tuple(config.vision_config.image_size)
    segments = model.seg_module is not None
    examples = examples or {}
    out_dir = Path(tempfile.mkdtemp(prefix="m3d-lite-demo-"))

    with gr.Blocks(analytics_enabled=False, title=title) as demo:
        state = gr.State(None)
        gr.Markdown(
            f"## {title}\n{config.llm_name} LaMed; volumes are prepared to 1 x {'x'.join(map(str, shape))}, "
            f"{'with' if segments else 'without'} a mask decoder. Upload a NIfTI, a DICOM file or a zipped "
            f"DICOM series, NRRD, MHA or `.npy` (at most {MAX_UPLOAD} and {max_voxels:,} voxels), or pick a "
            "phantom test volume; then pick a task or ask your own question."
        )
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="scan", type="filepath", elem_id="scan")
                example = gr.Dropdown(
                    list(examples),
                    value=None,
                    label="or a phantom test volume",
                    visible=bool(examples),
                    elem_id="example",
                )
                window = gr.Dropdown(
                    [*WINDOWS, MIN_MAX], value="soft tissue", label="CT window", elem_id="window"
                )
                status = gr.Markdown("No scan yet.", elem_id="status")
                task = gr.Dropdown(list(TASKS), value="free question", label="task", elem_id="task")
                question = gr.Textbox(label="question", lines=2, elem_id="question")
                target = gr.Dropdown(
                    list(ORGANS.values()),
                    value="liver",
                    allow_custom_value=True,
                    visible=False,
                    label="target (an organ, or describe it)",
                    elem_id="target",
                )
                with gr.Row(visible=False) as choice_row:
                    choices = [gr.Textbox(label=letter, min_width=80) for letter in "ABCD"]
                with gr.Accordion("decoding", open=False):
                    max_new_tokens = gr.Slider(
                        1,
                        config.model_max_length,
                        value=64,
                        step=1,
                        label="max new tokens",
                        elem_id="max-new-tokens",
                    )
                    sample = gr.Checkbox(False, label="sample (default: greedy, as the benchmark)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top p")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column(scale=3):
                gr.Markdown("What the model sees: the prepared volume, its three planes through the sliders.")
                views = gr.Plot(show_label=False, elem_id="views")
                sliders = [
                    gr.Slider(0, n - 1, value=n // 2, step=1, label=f"{plane} slice", elem_id=plane)
                    for plane, n in zip(PLANES, shape, strict=True)
                ]
                answer_box = gr.Textbox(label="answer", lines=3, interactive=False, elem_id="answer")
                details = gr.Markdown(elem_id="details")
                mask_file = gr.File(label="mask on the scan's grid", interactive=False, elem_id="mask")

        def show_scan(path: str | None, window_name: str, progress: Any = PROGRESS) -> dict:
            if not path:
                return {}
            name = Path(path).name
            progress(0.1, desc=f"reading {name}")
            try:
                scan = read_upload(path, shape, None if window_name == MIN_MAX else window_name, max_voxels)
            except (ValueError, FileNotFoundError) as error:
                message = str(error).replace(f"{Path(path).parent}{os.sep}", "")
                return {
                    state: None,
                    status: _error(message),
                    views: None,
                    answer_box: "",
                    details: "",
                    mask_file: None,
                }
            shown = Shown(scan, Path(path), name, display_volume(scan, name))
            point = answer_point(None, shape)
            size = "x".join(map(str, scan.volume.array.shape)) if scan.volume is not None else "prepared"
            return {
                state: shown,
                status: f"**{name}** ({size}) loaded: ask a question.",
                views: draw_views(shown, point),
                **dict(zip(sliders, point, strict=True)),
                answer_box: "",
                details: "",
                mask_file: None,
            }

        def show_example(name: str | None, window_name: str, progress: Any = PROGRESS) -> dict:
            return show_scan(str(examples[name]) if name else None, window_name, progress)

        def rewindow(shown: Shown | None, window_name: str, progress: Any = PROGRESS) -> dict:
            return show_scan(str(shown.path) if shown else None, window_name, progress)

        def answer(
            shown: Shown | None,
            task_name: str,
            asked: str,
            target_name: str,
            a: str,
            b: str,
            c: str,
            d: str,
            new_tokens: float,
            do_sample: bool,
            temp: float,
            p: float,
            progress: Any = PROGRESS,
        ) -> dict:
            if shown is None:
                return {status: _error("load a scan first: upload one or pick a phantom test volume")}
            try:
                text = task_question(task_name, asked, target_name, (a, b, c, d))
                check_question(tokenizer, config, text, int(new_tokens))
            except ValueError as error:
                return {status: _error(str(error))}
            progress(0.2, desc="the model is answering")
            sampling = {"do_sample": True, "temperature": temp, "top_p": p} if do_sample else {}
            start = time.perf_counter()
            result = ask(model, tokenizer, shown.scan, text, int(new_tokens), segment=segments, **sampling)
            seconds = time.perf_counter() - start
            shown = replace(shown, answer=result)
            lines = [f"asked: *{text}* ({seconds:.1f} s, {'sampled' if do_sample else 'greedy'})"]
            written = None
            if result.box is not None:
                lines.append(
                    f"box [d0, h0, w0, d1, h1, w1] (fractions of the prepared volume): {list(result.box)}"
                )
            if result.mask is not None:
                progress(0.9, desc="writing the mask")
                stem = shown.name.split(".")[0] or "scan"
                written = save_answer_mask(
                    shown.scan, result.mask, out_dir / uuid.uuid4().hex / f"{stem}_mask.nii.gz"
                )
                voxels = int(result.mask.sum())
                lines.append(
                    f"mask: {voxels} voxels of the prepared volume; download it below"
                    if voxels
                    else "[SEG] was written, but its mask is empty (no voxel above probability 0.5)"
                )
            elif segments and task_name == "segmentation":
                lines.append("no [SEG] in the answer, so no mask")
            point = answer_point(result, shape)
            return {
                state: shown,
                status: f"**{shown.name}**: answered.",
                answer_box: result.text,
                details: "\n\n".join(lines),
                views: draw_views(shown, point),
                **dict(zip(sliders, point, strict=True)),
                mask_file: str(written) if written else None,
            }

        def redraw(shown: Shown | None, *point: float) -> Figure | None:
            return draw_views(shown, [int(v) for v in point]) if shown else None

        def task_fields(task_name: str) -> dict:
            return {
                target: gr.update(visible=task_name in ("REC (box)", "segmentation")),
                choice_row: gr.update(visible=task_name == "VQA with choices"),
                question: gr.update(visible=task_name in ("free question", "VQA with choices")),
            }

        scan_outputs = [state, status, views, *sliders, answer_box, details, mask_file]
        upload.upload(show_scan, [upload, window], scan_outputs, api_name="load_scan")
        example.input(show_example, [example, window], scan_outputs, api_name="load_example")
        window.input(rewindow, [state, window], scan_outputs, api_name=False)
        task.change(task_fields, task, [target, choice_row, question], api_name=False)
        ask_inputs = [state, task, question, target, *choices, max_new_tokens, sample, temperature, top_p]
        ask_button.click(answer, ask_inputs, scan_outputs, api_name="answer")
        for slider in sliders:
            slider.input(redraw, [state, *sliders], views, trigger_mode="always_last", api_name=False)
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Start ``demo`` on ``host``:``port`` (None: Gradio's 7860 or the next free port); ``block=False``
    returns at once (a notebook shows the page inline)."""
    if host not in ("127.0.0.1", "localhost"):
        print(f"serving on {host}: anyone who can reach this machine on port {port} can use the model")
    demo.queue(default_concurrency_limit=1)
    return demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=MAX_UPLOAD,
        prevent_thread_lock=not block,
        show_error=True,
        height=1000,  # of the page inline in a notebook
    )


def run_demo(
    model_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> None:
    """``m3d-lite demo``: load the model in ``model_dir`` once (as ``m3d-lite infer`` does), offer the
    test volumes of phantom dataset ``data`` (default: the model's scale's, if written), serve until
    interrupted."""
    model, tokenizer = load_model(model_dir)
    examples = phantom_examples(data, model.config.vision_config.image_size)
    serve(build_demo(model, tokenizer, examples, title=f"m3d-lite demo: {Path(model_dir).name}"), host, port)
