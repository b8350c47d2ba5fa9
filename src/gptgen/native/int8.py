"""The int8 x int8 product of quantize="int8-dynamic" and the native decode step's library (kernels.cpp).

`linear(x, packed, offset, wscale, bias, n)` quantizes each row of x to int8 (symmetric, max|x| / 127) and
multiplies it by the packed int8 weight, summing in int32: `torch.ops.gptgen.int8_dynamic_linear`, on the
fastest instruction-set path this CPU runs (AMX, AVX512-VNNI, AVX2 + FMA, or portable C++: see
kernels.cpp), where a C++ compiler is on PATH; elsewhere (or with GPTGEN_NATIVE=0) `reference`, PyTorch
operations that give the same numbers. Every path gives exactly the reference's numbers. As a registered op
with a shape function, the kernel runs inside a torch.compile'd decode step as well as eagerly.

The library is compiled once per source, CPU and PyTorch version against PyTorch's own headers and
libraries, into the cache directory of gptgen's other native code ($GPTGEN_CACHE_DIR/native, else
~/.cache/gptgen/native), written atomically. It is compiled for the baseline instruction set with each
path's functions compiled for their own (one build serves every path); the path in use is chosen at run
time from gptgen.hardware's detection, capped by GPTGEN_CPU_FEATURES, and `use_path` switches it (tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
from pathlib import Path

import torch

from ..hardware import ISA_PATHS, isa_paths
from .build import OUT, build_and_load, compiler, native_off

_SOURCE = Path(__file__).with_name("kernels.cpp")
_HEADERS = (Path(__file__).with_name("generic.h"),)
_lock = threading.Lock()
_status = {"state": "not built", "detail": ""}
_max_isa = -1  # the highest path of the loaded library (-1: not loaded)
BLOCK = 16  # output rows per packed block
K_MULTIPLE = 16  # the packed width is a multiple of this
# The path whose int8 product is at least as fast as fp32 at batch 1 (measured: docs/performance.md)
FAST_INT8_PATHS = ("avx2", "avx512", "amx")


def cpu_has_vnni() -> bool:
    """AVX512F, AVX512BW, AVX512VL and AVX512-VNNI on x86-64, not masked (gptgen.hardware's detection)."""
    return isa_paths().get("avx512") == ""


def _commands(cxx: str) -> list[list[str]]:
    """Against PyTorch's own headers and libraries (its libgomp: one OpenMP runtime in the process). No
    -march: the kernels of each path carry their own target, so the library runs on any CPU of the kind."""
    root = Path(torch.__file__).parent
    lib = root / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    arches = ([[]] if x86 else [["-mcpu=native"], []])
    defines = [[], ["-DGPTGEN_NO_AMX"]] if x86 else [[]]
    return [[cxx, "-O3", *arch, *define, "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17", abi,
             "-w", f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
             str(_SOURCE), f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}", "-o", OUT]
            for arch in arches for define in defines]


def _load(path: Path) -> bool:
    global _max_isa
    torch.ops.load_library(str(path))
    _register_fake()
    _max_isa = int(torch.ops.gptgen.max_isa())
    select_path(best_path())
    return True


def _register_fake() -> None:
    @torch.library.register_fake("gptgen::int8_dynamic_linear")
    def _(x, packed, offset, wscale, bias, n):
        return x.new_empty((x.shape[0], n), dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the library (torch.ops.gptgen.int8_dynamic_linear, torch.classes.gptgen.Int8Decoder) is loaded,
    built on the first call; status() says why not."""
    if native_off():
        _status.update(state="off", detail="GPTGEN_NATIVE=0")
        return False
    cxx = compiler((os.environ.get("CXX"), "c++", "g++", "clang++"))
    key = torch.__version__.encode() + b"".join(h.read_bytes() for h in _HEADERS)
    return bool(build_and_load("int8-ops", _SOURCE, key, cxx, "no C++ compiler (c++, g++ or clang++) on PATH",
                               _commands, _load, _status, _lock, timeout=300))


def paths() -> dict[str, str]:
    """Each instruction-set path mapped to '' where this CPU and build run it, else why not."""
    out = dict(isa_paths())
    built = _max_isa
    for i, name in enumerate(ISA_PATHS):
        if not out[name] and i > built:
            out[name] = "not in this build (compiler without that target)" if built >= 0 else "library not loaded"
    return out


def best_path() -> str:
    """The fastest path this CPU and build run."""
    runs = paths()
    return [p for p in ISA_PATHS if runs[p] == ""][-1] if runs["portable"] == "" else "portable"


def current_path() -> str | None:
    """The path the kernels run on now (None before the library is loaded)."""
    return _status.get("path")


def select_path(name: str) -> str:
    """Make the kernels run on path `name` (one of ISA_PATHS this CPU runs); returns it."""
    why = paths().get(name)
    if why is None:
        raise ValueError(f"unknown instruction-set path {name!r}; one of {', '.join(ISA_PATHS)}")
    if why:
        raise ValueError(f"the {name} path cannot run here: {why}")
    level = int(torch.ops.gptgen.set_isa(ISA_PATHS.index(name)))
    _status["path"] = ISA_PATHS[level]
    return ISA_PATHS[level]


@contextlib.contextmanager
def use_path(name: str):
    """Run the kernels on path `name` inside the block (tests: each path against the reference)."""
    before = current_path() or best_path()
    select_path(name)
    try:
        yield name
    finally:
        select_path(before)


def status() -> dict:
    """{'state': 'ready' | 'off' | 'unavailable' | 'not built', 'detail': path or reason, 'path': the
    instruction-set path in use, 'paths': {path: '' or why it does not run}}."""
    out = {"state": _status["state"], "detail": _status["detail"]}
    if out["state"] == "ready":
        out.update(path=_status.get("path"), paths=paths())
    return out


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
    # (torch 2.13's _int_mm gives wrong sums at K = 1 on CPU: there the product is one multiply per element)
    acc = (torch._int_mm(xq, q.t()) if q.shape[1] > 1 else xq.int() * q.t().int()).float()
    y = acc * xs[:, None] * wscale
    return y + bias if bias is not None else y


def linear(x: torch.Tensor, packed: torch.Tensor, offset: torch.Tensor, wscale: torch.Tensor,
           bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x (M, K) float32/bf16 contiguous -> float32 (M, N) through the kernel (available() must be True)."""
    return torch.ops.gptgen.int8_dynamic_linear(x, packed, offset, wscale, bias, n)

