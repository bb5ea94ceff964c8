"""Grouped K1/K2: the projected update of ``K`` matrices with equal ``M×r`` states in one launch each.

For members ``k = 1…K`` (same ``M`` and ``r``, any ``N_k``, orientation and strides), with one scalar
vector ``c`` (their step counts agree, so their hoisted scalars are one set)::

    K1 (grid ⌈M/BM⌉·⌈r/BR⌉ × K):      g_k = X_k P_k;  s_k' = f(g_k, s_k, c);  D_k = h(…)
    K2 (grid ⌈M/BM⌉·⌈max N/BN⌉ × K):  W_k ← decay·W_k + scale·D_k P_kᵀ

Grid axis 1 is the member (Triton's grouped-GEMM pattern): each program reads its member's row of an
int64 table (:data:`~coap_compile.kernels.codegen.K1_MEMBER` / ``K2_MEMBER``: element offsets of the
member's tensors from member 0's, its ``N`` and strides) and then runs exactly the per-matrix kernel's
tile code, so every member's result is bit-identical to :func:`~.launch.fused_projected_update_` on it
(``tests/test_kernels_grouped.py``). Offsets rather than pointers: ``pointer + int64`` is the same
operation in the interpreter and compiled Triton, and the members' tensors need not be one buffer (the
runtime's group states are views of one ``K×M×r`` buffer, but ``X``, ``P`` and ``W`` are per parameter).
``D`` is one ``K×M×r`` scratch. K2's grid covers the widest member; programs past a narrower member's
tiles return at once.

Storage: fp32 states only (bf16/int8 states keep the per-matrix kernels: their rng counters and scale
grids are per parameter; not done yet). The table is built on the host and copied with
``non_blocking=True`` (one small host-to-device copy per launch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from coap_compile.ir import Epilogue
from coap_compile.kernels import cache, codegen, launch
from coap_compile.kernels.variants import KernelVariant

__all__ = ["grouped_fused_update_"]


@functools.cache
def _k1_grouped(ep: Epilogue, interpreting: bool) -> Any:
    gen = codegen.k1_source(ep, grouped=True)
    return cache.load_module(gen.name, gen.source).coap_k1


@functools.cache
def _k2_grouped(interpreting: bool) -> Any:
    name, src = codegen.k2_source(grouped=True)
    return cache.load_module(name, src).coap_k2


def _offset(name: str, k: int, t: Tensor, base: Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise ValueError(f"{name} of member {k} is not element-aligned with member 0's ({delta} bytes apart)")
    return delta // t.element_size()


def _table(rows: list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _check_members(
    ws: Sequence[Tensor], xs: Sequence[Tensor], ps: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
    c: Tensor, ep: Epilogue,
) -> tuple[int, int]:  # fmt: skip
    if not (len(ws) == len(xs) == len(ps) == len(states)) or not ws:
        raise ValueError(
            f"ws, xs, ps and states must list the same K >= 1 members, got {len(ws)}, {len(xs)}, "
            f"{len(ps)}, {len(states)}"
        )
    mr = None
    for k, (w, x, p, s) in enumerate(zip(ws, xs, ps, states)):
        m, _n, r = launch._check_update(w, x, p, s, c, ep)
        if mr is not None and (m, r) != mr:
            raise ValueError(f"member {k} has M×r = {m}×{r}, member 0 has {mr[0]}×{mr[1]} (must agree)")
        mr = (m, r)
        for name, t, t0 in (
            ("x", x, xs[0]),
            ("w", w, ws[0]),
            ("state", s[0] if s else w, (states[0] or ws)[0]),
        ):
            if t.dtype != t0.dtype or t.device != t0.device:
                raise ValueError(
                    f"{name} of member {k} is {t.dtype} on {t.device}, member 0's {t0.dtype} on {t0.device}"
                )
        if s and s[0].stride() != states[0][0].stride():
            raise ValueError(
                f"states of member {k} have strides {s[0].stride()}, member 0's {states[0][0].stride()}"
            )
    return mr  # type: ignore[return-value]


def grouped_fused_update_(
    ws: Sequence[Tensor], xs: Sequence[Tensor], ps: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
    c: Tensor, epilogue: Epilogue | KernelVariant, *, scratch: Tensor | None = None,
    input_precision: str | tuple[str, str] = "ieee", block_m: int = 64, block_r: int | None = None,
    block_n: int = 64, block_k: int = 32, num_warps: int = 4, num_stages: int = 3,
) -> None:  # fmt: skip
    """K1 then K2 over all members in two launches (module docstring); arguments as
    :func:`~.launch.fused_projected_update_` per member (``ws[k]``, ``xs[k]``: M×N_k views, ``ps[k]``:
    N_k×r, ``states[k]``: the member's fp32 states), one ``c``; ``scratch``: a ``K×M×r`` fp32 ``D``."""
    if isinstance(epilogue, KernelVariant):
        if not epilogue.all_fp32:
            raise ValueError("grouped kernels support fp32 states only; bf16/int8 storage runs per matrix")
        epilogue = epilogue.epilogue
    m, r = _check_members(ws, xs, ps, states, c, epilogue)
    kk = len(ws)
    dev = xs[0].device
    if scratch is None:
        scratch = torch.empty((kk, m, r), dtype=torch.float32, device=dev)
    elif tuple(scratch.shape) != (kk, m, r) or scratch.dtype != torch.float32 or scratch.device != dev:
        raise ValueError(
            f"scratch must be a ({kk}, {m}, {r}) float32 tensor on {dev}, got {tuple(scratch.shape)}"
        )
    if m == 0 or r == 0 or any(x.shape[1] == 0 for x in xs):
        for k in range(kk):
            launch.eager_projected_update_(ws[k], xs[k], ps[k], states[k], c, epilogue, scratch=scratch[k])
        return
    ip1, ip2 = (input_precision, input_precision) if isinstance(input_precision, str) else input_precision
    br = launch._check_block("block_r", block_r or launch._pow2(r, 16, 128))
    bm, bn, bk = (
        launch._check_block(k, v)
        for k, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k))
    )
    s_base = states[0][0] if states[0] else scratch[0]
    k1_rows = []
    for k, (x, p, s) in enumerate(zip(xs, ps, states)):
        s_offs = {_offset(f"state {i}", k, t, states[0][i]) for i, t in enumerate(s)}
        if len(s_offs) > 1:
            raise ValueError(f"the states of member {k} must lie at one offset from member 0's, got {s_offs}")
        k1_rows.append([
            _offset("x", k, x, xs[0]), _offset("p", k, p, ps[0]), _offset("D", k, scratch[k], scratch[0]),
            s_offs.pop() if s_offs else 0, x.shape[1], *x.stride(), *p.stride(),
        ])  # fmt: skip
    meta = dict(BLOCK_K=bk, GROUP_M=8, num_warps=num_warps, num_stages=num_stages)
    d0 = scratch[0]
    launch._launch(
        _k1_grouped(epilogue, cache.interpreting()), (launch._cdiv(m, bm) * launch._cdiv(r, br), kk),
        xs[0], ps[0], d0, c if c.numel() else d0, *states[0], _table(k1_rows, dev), m, 0, r,
        0, 0, 0, 0, *d0.stride(), *s_base.stride(), BLOCK_M=bm, BLOCK_R=br, **meta,
        **launch._dot_meta(ip1, xs[0].dtype),
    )  # fmt: skip
    k2_rows = [
        [_offset("w", k, w, ws[0]), _offset("D", k, scratch[k], d0), _offset("p", k, p, ps[0]), w.shape[1],
         *w.stride(), *p.stride()]
        for k, (w, p) in enumerate(zip(ws, ps))
    ]  # fmt: skip
    dec = launch._resolve_decay(launch.epilogue_decay(epilogue), c, dev)
    n_max = max(w.shape[1] for w in ws)
    launch._launch(
        _k2_grouped(cache.interpreting()), (launch._cdiv(m, bm) * launch._cdiv(n_max, bn), kk),
        ws[0], d0, ps[0], d0 if dec is None else dec, float(epilogue.scale), _table(k2_rows, dev), m, 0, r,
        0, 0, *d0.stride(), 0, 0, HAS_DECAY=dec is not None, W_BF16=ws[0].dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, **meta, **launch._dot_meta(ip2, ws[0].dtype),
    )  # fmt: skip
