"""The ``m3d-lite`` command: data, train, export, convert, infer, bench, plan, demo, course.

Every subcommand is a thin shell over a function of the package, so a notebook and the
command line run the same code. Imports are done inside the handlers to keep ``--help`` fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m3d_lite.config import SCALES


def _parameters(pairs: list[list[str]] | None) -> dict[str, Any]:
    """``-p NAME VALUE`` pairs, typed like papermill's; ``*_DIR`` paths made absolute, since a
    notebook runs in its own folder."""
    from m3d_lite.course.run import parse_parameter

    parameters = {name: parse_parameter(value) for name, value in pairs or []}
    for name, value in parameters.items():
        if name.endswith("_DIR") and isinstance(value, str) and value:
            parameters[name] = str(Path(value).resolve())
    return parameters


def cmd_data_phantom(args: argparse.Namespace) -> int:
    from m3d_lite.config import DataConfig
    from m3d_lite.data.phantom_dataset import write_phantom_dataset

    cfg = DataConfig.from_scale(args.scale, num_volumes=args.num_volumes, seed=args.seed)
    summary = write_phantom_dataset(args.out, num_volumes=cfg.num_volumes, scale=args.scale, seed=cfg.seed)
    print(summary)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from m3d_lite.config import DataConfig
    from m3d_lite.data.preprocess import prepare_file, window_from_args
    from m3d_lite.io import save_npy
    from m3d_lite.viz import montage, save_figure

    shape = tuple(args.shape) if args.shape else DataConfig.from_scale(args.scale).image_shape
    prepared, volume = prepare_file(args.input, shape, window=window_from_args(args.window))
    stem = Path(args.input).name.removesuffix(".gz").removesuffix(".nii").removesuffix(".npy")
    stem = stem.removesuffix(".dcm") or "volume"
    out = Path(args.out)
    npy = save_npy(out / f"{stem}.npy", prepared.image)
    png = out / f"{stem}.png"
    save_figure(montage(prepared.image, title=f"{args.input} -> {prepared.image.shape}"), png)
    print(f"{args.input}: {volume.array.shape} at {volume.spacing} mm -> {npy} {prepared.image.shape}")
    print(f"preview: {png}")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from m3d_lite.data.formats import validate_dataset

    report = validate_dataset(args.root)
    for name, count in sorted(report.counts.items()):
        print(f"{name:>28}: {count}")
    if report.problems:
        print(f"\n{len(report.problems)} problem(s) in {args.root}:", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{args.root}: OK")
    return 0


def cmd_course_run(args: argparse.Namespace) -> int:
    from m3d_lite.course.run import run_notebook

    run = run_notebook(Path(args.notebook), Path(args.out), _parameters(args.parameter), timeout=args.timeout)
    print(f"{run.source} -> {run.output} in {run.seconds:.1f} s")
    return 0


def cmd_course_run_all(args: argparse.Namespace) -> int:
    from m3d_lite.course.run import run_all

    parameters = _parameters(args.parameter)
    runs = run_all(Path(args.notebooks), Path(args.out), parameters, timeout=args.timeout, force=args.force)
    return 1 if any(run.error for run in runs) else 0


def cmd_course_make_student(args: argparse.Namespace) -> int:
    from m3d_lite.course.make_student import make_student

    changed = make_student(Path(args.solutions), Path(args.notebooks), check=args.check)
    if args.check and changed:
        names = ", ".join(str(p) for p in changed)
        print(f"notebooks/ is out of date with solutions/: {names}\nrun `m3d-lite course make-student`")
        return 1
    print(f"wrote {len(changed)} notebook(s)" if changed else "notebooks/ is up to date")
    return 0


def cmd_course_grade(args: argparse.Namespace) -> int:
    from m3d_lite.course.grade import grade, totals

    try:
        rows = grade(
            args.submissions,
            args.out,
            notebooks=args.notebooks,
            timeout=args.timeout,
            jobs=args.jobs,
            parameters=_parameters(args.parameter),
            solutions_dir=args.solutions,
            max_output_bytes=int(args.max_output_mb * 1e6),
        )
    except KeyboardInterrupt:
        print("\ninterrupted: running notebooks stopped, no gradebook written", file=sys.stderr)
        return 130
    print(f"\n{totals(rows)}\n\ngradebook: {args.out} ({len(rows)} rows)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from m3d_lite.train.__main__ import main as train_main

    return train_main(args.args, prog="m3d-lite train")


def cmd_export(args: argparse.Namespace) -> int:
    from m3d_lite.models.lora import export_merged

    out = export_merged(args.model, args.out)
    print(f"merged {args.model} -> {out} (read it with m3d_lite.models.load_lamed)")
    return 0


def cmd_convert_clip(args: argparse.Namespace) -> int:
    from m3d_lite.models.official import convert_m3d_clip

    print(
        convert_m3d_clip(
            args.src,
            args.out,
            image_size=args.image_size,
            patch_size=args.patch_size,
            num_heads=args.num_heads,
            dtype=_dtype(args.dtype),
        )
    )
    return 0


def cmd_convert_lamed(args: argparse.Namespace) -> int:
    from m3d_lite.models.official import convert_m3d_lamed

    print(
        convert_m3d_lamed(
            args.src,
            args.out,
            vit_heads=args.vit_heads,
            decoder_heads=args.decoder_heads,
            dtype=_dtype(args.dtype),
        )
    )
    return 0


def _dtype(name: str | None) -> Any:
    """``torch.<name>`` for ``--dtype`` (None: keep the checkpoint's)."""
    import torch

    return None if name is None else getattr(torch, name)


def cmd_infer(args: argparse.Namespace) -> int:
    from m3d_lite.data.preprocess import window_from_args
    from m3d_lite.infer import ask, load_model, load_scan, save_answer_mask
    from m3d_lite.viz import save_figure, volume_with_text

    model, tokenizer = load_model(args.model)
    scan = load_scan(args.image, model.config.vision_config.image_size, window_from_args(args.window))
    answer = ask(
        model, tokenizer, scan, args.question, max_new_tokens=args.max_new_tokens, segment=args.segment
    )
    print(answer.text)
    stem = Path(args.image).name.split(".")[0] or "scan"
    if answer.box is not None:
        print(f"box [d0, h0, w0, d1, h1, w1] (fractions of the prepared volume): {list(answer.box)}")
    if answer.mask is not None:
        mask_path = save_answer_mask(scan, answer.mask, Path(args.out) / f"{stem}_mask.nii.gz")
        print(f"mask of {int(answer.mask.sum())} voxels (prepared grid), on the input's grid: {mask_path}")
    elif args.segment:
        print("no [SEG] in the answer: no mask")
    if answer.box is not None or answer.mask is not None:
        texts = {"question": answer.question, "answer": answer.text}
        boxes = {"answer box": answer.box} if answer.box is not None else None
        masks = {"answer mask": answer.mask[0].numpy()} if answer.mask is not None else None
        picture = volume_with_text(scan.image, texts, masks=masks, boxes=boxes, num_slices=8)
        print(f"picture: {save_figure(picture, Path(args.out) / f'{stem}_answer.png')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from m3d_lite.demo.app import run_demo
    except ModuleNotFoundError as error:
        print(
            f'm3d-lite: error: {error}: install the demo extra, pip install "m3d-lite[demo]"', file=sys.stderr
        )
        return 2
    run_demo(args.model, args.data, args.host, args.port)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from m3d_lite.eval.bench import run_bench
    from m3d_lite.eval.report import headline_table

    bench = run_bench(
        args.model,
        args.data,
        args.out,
        tasks=args.tasks,
        clip_dir=args.clip,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        force=args.force,
        pool_size=args.pool_size,
        seed=args.seed,
    )
    print(headline_table(bench))
    print(f"results: {Path(args.out) / 'bench.json'}; report: {Path(args.out) / 'report.html'} (and .md)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from m3d_lite.plan import Setup, describe, format_plans, plan

    gpus = args.gpus if args.gpus is not None else 8 if args.scale == "paper" else 0
    zero = args.zero if args.zero is not None else 2 if gpus > 1 else 0
    setup = Setup(
        gpus=gpus,
        gpu_mem_gib=args.gpu_mem,
        zero=zero,
        gradient_checkpointing=args.gradient_checkpointing,
        sdpa=not args.no_sdpa,
        batch_size=args.batch,
        tflops=args.tflops,
    )
    plans = plan(args.scale, setup, llm=args.llm, stages=args.stages)
    print(format_plans(plans, describe(args.scale, setup, args.llm)))
    return 0 if all(p.fits for p in plans) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``m3d-lite`` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="m3d-lite", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True)

    data = groups.add_parser("data", help="make, prepare and validate M3D-format data").add_subparsers(
        dest="command", required=True
    )
    p = data.add_parser("phantom", help="write the synthetic M3D-Phantom dataset in the M3D formats")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-volumes", type=int, default=None, help="default: the scale's preset")
    p.add_argument("--scale", choices=SCALES, default="ci")
    p.add_argument("--seed", type=int, default=None, help="default: the scale's preset")
    p.set_defaults(func=cmd_data_phantom)

    p = data.add_parser("prepare", help="NIfTI/DICOM/npy file or DICOM folder -> prepared .npy + preview PNG")
    p.add_argument("input", type=Path)
    p.add_argument("--out", required=True, type=Path)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", choices=SCALES, default="ci")
    size.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"))
    p.add_argument("--window", nargs="+", metavar="LO HI | NAME", help="HU window, e.g. -160 240 or 'bone'")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("validate", help="check an M3D-format dataset folder; non-zero exit lists problems")
    p.add_argument("root", type=Path)
    p.set_defaults(func=cmd_data_validate)

    p = groups.add_parser(
        "train",
        help="train a stage: clip, align, instruct (see `m3d-lite train --help`)",
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the arguments of `python -m m3d_lite.train`")
    p.set_defaults(func=cmd_train)

    p = groups.add_parser("export", help="merge a stage-2 model's LoRA into a plain checkpoint (safetensors)")
    p.add_argument("--model", required=True, type=Path, help="an `instruct` run folder or its model/ folder")
    p.add_argument("--out", required=True, type=Path, help="folder of the merged model and its tokenizer")
    p.set_defaults(func=cmd_export)

    convert = groups.add_parser(
        "convert", help="official M3D weights (Hub id or local) -> m3d-lite folders"
    ).add_subparsers(dest="command", required=True)
    dtypes = ("float32", "bfloat16", "float16")
    p = convert.add_parser(
        "clip", help="M3D-CLIP or its pretrained_ViT.bin -> OUT/model/, OUT/vision_encoder/"
    )
    p.add_argument("src", help="e.g. GoodBaiBai88/M3D-CLIP, a folder, or a .safetensors/.bin file")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-size", type=int, nargs=3, metavar=("D", "H", "W"), help="default: config.json's")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("D", "H", "W"), help="default: config.json's")
    p.add_argument("--num-heads", type=int, default=None, help="ViT heads (default: config.json's, else 12)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="default: as stored")
    p.set_defaults(func=cmd_convert_clip)
    p = convert.add_parser("lamed", help="M3D-LaMed (Phi-3-4B, Llama-2-7B) -> a LaMed folder for infer/bench")
    p.add_argument("src", help="e.g. GoodBaiBai88/M3D-LaMed-Phi-3-4B, or its downloaded folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vit-heads", type=int, default=12, help="heads of both ViTs (M3D: 12)")
    p.add_argument("--decoder-heads", type=int, default=8, help="heads of the mask decoder (M3D: 8)")
    p.add_argument("--dtype", choices=dtypes, default=None, help="default: as stored (float32, ~16 GB)")
    p.set_defaults(func=cmd_convert_lamed)

    p = groups.add_parser("infer", help="ask a trained model a question about a scan (NIfTI, DICOM, npy)")
    p.add_argument("--model", required=True, type=Path, help="stage-1/2 run or model folder, or an export")
    p.add_argument("--image", required=True, type=Path, help="NIfTI, DICOM file or series folder, nrrd, npy")
    p.add_argument("--question", required=True)
    p.add_argument("--window", nargs="+", metavar="LO HI | NAME", help="CT window, e.g. -160 240 or 'bone'")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--segment", action="store_true", help="decode the mask of a [SEG] answer (NIfTI + picture)"
    )
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the mask and the picture")
    p.set_defaults(func=cmd_infer)

    p = groups.add_parser(
        "bench", help="evaluate a trained model on M3D-Bench; writes CSVs, bench.json, report"
    )
    p.add_argument(
        "--model", required=True, type=Path, help="a LaMed run, model folder or export (or a CLIP run)"
    )
    p.add_argument("--data", required=True, type=Path, help="dataset root in the M3D layout")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--tasks", nargs="+", default=["all"], help="task names or 'all' (skips what the model lacks)"
    )
    p.add_argument(
        "--clip", type=Path, default=None, help="CLIP run for retrieval (default: --model if a CLIP)"
    )
    p.add_argument("--split", default="test")
    p.add_argument(
        "--limit", type=int, default=None, help="first N samples per generative task (default all)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--force", action="store_true", help="rerun tasks already in --out")
    p.add_argument("--pool-size", type=int, default=100, help="retrieval pool (and the full split)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench)

    p = groups.add_parser(
        "plan", help="parameters, memory per GPU and hours of each stage; exit 1 when one does not fit"
    )
    p.add_argument("--scale", choices=SCALES, default="paper")
    p.add_argument("--gpus", type=int, default=None, help="0: one CPU process (default: 8 at paper, else 0)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (RAM with --gpus 0)")
    p.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="DeepSpeed ZeRO stage, 0 = DDP (default: 2 on several GPUs, as 8gpu_zero2.yaml, else 0)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep only each block's input (default: each stage's preset)",
    )
    p.add_argument("--no-sdpa", action="store_true", help="explicit attention, which stores its matrix")
    p.add_argument("--batch", type=int, default=None, help="samples per GPU (default: each stage's preset)")
    p.add_argument("--llm", default=None, help="phi3, llama2 or an LLM name (default: the preset's)")
    p.add_argument(
        "--tflops", type=float, default=None, help="achieved TFLOP/s per GPU (default 125: 40%% of an A100)"
    )
    p.add_argument(
        "--stages", nargs="+", choices=("clip", "align", "instruct"), default=["clip", "align", "instruct"]
    )
    p.set_defaults(func=cmd_plan)

    p = groups.add_parser(
        "demo", help='a web page to ask a trained model about scans (pip install "m3d-lite[demo]")'
    )
    p.add_argument("--model", required=True, type=Path, help="stage-1/2 run or model folder, or an export")
    p.add_argument("--port", type=int, default=None, help="default: 7860, or the next free port")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves every network interface")
    p.add_argument(
        "--data", type=Path, default=None, help="phantom dataset whose test volumes the page offers"
    )
    p.set_defaults(func=cmd_demo)

    course = groups.add_parser("course", help="run, generate and grade the course notebooks").add_subparsers(
        dest="command", required=True
    )
    p = course.add_parser("run", help="execute one notebook (jupytext .py or .ipynb) with papermill")
    p.add_argument("notebook", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    p.set_defaults(func=cmd_course_run)

    p = course.add_parser("run-all", help="execute every NN_*.py notebook of a folder into --out")
    p.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    p.add_argument("--out", type=Path, default=Path("runs"))
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    p.add_argument("--force", action="store_true", help="run every notebook, also those finished before")
    p.set_defaults(func=cmd_course_run_all)

    p = course.add_parser("make-student", help="write notebooks/ from solutions/ (--check: fail on drift)")
    p.add_argument("--solutions", type=Path, default=Path("solutions"))
    p.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=cmd_course_make_student)

    p = course.add_parser("grade", help="run every student's notebooks in a sandbox; write a gradebook CSV")
    p.add_argument("submissions", type=Path, help="one folder per student holding NN_*.py or NN_*.ipynb")
    p.add_argument("--out", required=True, type=Path, help="gradebook CSV; runs go to <stem>_runs/")
    p.add_argument("--notebooks", nargs="+", metavar="NN", help="e.g. 01 02 (default: every solution)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per notebook, wall clock")
    p.add_argument("--jobs", type=int, default=1, help="students graded at a time")
    p.add_argument("--solutions", type=Path, default=Path("solutions"), help="where the exercises are read")
    p.add_argument("--max-output-mb", type=float, default=5.0, help="output kept per notebook")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))
    p.set_defaults(func=cmd_course_grade)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``m3d-lite`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"m3d-lite: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
