"""Whole-train-step compilation on the demo model: eager vs ``backend="inductor"`` (torch.optim.AdamW) vs
``backend="coap"`` (COAP-AdamW).

Usage::

    python benchmarks/bench_compile.py                       # demo model, 30 steps per variant, CPU
    python benchmarks/bench_compile.py --layers 2 --dim 128  # a reduced model
    python benchmarks/bench_compile.py --variants eager-coap,coap-coap,inductor-coap

Same code as ``coap-compile bench compile`` (:mod:`coap_lab.cli.compilebench`: graphs, graph breaks and
their reasons, compile time, steady step time, recompiles after step 1 under a changing tensor-lr schedule);
results go to ``benchmarks/results/compile_<device>.{csv,json}`` with machine, versions and commit.
"""

from __future__ import annotations

import sys

from common import run_bench

if __name__ == "__main__":
    sys.exit(run_bench("compile"))
