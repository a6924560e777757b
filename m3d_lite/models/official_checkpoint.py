"""Read an official M3D checkpoint safely and move its tensors, renamed, into one of our modules.

A checkpoint is a local file or folder or a Hub id (:func:`fetch`); its tensors come from safetensors or
from ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors, so nothing in it
runs (:func:`read_checkpoint`). :func:`rename` maps every official key by rules or drops it for a stated
reason, and any other key is an error; :func:`load_into` checks the renamed tensors against a module built
on the meta device (no key missing, none left over, every shape equal) and hands them over without a copy,
so converting a 16 GB model needs its 16 GB once. :func:`vit_config` reads a ViT's sizes off its tensors.
The converters themselves are in :mod:`m3d_lite.models.official`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from m3d_lite.io import save_json
from m3d_lite.models.pretrained import PretrainedNotFoundError
from m3d_lite.models.vision import VisionConfig

CLIP_HUB_ID = "GoodBaiBai88/M3D-CLIP"
LAMED_HUB_IDS = ("GoodBaiBai88/M3D-LaMed-Phi-3-4B", "GoodBaiBai88/M3D-LaMed-Llama-2-7B")
REPORT_NAME = "conversion.json"
# configs, tokenizer files and safetensors; the .bin weights only when a repo has no safetensors (the LaMed
# repos hold both, and a 16 GB model.bin)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: ``mapped`` official key -> ours, ``dropped`` official key -> why."""

    kind: str
    source: str
    out_dir: str
    mapped: dict[str, str]
    dropped: dict[str, str]

    def __str__(self) -> str:
        reasons = "; ".join(f"{n} x {why}" for why, n in Counter(self.dropped.values()).items())
        dropped = f", {len(self.dropped)} dropped ({reasons})" if self.dropped else ""
        return f"{self.kind} {self.source}: {len(self.mapped)} tensors mapped{dropped} -> {self.out_dir}"


@dataclasses.dataclass
class Checkpoint:
    """The tensors and ``config.json`` (empty when absent) of an official checkpoint from ``source``."""

    source: str
    folder: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any]

    def shape(self, key: str, needed_for: str) -> tuple[int, ...]:
        """Shape of tensor ``key``; its absence is an error that says what it was needed for."""
        if key not in self.state:
            raise ValueError(f"{self.source}: no tensor {key!r}, which gives {needed_for}")
        return tuple(self.state[key].shape)

    def count(self, prefix: str) -> int:
        """How many numbered children ``prefix{i}.`` the checkpoint has (e.g. ViT blocks)."""
        found = {m.group(1) for k in self.state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return len(found)


def fetch(src: str | os.PathLike) -> Path:
    """A local file or folder as it is; a Hub id downloaded (or found in the Hugging Face cache).

    ``owner/name``: the repo's configs, tokenizer files and safetensors (its ``*.bin`` weights only when it
    has no safetensors). ``owner/name/FILE``: that file, plus the repo's ``config.json`` beside it.
    """
    text = os.fspath(src)
    path = Path(text).expanduser()
    if path.exists():
        return path
    parts = text.split("/")
    if text.startswith(("/", ".", "~")) or len(parts) < 2 or not all(parts):
        raise FileNotFoundError(
            f"checkpoint {text!r} does not exist: expected a local file or folder, or a Hub id such as "
            f"{CLIP_HUB_ID!r} or {LAMED_HUB_IDS[0]!r}"
        )
    repo_id = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            file = Path(hf_hub_download(repo_id, "/".join(parts[2:])))
            with contextlib.suppress(EntryNotFoundError):
                hf_hub_download(repo_id, "config.json")
            return file
        folder = Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=[*DOWNLOAD_PATTERNS, "*.bin"]))
        return folder
    except (OSError, HFValidationError) as error:
        raise PretrainedNotFoundError(
            f"{text!r} is not a local file or folder, and the Hugging Face Hub could not provide it "
            f"({type(error).__name__}: {error}). Where the Hub is reachable: `hf download {repo_id} "
            "--local-dir DIR`, then convert DIR"
        ) from error


