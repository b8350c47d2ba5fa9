"""gptgen's native code (the C sampler kernels, the int8 op library): where it is built and cached, the CPU
key the builds depend on (-march=native code is compiled for the CPU it runs on), and the build-once-then-load
step both libraries share."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


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


def native_off() -> bool:
    """GPTGEN_NATIVE=0 (or false/no/off) turns gptgen's native code off: every caller takes its PyTorch path."""
    return os.environ.get("GPTGEN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def compiler(names: Iterable[str | None]) -> str | None:
    """The first of names found on PATH, as a path."""
    for name in names:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(commands: list[list[str]], out: Path, timeout: float) -> str:
    """Run the commands (OUT in one stands for the file it writes) until one succeeds and move its file to out
    (atomically); '' on success, else the compiler's complaint (its first error line, or its last line)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        error = "failed"
        for cmd in commands:
            try:
                done = subprocess.run([tmp if a == OUT else a for a in cmd], capture_output=True, text=True,
                                      timeout=timeout)
            except (OSError, subprocess.SubprocessError) as e:
                return str(e)
            if done.returncode == 0:
                os.replace(tmp, out)
                return ""
            lines = (done.stderr or done.stdout).strip().splitlines()
            error = next((line for line in lines if "error" in line), lines[-1] if lines else "failed")
        return error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


OUT = "{out}"


def build_and_load(stem: str, source: Path, key: bytes, compiler_path: str | None, missing: str,
                   commands: Callable[[str], list[list[str]]], load: Callable[[Path], T], status: dict,
                   lock: threading.Lock, timeout: float = 300) -> T | None:
    """The library `stem` built from source once per source, CPU, compile commands and key (into cache_dir(), else a temporary
    directory) and loaded; None where it cannot be had, with status[state/detail] saying why.

    commands(compiler_path): the compile commands to try in turn (OUT marks the output); load(path): the loaded
    library. `missing` is the detail when no compiler was found."""
    # the compiler and its flags are part of the key: another CXX or a changed command builds anew
    how = repr(commands(compiler_path)).encode() if compiler_path else b""
    digest = hashlib.sha256(source.read_bytes() + cpu_key().encode() + key + how).hexdigest()[:16]
    with lock:
        fallback = Path(tempfile.gettempdir()) / f"gptgen-native-{getattr(os, 'getuid', lambda: 0)()}"
        for directory in (cache_dir(), fallback):
            path = directory / f"{stem}-{digest}.so"
            if not path.exists():
                if compiler_path is None:
                    status.update(state="unavailable", detail=missing)
                    return None
                try:
                    error = _compile(commands(compiler_path), path, timeout)
                except OSError as e:
                    error = str(e)
                if error:
                    status.update(state="unavailable", detail=f"building {source.name} failed: {error}")
                    continue
            try:
                loaded = load(path)
            except (OSError, RuntimeError) as e:
                status.update(state="unavailable", detail=f"loading {path} failed: {e}")
                continue
            status.update(state="ready", detail=str(path))
            return loaded
    return None
