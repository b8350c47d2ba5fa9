"""Learning-rate schedules as multipliers of the base rate (for torch.optim.lr_scheduler.LambdaLR).

- "constant": the base rate (after an optional linear warmup); the mini-GPT recipe.
- "linear": linear decay to 0 at the last step (Keras PolynomialDecay with power 1 and end rate 0,
  the fine-tuning recipe of the GPT-2 tutorial), after an optional warmup.
- "cosine": linear warmup, then half a cosine down to min_lr_ratio * base rate.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import TrainingError

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(name: str, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """A function step -> multiplier of the base learning rate; `step` counts optimizer steps done."""
    if name not in SCHEDULES:
        raise TrainingError(f"Unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
    if total_steps <= 0:
        raise TrainingError(f"A schedule needs a positive number of steps, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise TrainingError(f"warmup_steps must be between 0 and the {total_steps} training steps, got {warmup_steps}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise TrainingError(f"min_lr_ratio must be between 0 and 1, got {min_lr_ratio}.")

    def warm(step: int) -> float | None:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return None

    if name == "constant":
        return lambda step: warm(step) or 1.0

    decay_steps = max(1, total_steps - warmup_steps)

    if name == "linear":
        def linear(step: int) -> float:
            w = warm(step)
            if w is not None:
                return w
            done = min(step - warmup_steps, decay_steps) / decay_steps
            return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - done)
        return linear

    def cosine(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        done = min(step - warmup_steps, decay_steps) / decay_steps
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))
    return cosine


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(name, total_steps, warmup_steps, min_lr_ratio))
