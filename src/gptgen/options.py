"""Checks of run options a user gives (output directories, device, threads, seed), made before any work.

Each raises ConfigError with one sentence; the pipeline and the CLI verbs call them first, so a bad option
is reported before a corpus is read or a tokenizer trained.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import ConfigError

# The trainer seeds each epoch's generator with seed * 1_000_003 + epoch, which must stay below 2**64.
MAX_SEED = (2**64 - 1) // 1_000_003 - 1_000_000  # the epoch order seeds a generator with seed * 1_000_003 + epoch
MAX_THREADS = 4096


def check_output_dir(path: str | os.PathLike | None, what: str = "the output directory") -> Path | None:
    """A directory gptgen may create or write into: not a file, under no file, and writable."""
    if path is None:
        return None
    from .written import check_not_root_or_home

    check_not_root_or_home(path, what)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{what} {target} is a file, not a directory; choose a directory path.")
    parent = target
    while not parent.exists():  # the nearest ancestor that exists decides
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"Cannot create {what} {target}: {parent} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"Cannot write {what} {target}: {parent} is not writable.")
    return target


def check_positive_int(value, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def check_threads(threads) -> None:
    check_positive_int(threads, "threads (--threads)")
    if threads is not None and threads > MAX_THREADS:
        raise ConfigError(f"threads (--threads) must be at most {MAX_THREADS}, got {threads}.")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed (--seed) must be a whole number from 0 to {MAX_SEED:,}, got {seed!r}.")


def check_minutes(seconds, name: str = "max_time (--minutes)") -> None:
    """A time budget: None (no limit) or a positive, finite number."""
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (math.isfinite(seconds)
                                                                                 and seconds > 0):
        raise ConfigError(f"{name} must be a positive, finite time, got {seconds!r}.")


def check_device(device: str | None) -> str | None:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' that this machine has; ConfigError otherwise."""
    if device in (None, "auto"):
        return device
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from None
    if parsed.type == "cpu":
        return device
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu "
                              "(or auto).")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"Device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA GPU(s).")
        return device
    if parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"Device {device!r} asked for, but MPS is not available here; use --device cpu.")
        return device
    raise ConfigError(f"Device {device!r} is not supported; use auto, cpu, cuda or cuda:N.")


def resolve_device(device: str | None) -> str:
    """'auto' (or None): 'cuda' when a GPU is there, else 'cpu'; any other device checked and returned."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


# Sizes checked against the machine's memory before anything is allocated (gptgen.limits) -------------------
def parameter_count(config) -> int:
    """The parameters of a GPTConfig's model (embeddings, blocks, head), without building it."""
    e, inner, f, v = config.n_embd, config.attn_inner_dim, config.ffn_dim, config.vocab_size
    block = e * 3 * inner + 3 * inner + inner * e + e + e * f + f + f * e + e + 4 * e
    head = 0 if config.tie_word_embeddings else v * e + (v if config.lm_head_bias else 0)
    return (v + config.n_positions) * e + config.n_layer * block + (2 * e if config.final_norm else 0) + head


def check_model_memory(config, what: str = "the model (--preset/--config)", *, training: bool = False,
                       shards: int = 1) -> None:
    """ConfigError when a model of this config would not fit here: its fp32 weights (4 bytes a parameter),
    or to train it the weights, gradients and AdamW's two moments (16 bytes a parameter, split over
    `shards` processes under FSDP)."""
    from .limits import check_allocation

    params = parameter_count(config)
    per_param = 16 / max(1, shards) if training else 4
    check_allocation(f"{what} with {params:,} parameters", int(per_param * params),
                     advice="choose a smaller preset, or fewer or narrower layers with --config")


def check_batch_memory(config, batch_size: int, seq_len: int, *, examples: int | None = None, grad_accum: int = 1,
                       option: str = "batch_size (--batch-size)", training: bool = True) -> None:
    """ConfigError naming `option` when a (micro-)batch of batch_size rows of seq_len tokens would not fit in
    memory; a batch never holds more rows than there are examples."""
    from .limits import activation_bytes, check_allocation

    rows = -(-int(batch_size) // max(1, int(grad_accum)))
    if examples is not None:
        rows = min(rows, int(examples))
    check_allocation(option, activation_bytes(config, rows, seq_len, training=training), value=batch_size)
