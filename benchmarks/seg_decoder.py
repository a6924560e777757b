"""Can the mask decoder alone learn the phantom's organs? The seg module trained on its own, AdamW, batch 4,
Dice + BCE, on segmentation-by-class items of the train split; thresholded Dice on test items, and the mean
cosine between the prompts of different organs, every ``--eval-every`` steps.

    .venv/bin/python benchmarks/seg_decoder.py --data /tmp/phantom_small --scale small --steps 300 \\
        --vision /tmp/bench/align_small [--prompts seg]

``--prompts class`` (default): one learned prompt per class instead of a ``[SEG]`` state. ``--prompts seg``:
the ``[SEG]``-predicting states of the ``--vision`` LaMed, frozen and computed once, through a fresh
``seg_projector``, as in stage 2 with the LLM held still.

Separates the decoder's share of a poor stage-2 Dice from the ``[SEG]`` pathway's: if the decoder reaches
a good Dice here with class prompts but not with ``[SEG]`` states, or not inside stage 2, the prompts
coming from the LLM are the bottleneck. ``--vision`` starts the seg image encoder from that LaMed's vision
tower, as ``train_instruct`` does (omit it for a random encoder; ``--prompts seg`` needs it).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from monai.metrics import compute_dice

from m3d_lite.data.seg_data import SegTaskDataset
from m3d_lite.eval.tasks import prompt_cosine
from m3d_lite.models.lamed import load_lamed
from m3d_lite.models.lora import find_model_dir
from m3d_lite.models.pretrained import load_llm_tokenizer
from m3d_lite.models.seg_pathway import StateStandardizer, seg_projector
from m3d_lite.models.segmentation import SegConfig, SegModule, seg_losses
from m3d_lite.models.tokenizer import add_m3d_tokens

TOKENIZER = "HuggingFaceTB/SmolLM2-135M-Instruct"  # only to build the items; the decoder never sees text


def positive_items(data: Path, split: str, tokenizer, count: int, rng: random.Random) -> list[dict]:
    """``count`` random segmentation-by-class items of ``split`` whose mask is not empty."""
    dataset = SegTaskDataset(data, split, tokenizer, num_image_tokens=64, max_length=512)
    items = []
    for index in rng.sample(range(len(dataset)), len(dataset)):
        item = dataset[index]
        if item["seg_mask"].any():
            items.append(item)
        if len(items) == count:
            return items
    raise ValueError(f"{data}: only {len(items)} non-empty segmentation items in {split}, wanted {count}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="phantom root")
    parser.add_argument("--scale", default="small", help="preset of the seg module")
    parser.add_argument(
        "--vision", type=Path, default=None, help="LaMed run whose vision tower starts the encoder"
    )
    parser.add_argument("--prompts", choices=("class", "seg"), default="class")
    parser.add_argument(
        "--standardize", action="store_true", help="seg prompts: standardise the states (seg_state_norm)"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-items", type=int, default=240)
    parser.add_argument("--test-items", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    lamed = None
    if args.vision is not None:
        model_dir = find_model_dir(args.vision, "config.json", "a LaMed model folder or its run")
        lamed, tokenizer = load_lamed(model_dir)
    elif args.prompts == "seg":
        parser.error("--prompts seg needs --vision: the LaMed whose [SEG] states become the prompts")
    else:
        tokenizer = load_llm_tokenizer(TOKENIZER)
        add_m3d_tokens(tokenizer)
    train = positive_items(args.data, "train", tokenizer, args.train_items, rng)
    test = positive_items(args.data, "test", tokenizer, args.test_items, rng)
    classes = sorted({item["class_name"] for item in train + test})

    def stack(items: list[dict]) -> tuple[torch.Tensor, ...]:
        labels = [classes.index(item["class_name"]) for item in items]
        images = torch.stack([item["images"] for item in items])
        return images, torch.stack([item["seg_mask"] for item in items]), torch.tensor(labels)

    (images, masks, labels), (test_images, test_masks, test_labels) = stack(train), stack(test)
    config = SegConfig.from_scale(args.scale)
    seg = SegModule(config)
    if args.prompts == "class":
        keys, test_keys = labels, test_labels
        prompter = torch.nn.Embedding(len(classes), config.embed_dim)
    else:
        hidden = lamed.config.text_config.hidden_size
        keys, test_keys = lamed.seg_states(train, progress=True), lamed.seg_states(test, progress=True)
        prompter = seg_projector(hidden, config.embed_dim)
        if args.standardize:
            standardizer = StateStandardizer(hidden)
            standardizer.fit(keys)
            prompter = torch.nn.Sequential(standardizer, prompter)
    if lamed is not None:
        seg.init_encoder_from(lamed.vision_tower.vision_tower)
        del lamed
    optimizer = torch.optim.AdamW([*seg.parameters(), *prompter.parameters()], lr=args.lr)
    print(
        f"{len(train)} train / {len(test)} test items, {len(classes)} classes, encoder "
        f"{'from ' + str(args.vision) if args.vision else 'random'}, {args.prompts} prompts, lr {args.lr}"
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train), (4,))
        losses = seg_losses(seg(images[batch], prompter(keys[batch])), masks[batch])
        (losses["dice"] + losses["bce"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            prompter.eval()
            with torch.no_grad():
                prompts = prompter(test_keys)
                chunks = range(0, len(test), 8)
                probs = torch.cat([seg(test_images[k : k + 8], prompts[k : k + 8]).sigmoid() for k in chunks])
            prompter.train()
            dice = compute_dice((probs > 0.5).float(), test_masks, ignore_empty=False).mean().item()
            names = [classes[label] for label in test_labels]
            rows = [{"class_name": name, "prompt": p} for name, p in zip(names, prompts, strict=True)]
            cosine = prompt_cosine(rows, lambda row: row["class_name"])
            print(
                f"step {step:4d}  train Dice loss {losses['dice'].item():.3f}  test Dice {dice:.3f}  "
                f"prompt cosine {cosine:.3f}  {time.perf_counter() - start:.0f} s"
            )


if __name__ == "__main__":
    main()
