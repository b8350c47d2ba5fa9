"""Named recipes: the settings of a tutorial's run, as data. `gptgen.train(recipe=NAME, ...)` and
`gptgen train --recipe NAME` start from them; settings given explicitly win.

Every key is a keyword of gptgen.train (see gptgen.pipeline.DEFAULTS for the ones a recipe leaves out).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    # The KerasHub "GPT text generation from scratch" tutorial (seed 002) on the paragraphs of the books
    # corpus: a lowercased WordPiece vocabulary of 5,000 with [PAD] [UNK] [BOS], paragraphs of more than
    # 512 characters, [BOS] + 127 tokens per example, the 2-block mini preset, Adam 1e-3 (eps 1e-7), 5 epochs.
    "keras-mini": dict(
        preset="mini", train_tokenizer="wordpiece", vocab_size=5000, lowercase=True,
        reserved_tokens=["[PAD]", "[UNK]", "[BOS]"], dataset="books", reader="paragraphs", split="every_nth:10",
        min_length=512, seq_len=128, packing="pad", add_bos=True, batch_size=64, epochs=5, lr=1e-3,
        schedule="constant", weight_decay=0.0, eps=1e-7, samples=True,
    ),
    # `gptgen quickstart`: the same model on the packaged Persuasion paragraphs, at most 3 minutes / 20
    # epochs, stopping when the validation loss has not improved for two epochs.
    "quickstart": dict(
        preset="mini", train_tokenizer="wordpiece", vocab_size=4000, lowercase=True,
        reserved_tokens=["[PAD]", "[UNK]", "[BOS]"], dataset="quickstart", packing="pad", add_bos=True,
        batch_size=32, epochs=20, max_time=180.0, lr=1e-3, schedule="constant", eps=1e-7, early_stopping=2,
        samples=True, sample_tokens=40, sampler="top_k", top_k=10,
    ),
}


def recipe_settings(name: str | None) -> dict[str, Any]:
    """A copy of a named recipe's settings ({} for None)."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}; choose one of {', '.join(sorted(RECIPES))}.")
    return {k: list(v) if isinstance(v, list) else v for k, v in RECIPES[name].items()}
