"""generate_answers: the decoded text of LaMed's own generate, batched and left-padded, greedy by default."""

import pytest
import torch

from m3d_lite.infer import generate_answers
from m3d_lite.models import build_lamed, encode_prompts

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
