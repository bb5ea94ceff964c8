"""Final validation loss of AdamW, COAP, GaLore and Flora (+ galore-torch/apollo-torch if installed).

Usage: ``python benchmarks/bench_quality.py [--steps 400] [--seeds 0,1,2] [--optimizers ...]`` — the same
as ``coap-compile bench quality``; writes ``benchmarks/results/quality.{csv,json,png}``.
"""

from __future__ import annotations

import sys

from common import run_bench

if __name__ == "__main__":
    sys.exit(run_bench("quality"))
