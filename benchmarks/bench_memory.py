"""Optimizer-state bytes of LLaMA-60M…7B for AdamW, COAP, GaLore and Flora (meta device, exact).

Usage: ``python benchmarks/bench_memory.py [--sizes 60m,1b] [--real 60m]`` — the same as
``coap-compile bench memory``; writes ``benchmarks/results/memory.{csv,json}``.
"""

from __future__ import annotations

import sys

from common import run_bench

if __name__ == "__main__":
    sys.exit(run_bench("memory"))
