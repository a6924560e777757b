"""The M3D-Bench report: a bench.json (and the per-task CSVs beside it) as ``report.md`` and a
self-contained ``report.html`` (pictures embedded as base64 PNG).

The headline table puts M3D's form of each score next to the standard one where they differ (closed-VQA
accuracy by M3D's "letter anywhere" rule vs exact; M3D's enclosing-box IoU vs true IoU; BLEU-1/ROUGE-1 vs
corpus BLEU-4/ROUGE-L; Dice of the generated mask vs teacher-forced): M3D's numbers are only comparable
with M3D's form. Scores are in percent.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from m3d_lite import viz
from m3d_lite.eval.bench import TASKS, csv_path
from m3d_lite.io import save_text

TEXT_M3D = (("BLEU-1", "bleu1"), ("ROUGE-1", "rouge1"), ("METEOR", "meteor"))
TEXT_STANDARD = (("ROUGE-L", "rouge_l"), ("BERTScore (MiniLM)", "bertscore"))
DICE = ((("Dice generated", "dice"),), (("Dice teacher-forced", "dice_forced"),))
# task: ((label, summary key) in M3D's form, (label, key) standard or added); absent keys are dropped
HEADLINES = {
    "report_generation": (TEXT_M3D, (("corpus BLEU-4", "corpus_bleu4"), *TEXT_STANDARD)),
    "vqa_closed": ((("accuracy", "accuracy_m3d"),), (("exact accuracy", "accuracy_exact"),)),
    "vqa_open": (TEXT_M3D, TEXT_STANDARD),
    "rec": ((("enclosing-box IoU", "iou_m3d"),), (("IoU", "iou"), ("Acc@0.5", "acc@0.5"))),
    "reg": (TEXT_M3D, (*TEXT_STANDARD, ("class named", "class_named"))),
    "segmentation": DICE,
    "referring_segmentation": DICE,
}
NUM_EXAMPLES = 3
CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "vertical-align:top;text-align:left}th{background:#f0f0f0}img{max-width:100%}"
)
Metrics = list[tuple[str, float]]


def headline_metrics(task: str, summary: dict[str, Any]) -> tuple[Metrics, Metrics]:
    """(M3D's form, standard or added) headline scores of ``task`` as (label, percent) pairs.

    Retrieval: R@1 both ways (M3D's IR = image->text, TR = text->image) on the seeded pool, M3D's form, and
    on the whole split."""
    if task == "retrieval":
        pool = next(key for key in summary if key.startswith("pool_") and key != "pool_full")

        def r1(key: str) -> Metrics:
            size = summary[key]["pool_size"]
            return [
                (f"R@1 {name} (pool {size})", summary[key][direction]["R@1"])
                for name, direction in (("IR", "image_to_text"), ("TR", "text_to_image"))
            ]

        return r1(pool), r1("pool_full")
    return tuple(
        [(label, 100 * summary[key]) for label, key in metrics if key in summary]
        for metrics in HEADLINES[task]
    )


def metrics_text(metrics: Metrics) -> str:
    return ", ".join(f"{label} {value:.1f}" for label, value in metrics)


def headline_rows(bench: dict[str, Any]) -> list[list[str]]:
    """One row per task of ``bench`` in :data:`~m3d_lite.eval.bench.TASKS` order: finished or skipped."""
    rows = []
    for task in TASKS:
        if task in bench["tasks"]:
            rows.append([task, *map(metrics_text, headline_metrics(task, bench["tasks"][task]))])
        elif task in bench.get("skipped", {}):
            rows.append([task, f"skipped: {bench['skipped'][task]}", ""])
    return rows


HEADLINE_HEADER = ["task", "M3D's form (%)", "standard / added (%)"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; ``|`` and line breaks in cells are escaped."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def headline_table(bench: dict[str, Any]) -> str:
    """The headline table of ``bench`` (a bench.json dict) as markdown, one row per task."""
    return markdown_table(HEADLINE_HEADER, headline_rows(bench))


def bar_chart(groups: dict[str, Metrics], title: str) -> Figure:
    """Side-by-side bars per group: its first M3D-form and first standard score (or any labelled pairs)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups)), 3.5), layout="constrained")
    labels = sorted({label for metrics in groups.values() for label, _ in metrics}, key=str)
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = [dict(metrics).get(label, 0.0) for metrics in groups.values()]
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(groups)) + width * (len(labels) - 1) / 2, list(groups), rotation=20)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if labels:
        ax.legend(fontsize="small")
    plt.close(fig)
    return fig


def read_rows(out_dir: Path, task: str) -> list[dict[str, str]]:
    """The first :data:`NUM_EXAMPLES` rows of ``task``'s CSV (none when it is missing); example tables cut
    texts at 400 characters."""
    path = csv_path(out_dir, task)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))[:NUM_EXAMPLES]


