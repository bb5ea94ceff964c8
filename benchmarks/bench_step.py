"""``optimizer.step()`` time, AdamW vs projected AdamW, at LLaMA matrix shapes.

Usage::

    python benchmarks/bench_step.py                      # CPU: perf_counter, median/p20/p80
    python benchmarks/bench_step.py --device cuda        # CUDA: do_bench, then the kernel benchmark
                                                         # (= coap-compile bench kernels)
    python benchmarks/bench_step.py --shapes 2048x5461:512 --optimizers adamw,coap,galore

The timing code lives in :mod:`coap_lab.cli.stepbench` (``make_step``, ``step_rows``) and
:mod:`coap_lab.cli.timing` (``time_cpu`` / ``time_cuda``), so the CPU and CUDA numbers come from the same
setup; results go to ``benchmarks/results/step_<device>.{csv,json}``.
"""

from __future__ import annotations

import sys

from common import run_bench

if __name__ == "__main__":
    status = run_bench("step")
    if status == 0 and "cuda" in " ".join(sys.argv[1:]):
        # On a GPU also run the kernel benchmark: fused AdamW vs eager/Inductor low-rank vs the generated
        # kernels at LLaMA-1B shapes, each with its floor (coap_lab.cli.kernelbench).
        status = run_bench("kernels", [])
    sys.exit(status)
