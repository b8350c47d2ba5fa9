"""Training: fit() and evaluate(), the Trainer, its options (TrainConfig), checkpoints, LR schedules, callbacks,
metrics, DDP helpers."""

from .callbacks import (Callback, EarlyStopping, LossCurvePlot, PrintEpochs, SampleText, plot_curves,
                        read_metrics)
from .metrics import TokenMetrics, linear_cross_entropy, masked_cross_entropy, perplexity
from .schedules import SCHEDULES, lr_multiplier, make_scheduler
from .trainer import FitResult, LossModule, TrainConfig, Trainer, evaluate, fit

__all__ = [
    "fit", "evaluate", "Trainer", "TrainConfig", "FitResult", "LossModule",
    "Callback", "SampleText", "PrintEpochs", "EarlyStopping", "LossCurvePlot", "plot_curves", "read_metrics",
    "TokenMetrics", "linear_cross_entropy", "masked_cross_entropy", "perplexity",
    "SCHEDULES", "lr_multiplier", "make_scheduler",
]
