"""Optimizer-state bytes of LLaMA-60M…7B for AdamW, COAP, GaLore and Flora (meta device, exact), with
fp32 weights and, for AdamW and COAP with fp32/bf16/int8 states, bf16 weights; plus this library's own bytes
against the official 1988.34 MiB (1B, bf16) and 5380.51 MiB (7B, 8-bit) figures, every byte explained.

Usage: ``python benchmarks/bench_memory.py [--sizes 60m,1b] [--real 60m]`` — the same as
``coap-compile bench memory``; writes ``benchmarks/results/memory.{csv,json}``.
"""

from __future__ import annotations

import sys

from common import run_bench

if __name__ == "__main__":
    sys.exit(run_bench("memory"))