def weight_files(path: Path) -> list[Path]:
    """The weight files of ``path``: the file itself, a folder's index shards, its safetensors, or its one
    ``.bin`` (safetensors win when a folder has both, as M3D's Hub repos do)."""
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(f"{path}: expected weights as .safetensors or .bin/.pt/.pth")
        return [path]
    for name in INDEX_NAMES:
        if (path / name).is_file():
            weight_map = json.loads((path / name).read_text())["weight_map"]
            return [path / shard for shard in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weights in this folder")
    if files[0].suffix == ".bin" and len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"{path}: several .bin files ({names}) and no index: pass the one to convert")
    return files


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file; pickles go through ``torch.load(weights_only=True)``."""
    if file.suffix == ".safetensors":
        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{file}: refused to unpickle it, it holds objects other than tensors (torch.load with "
            f"weights_only=True: {str(error).splitlines()[0]}). Official M3D weights are plain tensors; "
            "if you trust this file, convert it to safetensors first"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a flat state dict (name -> tensor), got {type(state).__name__}")
    return state


def read_checkpoint(src: str | os.PathLike, dtype: torch.dtype | None = None) -> Checkpoint:
    """Fetch ``src`` and read all its tensors (cast to ``dtype`` if given) and its ``config.json``."""
    path = fetch(src)
    folder = path if path.is_dir() else path.parent
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        part = read_weights(file)
        if twice := sorted(set(part) & set(state)):
            raise ValueError(f"{file}: tensors {twice[:5]} are also in another file of {path}")
        if dtype is not None:  # shard by shard, so that only one shard is ever held twice
            part = {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}
        state.update(part)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return Checkpoint(os.fspath(src), folder, state, config)


def rename(
    checkpoint: Checkpoint,
    rules: tuple[tuple[str, str], ...],
    drops: tuple[tuple[str, str], ...],
    what: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """(our state dict, official -> our key, official -> why dropped); a key no rule covers is an error."""
    state, mapped, dropped, unknown = {}, {}, {}, []
    for key, tensor in checkpoint.state.items():
        why = next((why for pattern, why in drops if re.fullmatch(pattern, key)), None)
        match = next((m.expand(t) for p, t in rules if (m := re.fullmatch(p, key))), None)
        if why is not None:
            dropped[key] = why
        elif match is not None:
            state[match], mapped[key] = tensor, match
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{checkpoint.source}: {len(unknown)} tensor(s) that the {what} converter neither maps nor "
            f"drops: {unknown[:10]}{' ...' if len(unknown) > 10 else ''} (is this an official {what} "
            "checkpoint?)"
        )
    return state, mapped, dropped


def load_into(model: nn.Module, state: dict[str, torch.Tensor], mapped: dict[str, str], source: str) -> None:
    """Give ``model`` (built on the meta device) the tensors of ``state`` after checking that they fit:
    every key of the model present, none left over, every shape equal; else an error listing them all."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {ours: theirs for theirs, ours in mapped.items()}
    problems = [f"missing: {k} {list(s)}" for k, s in expected.items() if k not in state]
    problems += [f"no place for {official[k]} (as {k})" for k in state if k not in expected]
    problems += [
        f"{official[k]}: shape {list(t.shape)}, but {k} is {list(expected[k])}"
        for k, t in state.items()
        if k in expected and tuple(t.shape) != expected[k]
    ]
    if problems:
        listed = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(
            f"{source} does not fit {type(model).__name__} ({len(problems)} problem(s)):\n  {listed}"
        )
    model.load_state_dict(state, strict=True, assign=True)


def vit_config(
    checkpoint: Checkpoint,
    prefix: str,
    image_size: tuple[int, ...],
    patch_size: tuple[int, ...],
    num_heads: int,
) -> VisionConfig:
    """The ViT under ``prefix``: width, MLP, depth and channels from its tensors, geometry and heads given
    (no tensor shows them); the token count and patch vector length must agree with the geometry."""
    hidden = checkpoint.shape(f"{prefix}norm.weight", "the ViT width")[0]
    tokens = checkpoint.shape(f"{prefix}patch_embedding.position_embeddings", "the patch count")[1]
    vector = checkpoint.shape(f"{prefix}patch_embedding.patch_embeddings.1.weight", "the patch size")[1]
    mlp = checkpoint.shape(f"{prefix}blocks.0.mlp.linear1.weight", "the ViT's MLP width")[0]
    grid = [s // p for s, p in zip(image_size, patch_size, strict=True)]
    if tokens != math.prod(grid) or vector % math.prod(patch_size):
        raise ValueError(
            f"{checkpoint.source}: the ViT {prefix!r} has {tokens} patch tokens of {vector} values, but "
            f"image_size {list(image_size)} / patch_size {list(patch_size)} give {math.prod(grid)} of "
            f"{math.prod(patch_size)} x channels: give the image_size and patch_size it was trained with"
        )
    if hidden % num_heads:
        raise ValueError(f"{checkpoint.source}: ViT width {hidden} is not divisible by {num_heads} heads")
    return VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=vector // math.prod(patch_size),
        hidden_size=hidden,
        mlp_dim=mlp,
        num_layers=checkpoint.count(f"{prefix}blocks."),
        num_heads=num_heads,
    )


def source_tokenizer(checkpoint: Checkpoint, config: PreTrainedConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the checkpoint, or None when its folder holds none. ``config`` is that of
    the model it serves (the checkpoint's own config.json names a model type transformers does not know)."""
    folder = checkpoint.folder
    if not (folder / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(folder, config=config)


def write_report(folder: Path, report: ConversionReport) -> None:
    """Save ``report`` as ``folder/conversion.json``."""
    save_json(folder / REPORT_NAME, dataclasses.asdict(report))
