"""Whether Triton is installed (:data:`HAS_TRITON`), decided once at import without importing it.

The lowest module of :mod:`coap_compile.kernels`: the package re-exports :data:`HAS_TRITON`, and
:mod:`.ops` reads it here when choosing between a Triton launch and the eager twin.
"""

from __future__ import annotations

import importlib.util

__all__ = ["HAS_TRITON", "has_triton"]


def has_triton() -> bool:
    """Whether ``import triton`` can find the package (``sys.modules["triton"] = None`` counts as absent)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


HAS_TRITON: bool = has_triton()
