"""gptgen: train, fine-tune, generate with and serve GPT models."""

from .config import PRESETS, GPTConfig, preset
from .errors import (CheckpointError, ConfigError, DataError, GenerationError, GptgenError, TokenizerError,
                     TrainingError)
from .generation.config import GenerationConfig
from .lm import LanguageModel, load
from .model import GPT
from .pipeline import Run, train
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "preset", "Tokenizer", "LanguageModel", "load", "train", "Run",
    "GptgenError", "ConfigError", "CheckpointError", "TokenizerError", "DataError", "GenerationError",
    "TrainingError", "GenerationConfig", "__version__",
]
