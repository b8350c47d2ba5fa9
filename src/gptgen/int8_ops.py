"""Moved to gptgen.native.int8 (this module is that module, for existing imports)."""
import sys

from .native import int8 as _int8

sys.modules[__name__] = _int8