def rec_picture(row: dict[str, str]) -> Figure:
    """The volume of a REC row with its true and predicted boxes, and the question and answers."""
    boxes = {"true box": json.loads(row["target_box"])}
    if row["box"]:
        boxes["predicted box"] = json.loads(row["box"])
    texts = {key: row[key] for key in ("question", "prediction", "answer")}
    title = f"{row['class_name']}: IoU {float(row['iou']):.2f}"
    return viz.volume_with_text(np.load(row["image"]), texts, boxes=boxes, title=title)


def report_blocks(bench: dict[str, Any], out_dir: Path) -> list[tuple]:
    """The report as blocks ``("h2", text)``, ``("p", text)``, ``("table", header, rows)`` and
    ``("image", file name, figure)``, rendered by :func:`write_report` to markdown and HTML."""
    keys = ("model", "clip", "data", "split", "limit")
    runs = bench.get("runs", [bench])  # a merged bench (bench.merge_benches) lists the settings of each run
    blocks: list[tuple] = [("p", ", ".join(f"{key} {run.get(key)}" for key in keys)) for run in runs]
    blocks.append(("table", HEADLINE_HEADER, headline_rows(bench)))
    finished = [task for task in TASKS if task in bench["tasks"]]
    if finished:
        scores = {}
        for task in finished:
            m3d, standard = headline_metrics(task, bench["tasks"][task])
            forms = (("M3D's form", m3d), ("standard / added", standard))
            scores[task] = [(form, metrics[0][1]) for form, metrics in forms if metrics]
        blocks.append(("image", "report_scores.png", bar_chart(scores, "first headline score per task")))
    closed = bench["tasks"].get("vqa_closed")
    if closed:
        types = sorted({key.split("/")[1] for key in closed if "/" in key})
        per_type = {
            t: [(form, 100 * closed[f"accuracy_{form}/{t}"]) for form in ("m3d", "exact")] for t in types
        }
        blocks += [("h2", "Closed VQA by question type")]
        blocks.append(("image", "report_vqa_closed.png", bar_chart(per_type, "closed-VQA accuracy")))
    rec_rows = read_rows(out_dir, "rec")
    if rec_rows:
        blocks.append(("h2", "REC examples (true and predicted boxes)"))
        blocks += [("image", f"report_rec_{i}.png", rec_picture(row)) for i, row in enumerate(rec_rows)]
    for task, columns in (
        ("report_generation", ("prediction", "answer", "bleu1", "rouge_l")),
        ("reg", ("question", "prediction", "answer", "class_named")),
        ("segmentation", ("class_name", "question", "prediction", "dice", "dice_forced")),
        ("referring_segmentation", ("question", "prediction", "dice", "dice_forced")),
    ):
        rows = read_rows(out_dir, task)
        if rows:
            blocks.append(("h2", f"{task} examples"))
            blocks.append(
                (
                    "table",
                    list(columns),
                    [[textwrap.shorten(row.get(c, ""), 400) for c in columns] for row in rows],
                )
            )
    return blocks


def html_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values) + "</tr>"

    return "<table>" + cells("th", header) + "".join(cells("td", row) for row in rows) + "</table>"


def write_report(bench: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` (pictures as PNG files beside it) and the self-contained ``report.html`` of
    ``bench`` (a bench.json dict) and the CSVs in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    title = "M3D-Bench report"
    markdown, body = [f"# {title}"], [f"<h1>{title}</h1>"]
    for kind, *content in report_blocks(bench, out_dir):
        if kind == "h2":
            markdown.append(f"## {content[0]}")
            body.append(f"<h2>{html.escape(content[0])}</h2>")
        elif kind == "p":
            markdown.append(content[0])
            body.append(f"<p>{html.escape(content[0])}</p>")
        elif kind == "table":
            markdown.append(markdown_table(*content))
            body.append(html_table(*content))
        else:
            name, fig = content
            png = viz.save_figure(fig, out_dir / name).read_bytes()
            markdown.append(f"![{name}]({name})")
            body.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    page = f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style>'
    page += "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    return (
        save_text(out_dir / "report.md", "\n\n".join(markdown) + "\n"),
        save_text(out_dir / "report.html", page),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m m3d_lite.eval.report DIR``: print where DIR's report is and its headline table."""
    folder = Path((argv if argv is not None else sys.argv[1:])[0])
    bench_json = folder / "bench.json"
    if not bench_json.is_file():
        print(f"{bench_json}: not found; run the benchmark first (m3d-lite bench, or notebook 06)")
        return 1
    print(f"M3D-Bench report: {folder / 'report.html'} (and report.md)\n")
    print(headline_table(json.loads(bench_json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
