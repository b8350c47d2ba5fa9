"""Moved to gptgen.native.sampler (this module is that module, for existing imports)."""
import sys

from ..native import sampler as _sampler

sys.modules[__name__] = _sampler
