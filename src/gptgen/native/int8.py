"""The int8 x int8 product of quantize="int8-dynamic" (int8_ops.cpp), built on first use as a PyTorch op.

`linear(x, packed, offset, wscale, bias, n)` quantizes each row of x to int8 (symmetric, max|x| / 127) and
multiplies it by the packed int8 weight, summing in int32: `torch.ops.gptgen.int8_dynamic_linear`, an
AVX512-VNNI kernel, where the CPU has AVX512-VNNI and a C++ compiler is on PATH; elsewhere (or with
GPTGEN_NATIVE=0) `reference`, PyTorch operations that give the same numbers. As a registered op with a
shape function, the kernel runs inside a torch.compile'd decode step as well as eagerly.

The library is compiled once per source, CPU and PyTorch version against PyTorch's own headers and
libraries, into the cache directory of gptgen's other native code ($GPTGEN_CACHE_DIR/native, else
~/.cache/gptgen/native), written atomically.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
from pathlib import Path

import torch

from .build import OUT, build_and_load, compiler, native_off

_SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_status = {"state": "not built", "detail": ""}
BLOCK = 16  # output rows per packed block
K_MULTIPLE = 16  # the packed width is a multiple of this


def cpu_has_vnni() -> bool:
    """AVX512F, AVX512BW and AVX512-VNNI on x86-64 (gptgen.hardware's detection)."""
    from ..hardware import cpu_features

    feats = cpu_features()
    return (platform.machine().lower() in ("x86_64", "amd64") and feats.avx512_vnni
            and {"avx512f", "avx512bw"} <= feats.flags)


def _commands(cxx: str) -> list[list[str]]:
    """Against PyTorch's own headers and libraries (its libgomp: one OpenMP runtime in the process)."""
    root = Path(torch.__file__).parent
    lib = root / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return [[cxx, "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", std, abi, "-w",
             f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
             str(_SOURCE), f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}", "-o", OUT]
            for std in ("-std=c++20", "-std=c++17")]


def _load(path: Path) -> bool:
    torch.ops.load_library(str(path))
    _register_fake()
    return True


def _register_fake() -> None:
    @torch.library.register_fake("gptgen::int8_dynamic_linear")
    def _(x, packed, offset, wscale, bias, n):
        return x.new_empty((x.shape[0], n), dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether torch.ops.gptgen.int8_dynamic_linear is loaded (built on the first call); status() says why not."""
    if native_off():
        _status.update(state="off", detail="GPTGEN_NATIVE=0")
        return False
    if not cpu_has_vnni():
        _status.update(state="unavailable", detail="the CPU lacks AVX512-VNNI")
        return False
    cxx = compiler((os.environ.get("CXX"), "c++", "g++", "clang++"))
    return bool(build_and_load("int8-ops", _SOURCE, torch.__version__.encode(), cxx,
                               "no C++ compiler (c++, g++ or clang++) on PATH", _commands, _load, _status, _lock))


def status() -> dict:
    """{'state': 'ready' | 'off' | 'unavailable' | 'not built', 'detail': path or reason}."""
    return dict(_status)


def pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight (N, K) as the kernel reads it, (ceil(N/16), Kp/4, 16, 4), and its offsets
    128 * sum_k q[n, k] (int32)."""
    n, k = q.shape
    kp, np_ = -(-k // K_MULTIPLE) * K_MULTIPLE, -(-n // BLOCK) * BLOCK
    padded = torch.zeros(np_, kp, dtype=torch.int8, device=q.device)
    padded[:n, :k] = q
    packed = padded.view(np_ // BLOCK, BLOCK, kp // 4, 4).permute(0, 2, 1, 3).contiguous()
    return packed, 128 * q.sum(dim=1, dtype=torch.int32)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (N, K) int8 weight back from pack's layout."""
    nb, k4 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(nb * BLOCK, k4 * 4)[:n, :k]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32 per row) with the kernel's rounding: q = round(x * (127 / amax))."""
    x = x.float()
    amax = x.abs().amax(dim=1).clamp(min=1e-12)
    # a true division, as the kernel's: 127.0 / t would be a reciprocal times 127 (other roundings)
    inv = torch.full_like(amax, 127.0).div(amax)
    return torch.round(x * inv[:, None]).to(torch.int8), amax / 127.0


def reference(x: torch.Tensor, q: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's numbers with PyTorch operations (exact int32 sums by torch._int_mm), float32 (M, N)."""
    xq, xs = quantize_rows(x)
    acc = torch._int_mm(xq, q.t()).float()
    y = acc * xs[:, None] * wscale
    return y + bias if bias is not None else y


def linear(x: torch.Tensor, packed: torch.Tensor, offset: torch.Tensor, wscale: torch.Tensor,
           bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x (M, K) float32/bf16 contiguous -> float32 (M, N) through the kernel (available() must be True)."""
    return torch.ops.gptgen.int8_dynamic_linear(x, packed, offset, wscale, bias, n)

