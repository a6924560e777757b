"""From the ``[SEG]`` token to a mask prompt: which hidden state, and the projector that maps it.

M3D (after LISA) takes the LLM's last-layer hidden state at the position whose NEXT token is ``[SEG]``,
i.e. the state that predicts ``[SEG]``, maps it with ``seg_projector`` (Linear-ReLU-Linear-Dropout) to
the mask decoder's prompt width, and decodes a mask from it. Several ``[SEG]`` in one answer: the mean
of their states; none: no mask for that row. In training the ``[SEG]`` positions are in ``input_ids``;
in generation they are among the generated tokens, whose predicting states come from ``generate``'s
per-step hidden states. The first generated token is predicted by the prompt's last state, which M3D's
generation never looks at (an answer that starts with ``[SEG]`` gets no mask there); here it counts.

Added (not in M3D): :class:`StateStandardizer`, per-dimension standardisation of the ``[SEG]`` states
before the projector, with statistics measured once on training data. The last-layer states of a small
LLM share a large common part (a few dimensions of huge magnitude, the same for every question); a fresh
projector trained from them maps every organ to nearly the same prompt: after 300 steps of
``benchmarks/seg_decoder.py --prompts seg`` on the small stage-1 model, mean cosine 0.91 between organs and
test Dice 0.14; with standardised states, cosine 0.49 and Dice 0.20.
"""

from __future__ import annotations

import torch
from torch import nn


def seg_projector(hidden_size: int, prompt_size: int, dropout: float = 0.1) -> nn.Sequential:
    """M3D's ``seg_projector``: Linear(H, H), ReLU, Linear(H, prompt), Dropout (keys ``0.*``, ``2.*``)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.ReLU(),
        nn.Linear(hidden_size, prompt_size),
        nn.Dropout(dropout),
    )


class StateStandardizer(nn.Module):
    """``(states - mean) / std`` per dimension; ``mean`` and ``std`` are buffers (saved with the model) that
    :meth:`fit` measures once on the ``[SEG]`` states of training items. Until then it is the identity."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    @torch.no_grad()
    def fit(self, states: torch.Tensor) -> None:
        """Take ``mean`` and ``std`` from N x size ``states`` (N >= 2, all finite)."""
        if states.ndim != 2 or states.shape[1] != len(self.mean) or len(states) < 2:
            raise ValueError(
                f"StateStandardizer.fit expects N x {len(self.mean)} states with N >= 2, "
                f"got {tuple(states.shape)}"
            )
        if not torch.isfinite(states).all():
            raise ValueError("StateStandardizer.fit: the [SEG] states hold NaN or inf values")
        states = states.float()
        self.mean.copy_(states.mean(0))
        self.std.copy_(states.std(0).clamp(min=self.eps))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.mean) / self.std


def fold_state_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LaMed ``state`` dict with ``seg_state_norm``'s ``mean`` and ``std`` folded into the projector's
    first Linear and removed: Linear(W, b) of (x - mean) / std is Linear(W / std, b - (W / std) mean) of x.
    The prompts stay the same (to float rounding) in a layout without a place for the standardiser
    (M3D's). A state without ``seg_state_norm.*`` comes back unchanged."""
    state = dict(state)
    if "seg_state_norm.mean" not in state:
        return state
    mean, std = state.pop("seg_state_norm.mean").float(), state.pop("seg_state_norm.std").float()
    weight, bias = state["seg_projector.0.weight"], state["seg_projector.0.bias"]
    folded = weight.float() / std
    state["seg_projector.0.weight"] = folded.to(weight.dtype)
    state["seg_projector.0.bias"] = (bias.float() - folded @ mean).to(bias.dtype)
    return state


def mean_over(states: torch.Tensor, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the mean of the B x L x H ``states`` where ``selected`` (B x L) is True; rows with no
    selected position get zeros. Returns (B x H means, B bool: row had at least one)."""
    weights = selected.to(states.dtype).unsqueeze(-1)
    counts = weights.sum(1)
    return (states * weights).sum(1) / counts.clamp(min=1), counts.squeeze(-1) > 0


def seg_token_states(
    hidden: torch.Tensor, input_ids: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training: the mean last-layer state that predicts each row's ``[SEG]`` tokens in ``input_ids``.

    ``hidden`` is B x L x H, aligned with ``input_ids`` (B x L); position t predicts token t + 1.
    Returns (B x H states, B bool: row holds a ``[SEG]``).
    """
    predicts_seg = torch.zeros_like(input_ids, dtype=torch.bool)
    predicts_seg[:, :-1] = input_ids[:, 1:] == seg_token_id
    return mean_over(hidden, predicts_seg)


def generated_seg_states(
    step_hidden_states: tuple[tuple[torch.Tensor, ...], ...], new_tokens: torch.Tensor, seg_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation: the mean state that predicted each row's generated ``[SEG]`` tokens.

    ``step_hidden_states`` is ``generate(..., output_hidden_states=True, return_dict_in_generate=True)``'s
    ``hidden_states``: one tuple of per-layer states per step; step 0 covers the prompt (B x L x H), each
    later step one token (B x 1 x H). The state that predicted new token j is the last position of step j.
    ``new_tokens`` is B x T (T <= steps). Returns (B x H states, B bool: row generated a ``[SEG]``).
    """
    steps = new_tokens.shape[1]
    predictors = torch.stack([step[-1][:, -1] for step in step_hidden_states[:steps]], dim=1)
    return mean_over(predictors, new_tokens == seg_token_id)
