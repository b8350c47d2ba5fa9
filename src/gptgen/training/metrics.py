"""Masked cross-entropy, token accuracy and token-weighted running metrics.

`linear_cross_entropy` fuses the LM head with the loss: it works through the (non-padding) positions in
chunks, so the full (tokens x vocabulary) logits never exist at once, and it computes the gradients in
the same pass. On CPU that keeps each chunk of logits in cache, which is where a small model such as
the `mini` preset spends most of its time (log-softmax forward and backward over 5,000 classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the positions where loss_mask is True (all positions without a mask).

    reduction "mean" averages over the counted tokens (Keras's masked loss), "sum" adds them up.
    """
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    if loss_mask is None:
        total, count = losses.sum(), losses.numel()
    else:
        mask = loss_mask.reshape(-1).to(losses.dtype)
        total, count = (losses * mask).sum(), mask.sum()
    if reduction == "sum":
        return total
    return total / count


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> float:
    """The fraction of counted positions where the arg-max token is the label."""
    hits = logits.argmax(-1) == labels
    if loss_mask is not None:
        return float(hits[loss_mask].float().mean())
    return float(hits.float().mean())


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 4096
    # About 8 MB of float32 logits per chunk: stays in the last-level cache of a server CPU.
    return max(64, (2 * 1024 * 1024) // max(1, vocab_size))


_GROUP_BYTES = 256 * 1024 * 1024  # low-precision logit gradients kept for one weight-gradient product


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of -log softmax(hidden @ W.T + b)[target] over rows, plus the count of correct arg-maxes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, need_grad, compute_dtype):
        rows = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: at least float32
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad else None
        grad_b = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                  if need_grad and bias is not None else None)
        # In a low-precision compute dtype the head's weight gradient is a product per group of chunks,
        # written into a float32 sum once per group: adding a (vocab x width) float32 product per chunk
        # would move that matrix through memory every chunk (for GPT-2, 154 MB per 64 rows). A group is a
        # whole number of chunks.
        grouped = need_grad and compute_dtype != acc
        group_rows = rows
        group_g = None
        if grouped:
            group_rows = max(1, _GROUP_BYTES // (2 * weight.shape[0] * chunk_rows)) * chunk_rows
            group_g = torch.empty(min(group_rows, rows), weight.shape[0], dtype=compute_dtype, device=hidden.device)
        for group in range(0, rows, group_rows):
            g_rows = min(group_rows, rows - group)
            for start in range(group, group + g_rows, chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute_dtype)
                t = targets[start:start + chunk_rows]
                logits = F.linear(h, w, b).to(acc)
                # Few passes over the chunk, all in place: max, shift+exp, sum (then scale for the gradient).
                top = logits.amax(dim=-1, keepdim=True)
                target_logit = logits.gather(1, t[:, None])
                correct += (target_logit >= top).sum()  # the label holds the highest score (arg-max hit)
                probs = logits.sub_(top).exp_()
                total = probs.sum(dim=-1, keepdim=True)
                loss_sum += (top + total.log() - target_logit).sum()
                if not need_grad:
                    continue
                # d(sum loss)/d logits = softmax - one_hot.
                probs.div_(total)
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if grad_b is not None:
                    grad_b += probs.sum(0)
                if grouped:
                    group_g[start - group:start - group + t.shape[0]] = probs
                elif hidden.dtype == compute_dtype:  # write straight into the gradient: no extra copy
                    torch.mm(probs, w, out=grad_h[start:start + chunk_rows])
                    grad_w.addmm_(probs.t(), h)
                else:
                    grad_h[start:start + chunk_rows] = (probs @ w).to(hidden.dtype)
                    grad_w.addmm_(probs.t(), h)
            if grouped:
                g = group_g[:g_rows]
                grad_h[group:group + g_rows] = (g @ w).to(hidden.dtype)
                grad_w += (g.t() @ hidden[group:group + g_rows].to(compute_dtype)).to(acc)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.param_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(ctx.param_dtype)
        gb = (grad_b * grad_loss).to(ctx.param_dtype) if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_rows: int | None = None):
    """(sum of token losses, number of correct arg-max predictions) for rows of hidden states.

    hidden: (N, C) already restricted to the counted positions; targets: (N,). Equal to
    F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum") with its gradients.
    Under autocast the matrix products run in the autocast dtype and the softmax in float32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = weight.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
    with torch.autocast(device_type, enabled=False):
        loss_sum, correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, need_grad,
                                                      compute_dtype)
    return loss_sum, correct


class TokenMetrics:
    """Token-weighted loss, perplexity and accuracy accumulated over batches (Keras's masked metrics)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.tokens = 0

    def update(self, loss_sum: float, correct: int, tokens: int) -> None:
        self.loss_sum += float(loss_sum)
        self.correct += int(correct)
        self.tokens += int(tokens)

    def state(self) -> list:
        return [self.loss_sum, self.correct, self.tokens]

    def load_state(self, state) -> None:
        self.loss_sum, self.correct, self.tokens = float(state[0]), int(state[1]), int(state[2])

    def compute(self) -> dict[str, float]:
        if self.tokens == 0:
            return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "tokens": 0}
        loss = self.loss_sum / self.tokens
        return {"loss": loss, "perplexity": perplexity(loss), "accuracy": self.correct / self.tokens,
                "tokens": self.tokens}
