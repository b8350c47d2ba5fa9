"""Where gptgen's native code (the C sampler kernels, the int8 op library) is built and cached, and the CPU
key the builds depend on (-march=native code is compiled for the CPU it runs on)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("GPTGEN_CACHE_DIR")
    if root:
        return Path(root) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gptgen" / "native"


def cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()
