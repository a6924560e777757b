"""Stage 1 at the small scale on the phantom: align the projector of SmolLM2-135M-Instruct to a stage-0 ViT.

    .venv/bin/python benchmarks/align_small.py --data ~/.cache/m3d_lite/phantom_small \\
        --vision runs/clip_small --out runs/align_small

Writes the phantom (1000 volumes, ~13 GB, a few minutes) unless it is already there (``--num-volumes``
for fewer), trains with the ``small`` preset (``--max-steps`` to shorten it), saves the loss curve as
``OUT/loss.png`` and prints training time, time per step, peak memory (max RSS of this process) and
five captions generated for test volumes next to their reference reports. Without ``--vision`` the ViT
is random (a warning says so): the loss still falls, but the captions cannot depend on the image. With
M3D's mix (by size) the phantom gives 16 VQA samples per report, so short answers dominate what the
projector learns; ``--task-weights 1,1,1`` gives captions a third of the samples.
"""

from __future__ import annotations

import argparse
import json
import resource
import textwrap
import time
from pathlib import Path

from m3d_lite.config import DataConfig
from m3d_lite.data.datasets import CaptionDataset, load_volume_tensor, read_report
from m3d_lite.data.phantom_dataset import ensure_phantom_dataset
from m3d_lite.infer import generate_answers
from m3d_lite.models.lamed import load_lamed
from m3d_lite.train.align import train_align
from m3d_lite.viz import save_figure, training_curves


def captions(model_dir: Path, data_dir: Path, count: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """(generated, reference) reports of the first ``count`` test volumes, greedy decoding."""
    model, tokenizer = load_lamed(model_dir)
    config = model.eval().config
    dataset = CaptionDataset(data_dir, "test", tokenizer, config.proj_out_num, config.model_max_length)
    pairs = []
    for i in range(min(count, len(dataset))):
        image_path, question, _ = dataset.example(i)
        [generated] = generate_answers(
            model, tokenizer, load_volume_tensor(image_path)[None], [question], max_new_tokens
        )
        pairs.append((generated, read_report(dataset.folder / dataset.items[i].text)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--vision", type=Path, default=None, help="stage-0 run folder or its vision_encoder/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-volumes", type=int, default=DataConfig.from_scale("small").num_volumes)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--task-weights",
        type=lambda text: [float(w) for w in text.split(",")],
        default=None,
        help="shares of captions, closed VQA, open VQA, e.g. 1,1,1 (default: by size, as M3D)",
    )
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    start = time.perf_counter()
    ensure_phantom_dataset(args.data, args.num_volumes, scale="small", seed=0)
    data_seconds = time.perf_counter() - start

    result = train_align(
        "small", args.data, args.vision, args.out, task_weights=args.task_weights, max_steps=args.max_steps
    )
    curve = save_figure(training_curves(result.metrics_path, title="stage 1 (small)"), args.out / "loss.png")
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    start = time.perf_counter()
    pairs = captions(args.out / "model", args.data, args.captions, args.max_new_tokens)
    summary = {
        "phantom_seconds": round(data_seconds, 1),
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds / result.steps, 2),
        "first_logged_loss": records[0]["loss"],
        "final_loss": result.final_loss,
        "caption_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loss_curve": str(curve),
    }
    print(json.dumps(summary, indent=2))
    for i, (generated, reference) in enumerate(pairs):
        print(f"\n--- test volume {i}")
        print(textwrap.fill(f"generated: {generated}", 110, subsequent_indent="  "))
        print(textwrap.fill(f"reference: {reference}", 110, subsequent_indent="  "))


if __name__ == "__main__":
    main()
