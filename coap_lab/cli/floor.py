"""The matmul floor of a COAP step (issue 20): the two projection GEMMs alone, for ``bench step``'s
``gemm-floor`` rows (:mod:`.stepbench`) and its whole-model overhead rows (:mod:`.overhead`).

``X̃ = X P`` (``M×N @ N×r``) and ``W ← W + D Pᵀ`` (``addmm_``) per matrix, in float32 with preallocated
outputs, at the thread count COAP's step uses for such matrices (:func:`floor_threads`, the rule of
``coap_compile.runtime.threads``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from coap_compile.runtime.threads import SMALL_GEMM_MACS, SMALL_PARAM_NUMEL, intra_op_threads

__all__ = ["floor_threads", "gemm_floor_fn"]


def gemm_floor_fn(m: int, n: int, rank: int, device: str, seed: int = 0) -> Callable[[], None]:
    """The two projection GEMMs of one COAP step on an ``m×n`` weight, as one zero-argument call: ``X̃ = X P``
    (``M×N @ N×r`` with ``M = max(m, n)``, the canonical orientation) and ``W ← W + D Pᵀ`` (``addmm_``), in
    float32 with preallocated outputs: the step's matmul floor. On the CPU it runs at the thread count COAP's
    step uses for such a matrix (:func:`floor_threads`)."""
    big, small = max(m, n), min(m, n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(big, small, generator=gen).to(device)
    p = torch.randn(small, rank, generator=gen).to(device)
    w = torch.randn(big, small, generator=gen).to(device)
    x_proj = torch.empty(big, rank, device=device)

    threads = floor_threads([(m, n, rank)]) if device == "cpu" else None

    def fn() -> None:
        with intra_op_threads(threads):
            torch.mm(x, p, out=x_proj)
            w.addmm_(x_proj, p.t(), alpha=1e-12)

    return fn


def floor_threads(shapes: Sequence[tuple[int, int, int]]) -> int | None:
    """1 when a CPU model made of these ``(m, n, rank)`` matrices steps single-threaded in COAP (the rule of
    ``coap_compile.runtime.threads``), else None (torch's thread count)."""
    small = all(m * n <= SMALL_PARAM_NUMEL and m * n * r <= SMALL_GEMM_MACS for m, n, r in shapes)
    return 1 if small else None
