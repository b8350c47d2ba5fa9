"""How much memory a size a user sets would take, checked before anything is allocated.

Every size-like option (tokenizer vocabulary, batch sizes, sequence lengths, beams, returned sequences, the
server's batch and queue) goes through `check_allocation` with an estimate of the bytes it will allocate.
The limit is a share of the memory the machine (or its cgroup) has available now, so a size that cannot fit
is refused with one sentence naming the option, instead of growing until the kernel kills the process.

The environment variable GPTGEN_MEMORY_LIMIT (bytes, or a number with K/M/G/T) caps the memory gptgen
believes it has, for a process that must stay well below the machine's total.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError, GptgenError

# gptgen allows a single allocation this share of the available memory: the rest is for the model, the
# interpreter, and whatever else runs on the machine.
SAFE_SHARE = 0.5
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """What the process's memory cgroup still allows (v2, then v1), None without a limit."""
    limit = _read_int("/sys/fs/cgroup/memory.max")
    if limit is not None:
        used = _read_int("/sys/fs/cgroup/memory.current") or 0
        return max(limit - used, 0)
    limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if limit is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes") or 0
        return max(limit - used, 0)
    return None


def _portable_available() -> int | None:
    try:
        import psutil  # optional: macOS and Windows
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except Exception:  # pragma: no cover - psutil without support for this platform
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5g', '1000000' -> bytes; ConfigError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ConfigError(f"GPTGEN_MEMORY_LIMIT must be a size such as 4G or 512M, got {text!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by any cgroup limit and GPTGEN_MEMORY_LIMIT."""
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not candidates:
        portable = _portable_available()
        if portable is not None:
            candidates.append(portable)
    override = os.environ.get("GPTGEN_MEMORY_LIMIT")
    if override:
        candidates.append(parse_bytes(override))
    if not candidates:  # pragma: no cover - no way to ask this platform: assume a small machine
        return 4 << 30
    return max(min(candidates), 0)


def format_bytes(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def allowed_bytes() -> int:
    """The largest single allocation gptgen allows itself now."""
    return int(available_memory() * SAFE_SHARE)


def check_allocation(option: str, nbytes: int, *, value=None, error: type[GptgenError] = ConfigError,
                     advice: str | None = None) -> None:
    """Refuse `option` (=`value`) when the `nbytes` it would allocate exceed a safe share of free memory.

    Raises `error` with one sentence naming the option, the estimate and the limit; `advice` replaces the
    closing "lower OPTION".
    """
    nbytes = int(nbytes)
    limit = allowed_bytes()
    if nbytes <= limit:
        return
    if value is None:
        shown = option
    else:
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        shown = f"{option} of {text}" if " " in option else f"{option}={text}"
    raise error(
        f"{shown} would need about {format_bytes(nbytes)} of memory, more than the {format_bytes(limit)} "
        f"gptgen allows itself ({SAFE_SHARE:.0%} of the {format_bytes(available_memory())} available); "
        f"{advice or 'lower ' + option}."
    )


def dtype_size(dtype) -> int:
    """Bytes per element of a torch dtype, a dtype name ('float16', 'bf16') or an itemsize."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return dtype
    import torch

    if isinstance(dtype, str):
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                "float": "float32", "int8": "int8"}.get(dtype.lower(), dtype.lower())
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"Unknown dtype {name!r}.")
    if dtype is None:
        dtype = torch.get_default_dtype()
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(config, rows: int, length: int, dtype) -> int:
    """Bytes of the key and value caches of `rows` rows of `length` positions for a GPTConfig."""
    per_position = 2 * config.n_layer * config.n_head * config.attn_head_dim
    return int(rows) * int(length) * per_position * dtype_size(dtype)


def activation_bytes(config, batch: int, length: int, dtype=4, *, training: bool = True) -> int:
    """A rough upper estimate of a forward (and backward) pass's activations for batch x length tokens.

    Per layer and token: the residual stream, attention projections, the feed-forward hidden layer and the
    attention scores (length per head); with training, the logits' float32 copy and its gradient too.
    """
    size = dtype_size(dtype)
    tokens = int(batch) * int(length)
    per_token_layer = 8 * config.n_embd + 2 * config.ffn_dim + 4 * config.attn_inner_dim
    scores = int(batch) * config.n_head * int(length) * int(length) * (2 if training else 1)
    total = config.n_layer * (tokens * per_token_layer + scores) * size
    logits = tokens * config.vocab_size * 4 * (3 if training else 1)
    return int(total + logits)
