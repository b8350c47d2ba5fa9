"""Errors a user can cause. Each carries one clear sentence; the CLI prints it and exits 2."""


class GptgenError(Exception):
    """Base class of every error gptgen raises for bad input."""


class ConfigError(GptgenError, ValueError):
    """An invalid model configuration or an unknown preset."""


class CheckpointError(GptgenError):
    """A model directory that is missing, truncated, or does not fit its configuration."""


class TokenizerError(GptgenError, ValueError):
    """An unknown tokenizer kind, unreadable tokenizer files, or a tokenizer that does not fit the model."""


class DataError(GptgenError, ValueError):
    """A corpus that is empty, unreadable, or filtered down to nothing."""


class GenerationError(GptgenError, ValueError):
    """Invalid decoding options or prompts."""


class TrainingError(GptgenError):
    """A training run that cannot start or cannot go on (for example a NaN loss)."""
