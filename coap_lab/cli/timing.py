"""Timers shared by ``bench step`` (:mod:`.stepbench`) and its overhead rows (:mod:`.overhead`).

* :func:`timed_samples`: seconds of ``repeat`` calls (``time.perf_counter``) after ``warmup`` untimed ones,
  with an optional synchronisation hook (e.g. ``torch.cuda.synchronize``) around each timed call;
* :func:`time_cpu`: median and 20/80 % quantiles of those samples, in milliseconds;
* :func:`time_cuda`: the same quantiles from ``triton.testing.do_bench`` when Triton is importable, else
  from CUDA events around each call.

A leaf module (torch and the standard library only), so both benchmark modules can import it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["quantiles_ms", "time_cpu", "time_cuda", "timed_samples"]


def quantiles_ms(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) of ``samples_s`` seconds, in milliseconds."""
    qs = statistics.quantiles([1e3 * s for s in samples_s], n=10, method="inclusive")
    return 1e3 * statistics.median(samples_s), qs[1], qs[7]


def timed_samples(
    fn: Callable[[], None],
    warmup: int,
    repeat: int,
    sync: Callable[[], None] | None = None,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds of ``repeat`` calls (``time.perf_counter``) after ``warmup`` untimed ones; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before and after each timed call, ``before`` (untimed) before
    every call."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    samples = []
    for _ in range(repeat):
        if before is not None:
            before()
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


def time_cpu(fn: Callable[[], None], warmup: int, repeat: int) -> tuple[float, float, float]:
    """Median/p20/p80 milliseconds of ``repeat`` timed calls after ``warmup`` untimed ones."""
    return quantiles_ms(timed_samples(fn, warmup, repeat))


def time_cuda(fn: Callable[[], None], warmup: int, repeat: int) -> tuple[float, float, float]:
    """Median/p20/p80 milliseconds on CUDA: ``triton.testing.do_bench`` if available, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup, rep=repeat, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return quantiles_ms(samples)
