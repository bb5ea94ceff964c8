"""The ``coap-compile`` command line (demo and benchmarks) and the pieces it shares with ``benchmarks/``."""

from __future__ import annotations

__all__: list[str] = []
