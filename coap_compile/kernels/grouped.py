"""Grouped K1/K2: the projected update of ``K`` matrices with equal ``M×r`` states in one launch each.

For members ``k = 1…K`` (same ``M`` and ``r``, any ``N_k``, orientation and strides), with one scalar
vector ``c`` (their step counts agree, so their hoisted scalars are one set)::

    K1 (grid ⌈M/BM⌉·⌈r/BR⌉ × K):      g_k = X_k P_k;  s_k' = f(g_k, s_k, c);  D_k = h(…)
    K2 (grid ⌈M/BM⌉·⌈max N/BN⌉ × K):  W_k ← decay·W_k + scale·D_k P_kᵀ

Grid axis 1 is the member (Triton's grouped-GEMM pattern): each program reads its member's row of an
int64 table (:func:`~coap_compile.kernels.codegen.k1_member_columns` / ``K2_MEMBER``: element offsets of
the member's tensors from member 0's, its ``N`` and strides) and then runs exactly the per-matrix
kernel's tile code, so every member's result is bit-identical to :func:`~.launch.fused_projected_update_`
on it (``tests/test_kernels_grouped.py``). Offsets rather than pointers: ``pointer + int64`` is the same
operation in the interpreter and compiled Triton, and the members' tensors need not be one buffer (``X``,
``P``, ``W`` and, in the runtime's kernel groups, every state tensor are per parameter; one offset column
per state tensor). ``D`` is one ``K×M×r`` scratch. K2's grid covers the widest member; programs past a
narrower member's tiles return at once.

**Storage** (:mod:`.variants`): a :class:`~.variants.KernelVariant` with bf16/int8 states runs the same
grouped K1 with the storage loads/stores of :mod:`.stored`. Each member keeps its own tensors, reached
through its offsets: bf16 values or int8 codes and absmax scales, and its own ``[seed, counter]`` for
stochastic rounding, so its rounding stream is the one the per-matrix kernel draws (the hash of its
seed, counter and the logical element index). The code tables, the scale grid ``NR×NC`` and the block
shape ``BH×BW`` are shared (equal ``M×r`` and storage give equal layouts; checked). After the launch every
member's counters advance by one in one ``torch._foreach_add_`` (the per-matrix kernel: one ``add_`` per
state and parameter).

The table is built on the host from ``data_ptr`` differences (no device read) and copied with
``non_blocking=True`` (one small host-to-device copy per launch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from coap_compile.ir import Epilogue
from coap_compile.kernels import cache, codegen, launch, stored
from coap_compile.kernels.variants import KernelVariant

__all__ = ["check_members", "grouped_fused_update_", "grouped_lowrank_", "grouped_project_back_"]

Kernel = Epilogue | KernelVariant


@functools.cache
def _k1_grouped(kern: Kernel, interpreting: bool) -> Any:
    ep, modes = (kern.epilogue, kern.modes) if isinstance(kern, KernelVariant) else (kern, None)
    gen = codegen.k1_source(ep, modes, grouped=True)
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


def _plain(kern: Kernel) -> Kernel:
    """An all-fp32 variant is the plain epilogue (same kernel)."""
    return kern.epilogue if isinstance(kern, KernelVariant) and kern.all_fp32 else kern


def _same(name: str, k: int, t: Tensor, t0: Tensor, strides: bool) -> None:
    if t.dtype != t0.dtype or t.device != t0.device or (strides and t.stride() != t0.stride()):
        raise ValueError(
            f"{name} of member {k} is {t.dtype} on {t.device} with strides {t.stride()}, member 0's "
            f"{t0.dtype} on {t0.device} with strides {t0.stride()} (must agree)"
        )


def check_members(
    ws: Sequence[Tensor] | None, xs: Sequence[Tensor], ps: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]], c: Tensor, kern: Kernel,
) -> tuple[int, int]:  # fmt: skip
    """``(M, r)`` of a group (every member checked as the per-matrix kernels check it, then against member
    0: dtypes, devices, state strides and int8 block layouts must agree); ValueError/TypeError naming the
    member otherwise. ``ws`` None: K1 alone (no weights)."""
    if not (len(xs) == len(ps) == len(states) == len(ws if ws is not None else xs)) or not xs:
        raise ValueError(
            f"ws, xs, ps and states must list the same K >= 1 members, got "
            f"{len(ws) if ws is not None else '-'}, {len(xs)}, {len(ps)}, {len(states)}"
        )
    mr = None
    for k, (x, p, s) in enumerate(zip(xs, ps, states)):
        if ws is None:
            m, _n, r = launch._check_lowrank(x, p, s, c, kern)
        else:
            m, _n, r = launch._check_update(ws[k], x, p, s, c, kern)
            _same("w", k, ws[k], ws[0], False)
        if mr is not None and (m, r) != mr:
            raise ValueError(f"member {k} has M×r = {m}×{r}, member 0 has {mr[0]}×{mr[1]} (must agree)")
        mr = (m, r)
        _same("x", k, x, xs[0], False)
        for i, (t, t0) in enumerate(zip(s, states[0])):
            _same(f"state tensor {i}", k, t, t0, True)
            if t.shape != t0.shape:
                raise ValueError(f"state tensor {i} of member {k} has shape {tuple(t.shape)}, member 0's "
                                 f"{tuple(t0.shape)} (scale grids must agree)")  # fmt: skip
    return mr  # type: ignore[return-value]


def grouped_lowrank_(
    xs: Sequence[Tensor], ps: Sequence[Tensor], states: Sequence[Sequence[Tensor]], c: Tensor,
    kern: Kernel, *, out: Tensor | None = None, input_precision: str = "ieee", block_m: int = 64,
    block_r: int | None = None, block_k: int = 32, num_warps: int = 4, num_stages: int = 3,
    checked: bool = False,
) -> Tensor:  # fmt: skip
    """Grouped K1: every member's states updated in place, returns the ``K×M×r`` fp32 ``D`` (written into
    ``out`` when given). ``states[k]``: member ``k``'s op tensors (fp32 states, or a storage variant's flat
    list). Each member as :func:`~.launch.projected_lowrank_` on it, bit for bit. ``checked``: the caller
    ran :func:`check_members` on these arguments (host work per member is the cost a group saves)."""
    kern = _plain(kern)
    m, r = (xs[0].shape[0], ps[0].shape[1]) if checked else check_members(None, xs, ps, states, c, kern)
    kk, dev = len(xs), xs[0].device
    d = torch.empty((kk, m, r), dtype=torch.float32, device=dev) if out is None else out
    if tuple(d.shape) != (kk, m, r) or d.dtype != torch.float32 or d.device != dev:
        raise ValueError(f"scratch must be a ({kk}, {m}, {r}) float32 tensor on {dev}, got {tuple(d.shape)}")
    variant = launch._stored(kern)
    groups = [variant.split(s) for s in states] if variant is not None else None
    if m == 0 or r == 0 or any(x.shape[1] == 0 for x in xs):
        for k in range(kk):
            d[k].copy_(launch.projected_lowrank_(xs[k], ps[k], states[k], c, kern))
        return d
    br = launch._check_block("block_r", block_r or launch._pow2(r, 16, 128))
    bm, bk = launch._check_block("block_m", block_m), launch._check_block("block_k", block_k)
    args: list[Any] = list(states[0])
    s_base = states[0][0] if states[0] else d[0]
    if groups is not None:
        args, (bh, bw) = stored.state_args(variant, groups[0], dev)
        sizes = [a for a in args if not isinstance(a, Tensor)]
        for k in range(1, kk):  # int8 block layouts (grid sizes, block shape) shared
            other = stored.state_args(variant, groups[k], dev)[0]
            if [a for a in other if not isinstance(a, Tensor)] != sizes:
                raise ValueError(f"member {k}'s int8 block layout differs from member 0's")
        bm, br = max(bm, bh), max(br, bw)  # tiles own whole blocks (all powers of two)
    rows = [
        [_offset("x", k, x, xs[0]), _offset("p", k, p, ps[0]), _offset("D", k, d[k], d[0]),
         *(_offset(f"state tensor {i}", k, t, states[0][i]) for i, t in enumerate(s)),
         x.shape[1], *x.stride(), *p.stride()]
        for k, (x, p, s) in enumerate(zip(xs, ps, states))
    ]  # fmt: skip
    launch._launch(
        _k1_grouped(kern, cache.interpreting()), (launch._cdiv(m, bm) * launch._cdiv(r, br), kk),
        xs[0], ps[0], d[0], c if c.numel() else d[0], *args, _table(rows, dev), m, 0, r,
        0, 0, 0, 0, *d[0].stride(), *s_base.stride(), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, GROUP_M=8,
        num_warps=num_warps, num_stages=num_stages, **launch._dot_meta(input_precision, xs[0].dtype),
    )  # fmt: skip
    if groups is not None:
        counters = [
            grp[-1][1:] for g in groups for mode, grp in zip(variant.modes, g) if mode.stochastic
        ]  # fmt: skip
        if counters:
            torch._foreach_add_(counters, 1)  # every member's stream advances once (stored.advance_rng_)
    return d


def grouped_project_back_(
    ws: Sequence[Tensor], d: Tensor, ps: Sequence[Tensor], decay: Tensor | int | float | None, scale: float,
    *, c: Tensor | None = None, input_precision: str = "ieee", block_m: int = 64, block_n: int = 64,
    block_k: int = 32, num_warps: int = 4, num_stages: int = 3, checked: bool = False,
) -> None:  # fmt: skip
    """Grouped K2: ``W_k ← decay·W_k + scale·D_k P_kᵀ`` for every member ``k`` (``d``: ``K×M×r`` fp32),
    each as :func:`~.launch.project_back_update_` on it (``checked``: as :func:`grouped_lowrank_`)."""
    if not ws or len(ws) != len(ps) or d.ndim != 3 or d.shape[0] != len(ws):
        raise ValueError(f"ws, ps and d must list the same K >= 1 members, got {len(ws)}, {len(ps)}, "
                         f"{tuple(d.shape)}")  # fmt: skip
    for k, (w, p) in enumerate(zip(ws, ps) if not checked else ()):
        launch._check_back(w, d[k], p)
        _same("w", k, w, ws[0], False)
    kk, m, r = d.shape
    dev = ws[0].device
    dec = launch._resolve_decay(decay, c, dev)
    if m == 0 or r == 0 or any(w.shape[1] == 0 for w in ws):
        for k in range(kk):
            launch.eager_project_back_update_(ws[k], d[k], ps[k], dec, scale)
        return
    bm, bn, bk = (
        launch._check_block(k, v)
        for k, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k))
    )
    rows = [
        [_offset("w", k, w, ws[0]), _offset("D", k, d[k], d[0]), _offset("p", k, p, ps[0]), w.shape[1],
         *w.stride(), *p.stride()]
        for k, (w, p) in enumerate(zip(ws, ps))
    ]  # fmt: skip
    n_max = max(w.shape[1] for w in ws)
    launch._launch(
        _k2_grouped(cache.interpreting()), (launch._cdiv(m, bm) * launch._cdiv(n_max, bn), kk),
        ws[0], d[0], ps[0], d[0] if dec is None else dec, float(scale), _table(rows, dev), m, 0, r,
        0, 0, *d[0].stride(), 0, 0, HAS_DECAY=dec is not None, W_BF16=ws[0].dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=num_warps, num_stages=num_stages,
        **launch._dot_meta(input_precision, ws[0].dtype),
    )  # fmt: skip


def grouped_fused_update_(
    ws: Sequence[Tensor], xs: Sequence[Tensor], ps: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
    c: Tensor, epilogue: Kernel, *, scratch: Tensor | None = None,
    input_precision: str | tuple[str, str] = "ieee", block_m: int = 64, block_r: int | None = None,
    block_n: int = 64, block_k: int = 32, num_warps: int = 4, num_stages: int = 3,
) -> None:  # fmt: skip
    """Grouped K1 then grouped K2: two launches for all members (module docstring); arguments as
    :func:`~.launch.fused_projected_update_` per member (``ws[k]``, ``xs[k]``: M×N_k views, ``ps[k]``:
    N_k×r, ``states[k]``: the member's op tensors), one ``c``; ``scratch``: a ``K×M×r`` fp32 ``D``."""
    m, r = check_members(ws, xs, ps, states, c, _plain(epilogue))
    if m == 0 or r == 0 or any(x.shape[1] == 0 for x in xs):  # as the per-matrix kernels: the eager twin
        for k in range(len(ws)):
            launch.fused_projected_update_(ws[k], xs[k], ps[k], states[k], c, epilogue,
                                           scratch=None if scratch is None else scratch[k])  # fmt: skip
        return
    ip1, ip2 = (input_precision, input_precision) if isinstance(input_precision, str) else input_precision
    d = grouped_lowrank_(
        xs, ps, states, c, epilogue, out=scratch, input_precision=ip1, block_m=block_m, block_r=block_r,
        block_k=block_k, num_warps=num_warps, num_stages=num_stages, checked=True,
    )  # fmt: skip
    ep = launch._epilogue(epilogue)
    grouped_project_back_(
        ws, d, ps, launch.epilogue_decay(ep), ep.scale, c=c, input_precision=ip2, block_m=block_m,
        block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages, checked=True,
    )  # fmt: skip
