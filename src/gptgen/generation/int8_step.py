"""Moved to gptgen.native.decoder (this module is that module, for existing imports)."""
import sys

from ..native import step as _decoder

sys.modules[__name__] = _decoder
