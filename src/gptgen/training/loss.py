"""The loss module: the model body, then the fused head + masked cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn

from .metrics import linear_cross_entropy


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states of GPT (causal attention; right padding needs no mask)."""
    return model.hidden_states(input_ids)


class LossModule(nn.Module):
    """forward(input_ids, labels, loss_mask) -> (sum of token losses, correct predictions)."""

    def __init__(self, model: nn.Module, compile: bool = False, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows
        body = lambda ids: hidden_states(self.model, ids)  # noqa: E731
        self.body = torch.compile(body, dynamic=False) if compile else body

    def forward(self, input_ids, labels, loss_mask):
        h = self.body(input_ids)
        keep = loss_mask.reshape(-1)
        rows, targets = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        if not bool(keep.all()):  # only counted positions reach the head (padding costs no head FLOPs)
            rows, targets = rows[keep], targets[keep]
        head = self.model.lm_head
        return linear_cross_entropy(rows, head.weight, head.bias, targets, self.chunk_rows)
