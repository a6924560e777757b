"""The launch path of the paper scale, shown at ci on the CPU: stage 2 (LoRA) as two gloo processes through
``accelerate launch -m m3d_lite.train instruct``, its model merged by ``m3d-lite export``, and the run and
the export reloaded with the same logits."""

from __future__ import annotations

import json

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from test_train_loop import accelerate_launch, read_metrics

from m3d_lite.cli import main as cli_main
from m3d_lite.infer import load_model
from m3d_lite.models.lamed import build_lamed, save_lamed
from m3d_lite.models.tokenizer import encode_prompts


def test_two_process_lora_run_is_merged_and_reloaded(phantom8, tmp_path):
    set_seed(1)
    model, tokenizer = build_lamed("ci")
    save_lamed(model, tokenizer, tmp_path / "align" / "model")
    out = tmp_path / "instruct"
    accelerate_launch(
        *("-m", "m3d_lite.train", "instruct", "--scale", "ci", "--data", str(phantom8)),
        *("--model", str(tmp_path / "align"), "--out", str(out), "--max-steps", "3"),
        *("--set", "batch_size=2", "--set", "global_batch_size=8", "--set", "log_every=1"),
    )
    derived = json.loads((out / "run.json").read_text())["derived"]
    assert derived == {"processes": 2, "grad_accum_steps": 2, "global_batch_size": 8, "mixed_precision": "no"}
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]  # one writer
    adapter = load_file(out / "model" / "adapter" / "adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for k, w in adapter.items() if "lora_B" in k)  # every adapter trained

    assert cli_main(["export", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    trained, tokenizer = load_model(out)
    merged, _ = load_model(tmp_path / "merged")
    prompts = encode_prompts(
        tokenizer, ["Describe the findings of this CT scan."], merged.config.proj_out_num
    )
    images = torch.rand(
        1, 1, *merged.config.vision_config.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected, got = (m(images=images, **prompts).logits for m in (trained, merged))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert merged.seg_module is not None  # stage 2 added and saved the seg module
