"""Which hidden state becomes the mask prompt: the one that predicts [SEG], in training and in generation."""

import pytest
import torch

from m3d_lite.models.seg_pathway import (
    StateStandardizer,
    generated_seg_states,
    seg_projector,
    seg_token_states,
)

SEG = 99


def test_training_states_are_those_that_predict_seg():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    input_ids = torch.tensor([[1, 2, 3, SEG, 4, SEG], [1, 2, 3, 4, 5, 6]])
    states, has_seg = seg_token_states(hidden, input_ids, SEG)
    assert has_seg.tolist() == [True, False]
    torch.testing.assert_close(states[0], (hidden[0, 2] + hidden[0, 4]) / 2)  # the states BEFORE each [SEG]
    assert torch.equal(states[1], torch.zeros(3))


def test_generation_counts_a_seg_as_the_first_new_token():
    prompt_length, width = 4, 2
    # per step, two layers; only the last layer counts. Step 0 is the prompt, then one position per step.
    step0 = (torch.zeros(2, prompt_length, width), torch.arange(16.0).reshape(2, prompt_length, width))
    later = [(torch.zeros(2, 1, width), torch.full((2, 1, width), 100.0 + j)) for j in range(1, 3)]
    new_tokens = torch.tensor([[SEG, 7, 8], [7, SEG, SEG]])
    states, has_seg = generated_seg_states((step0, *later), new_tokens, SEG)
    assert has_seg.tolist() == [True, True]
    torch.testing.assert_close(states[0], step0[1][0, -1])  # first token: the prompt state
    torch.testing.assert_close(states[1], torch.full((width,), (101.0 + 102.0) / 2))
    states, has_seg = generated_seg_states((step0, *later), torch.tensor([[7, 8, 9], [7, 8, 9]]), SEG)
    assert not has_seg.any() and not states.any()


def test_seg_projector_has_m3d_keys_and_shape():
    projector = seg_projector(16, 8)
    assert sorted(projector.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert projector(torch.randn(3, 16)).shape == (3, 8)


def test_state_standardizer_is_the_identity_until_fitted_then_standardises():
    norm = StateStandardizer(4)
    states = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 10, 100, 1e3])
    states += torch.tensor([0, 5, -50, 500])  # the large shared part an LLM's last layer has
    assert torch.equal(norm(states), states)
    norm.fit(states)
    torch.testing.assert_close(norm(states).mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm(states).std(0), torch.ones(4))
    assert sorted(norm.state_dict()) == ["mean", "std"]  # saved with the model
    norm.fit(torch.ones(3, 4))  # a constant dimension: divided by eps, not by zero
    assert torch.equal(norm(torch.ones(2, 4)), torch.zeros(2, 4))


def test_state_standardizer_refuses_bad_states():
    norm = StateStandardizer(4)
    with pytest.raises(ValueError, match=r"expects N x 4 states with N >= 2, got \(1, 4\)"):
        norm.fit(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"got \(5, 3\)"):
        norm.fit(torch.randn(5, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        norm.fit(torch.tensor([[0.0, 1, 2, 3], [float("nan"), 1, 2, 3]]))
