"""``optimizer.step()`` time, AdamW vs projected AdamW, at LLaMA matrix shapes.

Usage::

    python benchmarks/bench_step.py                      # CPU: perf_counter, median/p20/p80
    python benchmarks/bench_step.py --device cuda        # CUDA: triton.testing.do_bench (or CUDA events)
    python benchmarks/bench_step.py --shapes 2048x5461:512 --optimizers adamw,coap,galore

The timing code lives in :mod:`coap_compile.cli.stepbench` (``time_cpu`` / ``time_cuda`` share
``make_step`` and ``step_rows``), so the CPU and CUDA numbers come from the same setup; results go to
``benchmarks/results/step_<device>.{csv,json}``.
"""

from __future__ import annotations

import sys

from common import run_bench

if __name__ == "__main__":
    sys.exit(run_bench("step"))
