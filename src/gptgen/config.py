"""GPTConfig and the named presets.

Two families share one config: GPT-2 (pre-LayerNorm, GELU-tanh, tied head, final LayerNorm) and the
KerasHub mini-GPT of the tutorials (post-LayerNorm, ReLU, untied Dense head with bias, no final norm,
3 heads of 85 dims on a 256-wide model).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, TokenizerError

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
NORM_POSITIONS = ("pre", "post")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    head_dim: int | None = None  # None: n_embd // n_head (KerasHub floors it: 256 // 3 = 85)
    n_inner: int | None = None  # feed-forward width; None: 4 * n_embd
    activation: str = "gelu_tanh"
    norm_position: str = "pre"
    final_norm: bool = True
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    init: str = "gpt2"  # "gpt2": normal(0, init_std); "keras": Glorot-uniform kernels as KerasHub
    init_std: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes ---------------------------------------------------------------------------
    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def attn_inner_dim(self) -> int:
        return self.attn_head_dim * self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"Unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}."
            )
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError(
                f"Unknown norm_position {self.norm_position!r}; choose 'pre' (GPT-2) or 'post' (KerasHub)."
            )
        if self.attn_head_dim <= 0:
            raise ConfigError(
                f"n_embd={self.n_embd} with n_head={self.n_head} leaves no dimensions per head."
            )
        if self.ffn_dim <= 0:
            raise ConfigError(f"GPTConfig.n_inner must be positive, got {self.n_inner!r}.")
        if self.init not in ("gpt2", "keras"):
            raise ConfigError(f"Unknown init {self.init!r}; choose 'gpt2' or 'keras'.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    # Serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"format", "gptgen_version"})
        if unknown:
            raise ConfigError(f"Unknown GPTConfig field(s): {', '.join(unknown)}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps({"format": "gptgen", **self.to_dict()}, indent=2, sort_keys=True)

    def replace(self, **overrides: Any) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ConfigError(f"Unknown GPTConfig field(s): {', '.join(bad)}.")
        return dataclasses.replace(self, **overrides)


def _gpt2(n_embd: int, n_layer: int, n_head: int) -> dict[str, Any]:
    return dict(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                bos_token_id=50256, eos_token_id=50256)


PRESETS: dict[str, dict[str, Any]] = {
    # The KerasHub "GPT text generation from scratch" model: 3,255,938 parameters.
    "mini": dict(
        vocab_size=5000, n_positions=128, n_embd=256, n_layer=2, n_head=3, n_inner=128,
        activation="relu", norm_position="post", final_norm=False, tie_word_embeddings=False,
        lm_head_bias=True, init="keras", pad_token_id=0, bos_token_id=2,
    ),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """Return the config of a named preset with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(values) - known)
    if bad:
        raise ConfigError(f"Unknown GPTConfig field(s): {', '.join(bad)}.")
    return GPTConfig(**values)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Config overrides from KEY=VALUE strings (values parsed as JSON when they are JSON, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--config takes KEY=VALUE, got {item!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def check_vocab_fits(tokenizer, config: GPTConfig) -> None:
    """TokenizerError unless every token id of the tokenizer has a row in the model's embedding."""
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"The tokenizer has {tokenizer.vocab_size:,} tokens but the model's embedding holds only "
            f"{config.vocab_size:,}; train a smaller vocabulary or build the model with vocab_size="
            f"{tokenizer.vocab_size}."
        )
