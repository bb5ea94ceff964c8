"""Hand-written, readable reference optimizers (float32 and float64): the oracles for compiled code.

Never imports ``coap_compile.passes`` or ``coap_compile.lowering``.
"""

from .adafactor import CoapAdafactor
from .adamw import CoapAdamW
from .common import ProjectedOptimizer

__all__ = ["CoapAdafactor", "CoapAdamW", "ProjectedOptimizer"]
