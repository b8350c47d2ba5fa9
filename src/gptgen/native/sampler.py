"""The CPU sampler kernels of native.c, compiled on first use with the machine's C compiler.

Eager PyTorch pays a fixed cost per operation that dwarfs the arithmetic of a sampler on one decode
step's logits (an argmax over 16 rows of GPT-2's 50,257 tokens takes ~1 ms on a 2-core Xeon; the top-k
candidate search of a top-k/top-p sampler several ms). The two scans in native.c do the same work in one
pass each. They are optional: without a C compiler (or with GPTGEN_NATIVE=0) every caller takes the
PyTorch path, and both give the same tokens.

The library is built once per source and CPU (it is compiled for the CPU it runs on) into
$GPTGEN_CACHE_DIR, else $XDG_CACHE_HOME/gptgen, else ~/.cache/gptgen (a temporary directory when that
cannot be written), written atomically, and loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import torch

from .build import OUT, build_and_load, compiler, native_off

_SOURCE = Path(__file__).with_name("sampler.c")
_lock = threading.Lock()
_status = {"state": "not built", "detail": ""}


def _commands(cc: str) -> list[list[str]]:
    base = ["-O3", "-shared", "-fPIC", "-std=c11", "-fno-math-errno", str(_SOURCE), "-o", OUT]
    return [[cc, arch, *base] if arch else [cc, *base]  # gcc/clang on x86 / arm; then generic
            for arch in ("-march=native", "-mcpu=native", "")]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gg_argmax.argtypes = [p, i64, i64, i64, p]
    lib.gg_argmax.restype = None
    lib.gg_top_candidates.argtypes = [p, i64, i64, i64, p, i64, p, p, p]
    lib.gg_top_candidates.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be had (status() says why)."""
    if native_off():
        _status.update(state="off", detail="GPTGEN_NATIVE=0")
        return None
    cc = compiler((os.environ.get("CC"), "cc", "gcc", "clang"))
    return build_and_load("kernels", _SOURCE, b"", cc, "no C compiler (cc, gcc or clang) on PATH", _commands,
                          lambda path: _declare(ctypes.CDLL(str(path))), _status, _lock, timeout=120)


def status() -> dict:
    """{'state': 'ready' | 'off' | 'unavailable' | 'not built', 'detail': path or reason}."""
    return dict(_status)


def _usable(scores: torch.Tensor) -> bool:
    return (scores.device.type == "cpu" and scores.dim() == 2 and scores.shape[0] > 0 and scores.shape[1] > 0
            and scores.dtype in (torch.float32, torch.bfloat16, torch.float16) and not scores.requires_grad)


def _float_rows(scores: torch.Tensor) -> torch.Tensor:
    """float32 rows with unit stride along the vocabulary (a bf16/fp16 row converts exactly)."""
    if scores.dtype != torch.float32:
        scores = scores.float()
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    return scores


def argmax(scores: torch.Tensor) -> torch.Tensor | None:
    """torch.argmax(scores, dim=-1) for CPU rows (rows, vocab), or None where the kernel cannot answer
    (not built, other device or dtype, a NaN in some row)."""
    lib = library() if _usable(scores) else None
    if lib is None:
        return None
    x = _float_rows(scores)
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.gg_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    if bool((out < 0).any()):
        return None
    return out


def top_candidates(scores: torch.Tensor, k, cap: int):
    """(values, ids) (rows, n), in increasing id order, of every token whose score is at least its row's
    k-th largest (k: a Python int or one per row, each >= 1), padded with -inf (and a valid id) past a
    row's count; n is the largest count. None where the kernel cannot answer: not built, a NaN, or some
    row with more than cap such tokens (many ties)."""
    lib = library() if _usable(scores) else None
    if lib is None:
        return None
    x = _float_rows(scores)
    rows, vocab = x.shape
    ks = torch.full((rows,), int(k), dtype=torch.long) if isinstance(k, int) else k.reshape(-1).to(torch.long).contiguous()
    cap = max(1, min(int(cap), vocab))
    values = torch.empty(rows, cap, dtype=torch.float32)
    ids = torch.empty(rows, cap, dtype=torch.long)
    counts = torch.empty(rows, dtype=torch.long)
    if lib.gg_top_candidates(x.data_ptr(), rows, vocab, x.stride(0), ks.data_ptr(), cap, values.data_ptr(),
                             ids.data_ptr(), counts.data_ptr()) != 0:
        return None
    low, high = int(counts.min()), int(counts.max())
    if low < 1 or high > cap:
        return None
    if scores.dtype != torch.float32:
        values = values.to(scores.dtype)
    return values[:, :high], ids[:, :high]
