"""Inference: decoded greedy answers of LaMed's own generate, scans prepared from files, boxes parsed."""

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from m3d_lite.cli import main
from m3d_lite.data.datasets import load_volume_tensor
from m3d_lite.data.formats import parse_box
from m3d_lite.infer import (
    Answer,
    ScanInput,
    ask,
    generate_answers,
    load_model,
    load_scan,
    save_answer_mask,
)
from m3d_lite.models import build_lamed, encode_prompts, save_lamed
from m3d_lite.models.lora import LoraSettings, apply_lora, save_lamed_lora

QUESTIONS = ["Describe the scan.", "Which organ holds the lesion?"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("M3D_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        torch.manual_seed(0)
        model, tokenizer = build_lamed("ci", llm="tiny-llama")
    return model.eval(), tokenizer


def test_answers_are_the_decoded_greedy_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    images = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    answers = generate_answers(model, tokenizer, images, QUESTIONS, max_new_tokens=5)
    prompts = encode_prompts(tokenizer, QUESTIONS, model.config.proj_out_num)
    tokens = model.generate(images, **prompts, max_new_tokens=5, do_sample=False)
    assert answers == [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    assert generate_answers(model, tokenizer, images[1:], QUESTIONS[1:], max_new_tokens=5) == answers[1:]


def test_images_and_questions_must_match(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"B x 1 x D x H x W with B = 2 questions, got \(1, 1, 32, 64, 64\)"):
        generate_answers(model, tokenizer, torch.rand(1, 1, 32, 64, 64), QUESTIONS)


def test_load_scan_uses_prepared_npy_as_is_and_prepares_a_nifti(phantom8, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    size = model.config.vision_config.image_size
    npy = next((phantom8 / "M3D_Cap").rglob("*.npy"))
    prepared = load_scan(npy, size)
    assert prepared.volume is None and torch.equal(prepared.image, load_volume_tensor(npy))
    nifti = load_scan(phantom8 / "raw" / "phantom_00000" / "ct.nii.gz", size, window="soft tissue")
    assert nifti.image.shape == (1, *size) and 0 <= nifti.image.min() and nifti.image.max() <= 1
    assert nifti.volume is not None and nifti.prepared.crop_box is not None  # what maps a mask back
    answer = ask(model, tokenizer, nifti, "Where is the liver? Please output the box.", max_new_tokens=4)
    [text] = generate_answers(model, tokenizer, nifti.image[None], [answer.question], max_new_tokens=4)
    assert answer.text == text and answer.box is None  # a random LLM writes no box


def test_load_scan_and_ask_name_bad_input(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: scan not found"):
        load_scan(tmp_path / "missing.nii.gz", (32, 64, 64))
    bad = tmp_path / "nan.npy"
    values = np.full((1, 32, 64, 64), 0.5, dtype=np.float32)
    values[0, 0, 0, 0] = np.nan
    np.save(bad, values)
    with pytest.raises(ValueError, match=r"nan.npy: a prepared volume must hold finite values in \[0, 1\]"):
        load_scan(bad, (32, 64, 64))
    wrong = ScanInput(torch.rand(1, 16, 64, 64), "small.npy")
    with pytest.raises(
        ValueError, match=r"small.npy: image \(1, 16, 64, 64\), the model expects 1 x \(32, 64, 64\)"
    ):
        ask(model, tokenizer, wrong, "Describe the scan.")
    scan = ScanInput(torch.rand(1, 32, 64, 64), "ct.npy")
    budget = model.config.model_max_length
    with pytest.raises(ValueError, match=f"over the model's budget of {budget} tokens; shorten the question"):
        ask(model, tokenizer, scan, "Where is the liver? " * 40, max_new_tokens=16)


def test_an_answer_box_is_parsed():
    text = "Coordinates are <bx_start>[0.125, 0.25, 0.3, 0.5, 0.75, 0.9]<bx_end>."
    assert Answer("scan", "q", text, parse_box(text)).box == (0.125, 0.25, 0.3, 0.5, 0.75, 0.9)


@pytest.fixture(scope="module")
def saved_models(model_and_tokenizer, tmp_path_factory):
    """The fixture model as a plain LaMed folder and, with a non-zero LoRA adapter, as a stage-2 run."""
    model, tokenizer = model_and_tokenizer
    root = tmp_path_factory.mktemp("models")
    save_lamed(model, tokenizer, root / "plain")
    torch.manual_seed(1)
    wrapped = apply_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, weight in wrapped.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)  # B = 0 would make the adapter a no-op
    save_lamed_lora(wrapped, tokenizer, root / "run" / "model")
    return root, wrapped


def test_load_model_reads_plain_folders_and_merges_lora_runs(saved_models, model_and_tokenizer):
    root, wrapped = saved_models
    model, _ = model_and_tokenizer
    images = torch.rand(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(2))
    input_ids = torch.tensor([[1] + [model.config.image_token_id] * model.config.proj_out_num + [5, 6]])
    plain, _ = load_model(root / "plain")
    merged, _ = load_model(root / "run")  # the run folder; its model/ holds base/ + adapter/
    with torch.no_grad():
        assert torch.equal(plain(images=images, input_ids=input_ids).logits, model(images, input_ids).logits)
        expected = wrapped.eval()(images=images, input_ids=input_ids).logits
        torch.testing.assert_close(
            merged(images=images, input_ids=input_ids).logits, expected, atol=1e-5, rtol=0
        )
    assert not merged.training and type(merged).__name__ == "LaMedForCausalLM"


def test_infer_command_prints_the_answer_and_draws_a_box(
    saved_models, phantom8, tmp_path, monkeypatch, capsys
):
    root, _ = saved_models
    scan = phantom8 / "raw" / "phantom_00000" / "ct.nii.gz"
    argv = [
        "infer",
        "--model",
        str(root / "plain"),
        "--image",
        str(scan),
        "--question",
        "Where is the liver?",
    ]
    assert main([*argv, "--window", "soft tissue", "--max-new-tokens", "3", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip()  # the (random) model's answer
    box_text = "Sure, the bounding box is <bx_start>[0.1, 0.2, 0.3, 0.6, 0.7, 0.8]<bx_end>."
    monkeypatch.setattr("m3d_lite.infer.generate_answers", lambda *args, **kwargs: [box_text])
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[0.1, 0.2, 0.3, 0.6, 0.7, 0.8]" in out and (tmp_path / "ct_answer.png").stat().st_size > 0
    assert main(["infer", "--model", str(tmp_path / "none"), "--image", str(scan), "--question", "?"]) == 2
    assert "none: no config.json in it nor in its model/" in capsys.readouterr().err


class StartWith(LogitsProcessor):
    """Make greedy decoding start with ``token`` (a random model would rarely write [SEG] by itself)."""

    def __init__(self, token: int):
        self.token, self.first = token, True

    def __call__(self, input_ids, scores):
        if self.first:
            scores[:] = float("-inf")
            scores[:, self.token] = 0.0
            self.first = False
        return scores


def test_a_seg_answer_gives_a_nifti_mask_on_the_input_grid(phantom8, tmp_path, capsys):
    torch.manual_seed(0)
    model, tokenizer = build_lamed("ci", llm="tiny-llama", segmentation=True)
    model.eval()
    ct = phantom8 / "raw" / "phantom_00000" / "ct.nii.gz"
    scan = load_scan(ct, model.config.vision_config.image_size, window="soft tissue")
    with torch.no_grad():
        model.seg_module.mask_decoder.txt_align_upscaled_embedding.bias.fill_(5.0)  # a mask that is not empty
    force = LogitsProcessorList([StartWith(model.config.seg_token_id)])
    answer = ask(
        model, tokenizer, scan, "Segment the liver.", max_new_tokens=3, segment=True, logits_processor=force
    )
    assert answer.text.startswith("[SEG]") and answer.mask.shape == (1, 32, 64, 64) and answer.mask.any()
    written = sitk.ReadImage(str(save_answer_mask(scan, answer.mask, tmp_path / "liver_mask.nii.gz")))
    source = sitk.ReadImage(str(ct))
    assert written.GetSize() == source.GetSize() and written.GetSpacing() == source.GetSpacing()
    assert written.GetOrigin() == source.GetOrigin() and written.GetDirection() == source.GetDirection()
    assert sitk.GetArrayFromImage(written).any()
    plain = ask(model, tokenizer, scan, "Segment the liver.", max_new_tokens=3, segment=True)
    assert (plain.mask is None) == ("[SEG]" not in plain.text)  # no [SEG], no mask
    save_lamed(model, tokenizer, tmp_path / "seg_model")
    argv = ["infer", "--model", str(tmp_path / "seg_model"), "--image", str(ct), "--question", "Segment it."]
    assert main([*argv, "--segment", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    wrote_mask = "ct_mask.nii.gz" in out and (tmp_path / "ct_mask.nii.gz").is_file()
    assert ("no [SEG] in the answer: no mask" in out) != wrote_mask
