"""Time from upload to answer in `m3d-lite demo`, through its HTTP API as a browser would use it.

    .venv/bin/python benchmarks/demo_latency.py --model runs/course/05_segmentation/seg \\
        --scan ~/.cache/m3d_lite/phantom_ci/raw/phantom_00063/ct.nii.gz

Starts the demo's page in this process on a free localhost port (the model loaded once, timed), then,
with ``gradio_client``, ``--repeats`` times per task: uploads ``--scan`` (the ``load_scan`` endpoint:
upload, read, prepare, draw the three planes) and asks (the ``answer`` endpoint: greedy decoding, the mask
written as NIfTI, the views redrawn). Prints the median seconds of each step and of the two together,
with the answer's length, for the report task and, on a model with a mask decoder, segmentation.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import torch
from gradio_client import Client, handle_file

from m3d_lite.demo.app import build_demo, serve
from m3d_lite.infer import load_model

TASKS = {"report": "", "segmentation": "liver"}  # task -> target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="a run, model folder or export")
    parser.add_argument("--scan", type=Path, required=True, help="the file to upload (a phantom raw NIfTI)")
    parser.add_argument("--window", default="soft tissue")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the page's default")
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    loaded = time.perf_counter() - start
    demo = build_demo(model, tokenizer)
    port = free_port()
    serve(demo, port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    tasks = [task for task in TASKS if task != "segmentation" or model.seg_module is not None]
    print(
        f"model {args.model} ({model.config.llm_name}) loaded in {loaded:.1f} s; torch threads "
        f"{torch.get_num_threads()}; {args.repeats} repeats, max {args.max_new_tokens} new tokens"
    )
    print("| task | upload -> views (s) | question -> answer (s) | upload -> answer (s) | answer |")
    print("|---|---|---|---|---|")
    try:
        for task in tasks:
            uploads, answers, text = [], [], ""
            for _ in range(args.repeats):
                start = time.perf_counter()
                client.predict(handle_file(str(args.scan)), args.window, api_name="/load_scan")
                uploads.append(time.perf_counter() - start)
                start = time.perf_counter()
                outputs = client.predict(
                    task_name=task,
                    asked="",
                    target_name=TASKS[task],
                    **dict.fromkeys("abcd", ""),  # the four VQA choices
                    new_tokens=args.max_new_tokens,
                    api_name="/answer",
                )
                answers.append(time.perf_counter() - start)
                text = outputs[5]  # status, views, 3 slice numbers, answer, details, mask
            upload, answer = statistics.median(uploads), statistics.median(answers)
            shown = repr(text if len(text) < 60 else f"{text[:57]}...")
            total = upload + answer
            print(f"| {task} | {upload:.2f} | {answer:.2f} | {total:.2f} | {len(text)} chars: {shown} |")
    finally:
        demo.close()


if __name__ == "__main__":
    main()
