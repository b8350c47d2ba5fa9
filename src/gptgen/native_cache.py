"""Moved to gptgen.native.build (kept as an alias for existing imports)."""
from .native.build import *  # noqa: F401,F403
from .native.build import OUT, build_and_load, cache_dir, compiler, cpu_key, native_off  # noqa: F401
