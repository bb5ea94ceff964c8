"""Exact optimizer-state memory, planned from shapes alone (so it works for meta-device models).

Per projected ``m×n`` weight (``M = max(m, n)``, ``N = min(m, n)``, rank ``r``, state element size
``b`` = 4 for float32 / 8 for float64)::

    bytes = N·r·b  (P, plus policy extras such as Flora's 8-byte seed)
          + Σ_states |s|·b  (each base state at the shape it has for an M×r parameter: 2·M·r·b for Adam)
          + 4              (the float32 step counter)
          + M·r·b          (only for bases without a first moment under COAP: ``coap_exp_avg``)

A Tucker-projected ``C_out×C_in×kh×kw`` weight: ``(C_out·r0 + C_in·r1)·b`` (the factors) plus each base
state at the core's shape (``r0×r1×kh×kw``) plus the step. Every other parameter keeps exactly the base
optimizer's state (``base_bytes``). The side is the plan's (``projection_side="rows"`` and FSDP2 weights:
``M = m``, ``N = n``). For an FSDP2-sharded parameter every row counts this rank's bytes: ``M`` is its
local row count (:mod:`coap_compile.distributed.fsdp`), ``P`` its local rows of ``n`` (sharded, the
default; in full when replicated), ``step`` in full, and
``base_bytes`` is the base optimizer's state of the local shard (full-rank states with a storage
precision too: their row count is the local one). Tensors a policy shares
between matrices (the DCT basis of each width ``N``: ``N²·b``) are one row each, counted once.

**Any world size** (``plan_memory(opt, world_size=W, rank=k)``, ``opt.memory_plan(world_size=W)``): the
same closed form with ``M_k = len(torch.chunk(range(m), W)[k])`` (:func:`local_rows`) for every dim-0
row of every parameter, on the rows side, from the unsharded (e.g. meta-device) model: per projected
weight and rank ``k``, Adam-type states::

    bytes_k = n_k·r·b_P  +  K·M_k·r·b  +  4    (K moments; P sharded, n_k = len(torch.chunk(range(n), W)[k]))
    transient: n·r·b_P                          (the gathered P of the weight being stepped)
    torch AdamW: 2·M_k·n·b + 4                  (the base on the local shard)

so every term but the step counter falls as ``1/W`` and the ratio to AdamW stays ``≈ (n+K·m)·r/(2·m·n)``
at every ``W``. With ``projection_sharding="replicated"`` ``P`` counts ``n·r·b_P`` on every rank and
COAP holds less than AdamW only while ``W < K·m(n − r)/(n·r)`` (roughly). Exact against gloo runs at
W = 2 and 4 (``tests/test_fsdp2_memory.py``); the LLaMA-1B/7B table is in the README
(``coap_lab.cli.fsdp_memory``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..capture import capture, init_states
from ..distributed import fsdp
from .layout import Kind, check_fsdp
from .scalars import base_hyperparams
from .selection import canonical_dims

__all__ = [
    "MemoryPlan", "MemoryRow", "base_keeps_step", "base_state_bytes", "local_rows", "plan_memory",
]  # fmt: skip


@dataclass(frozen=True)
class MemoryRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    rank: int  # 0: not projected
    state_bytes: int
    base_bytes: int
    detail: dict[str, int]
    transient_bytes: int = 0  # the full P gathered for this weight's step (an FSDP2 sharded P), not held


@dataclass(frozen=True)
class MemoryPlan:
    rows: tuple[MemoryRow, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.state_bytes for r in self.rows)

    @property
    def base_bytes(self) -> int:
        return sum(r.base_bytes for r in self.rows)

    @property
    def transient_bytes(self) -> int:
        """The largest gathered ``P`` (one weight's full ``n×r``, held only during its step)."""
        return max((r.transient_bytes for r in self.rows), default=0)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.total_bytes / self.base_bytes if self.base_bytes else 0.0

    def __str__(self) -> str:
        lines = [f"{'parameter':<40} {'shape':>14} {'rank':>5} {'base B':>12} {'COAP B':>12}"]
        for r in self.rows:
            lines.append(
                f"{r.name[:40]:<40} {'x'.join(map(str, r.shape)):>14} {r.rank or '-':>5} "
                f"{r.base_bytes:>12,} {r.state_bytes:>12,}"
            )
        lines.append(
            f"{'total':<40} {'':>14} {'':>5} {self.base_bytes:>12,} {self.total_bytes:>12,}"
            f"   saved {100 * self.saved_fraction:.1f}%"
        )
        if self.transient_bytes:
            label = "+ transient (one gathered P)"
            lines.append(f"{label:<40} {'':>14} {'':>5} {'':>12} {self.transient_bytes:>12,}")
        return "\n".join(lines)


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@functools.cache
def _step_bytes(base: type, kwargs_key: tuple) -> int:
    """Bytes of the base optimizer's per-parameter ``step`` tensor (0 if it keeps none), probed once."""
    p = torch.zeros(2, 2, requires_grad=True)
    opt = base([p], **dict(kwargs_key))
    p.grad = torch.zeros_like(p)
    opt.step()
    step = opt.state[p].get("step")
    return step.numel() * step.element_size() if isinstance(step, torch.Tensor) else 0


def _kwargs_key(base_kwargs: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in base_kwargs.items() if not isinstance(v, torch.Tensor)))


def base_keeps_step(base: type, base_kwargs: dict) -> bool:
    """Whether ``base`` keeps a per-parameter ``step`` tensor in its state (probed once)."""
    return _step_bytes(base, _kwargs_key(base_kwargs)) > 0


def base_state_bytes(
    base: type, hyper: dict, base_kwargs: dict, p: torch.Tensor
) -> tuple[int, dict[str, int]]:
    """What ``base`` keeps for ``p`` (per key)."""
    captured = capture(base, hyper, dtype=p.dtype, ndim=p.ndim)
    like = torch.empty(p.shape, dtype=p.dtype, device="meta")
    detail = {k: v.numel() * v.element_size() for k, v in init_states(captured, like).items()}
    step = _step_bytes(base, _kwargs_key(base_kwargs))
    if step:
        detail["step"] = step
    return sum(detail.values()), detail


def local_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of ``rank`` when ``rows`` are cut into FSDP2's ``torch.chunk`` blocks over ``world_size``
    ranks: ``⌈rows/W⌉`` for the first ranks, the rest on the last non-empty rank, 0 after it."""
    chunk = -(-rows // world_size)
    return max(0, min(rows, (rank + 1) * chunk) - min(rows, rank * chunk))


def _check_world(world_size: int | None, rank: int) -> None:
    if world_size is None:
        return
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1 (ranks of the FSDP2 shard dim), got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def _here(p: torch.Tensor, lay, world_size: int | None, rank: int) -> int | None:
    """This rank's rows of ``p`` (None: not sharded, count the whole tensor)."""
    if p.ndim == 0 or (world_size is None and lay.shard is None):
        return None
    if world_size is None:
        return lay.shard.local_rows
    return local_rows(int(p.shape[0]), world_size, rank)


def plan_memory(opt, *, world_size: int | None = None, rank: int = 0, strict: bool = True) -> MemoryPlan:
    """One row per parameter (and per shared tensor); each state is counted by its storage's exact closed
    form (:meth:`coap_compile.storage.StateStorage.nbytes`: fp32 4 B/element, bf16 2 B (+16 B of rounding
    stream), int8 1 B + a float32 scale per block (+16 B)), ``P`` at its precision.

    ``world_size=W``: the bytes rank ``rank`` would hold if every parameter were FSDP2-sharded on ``W``
    ranks (``fully_shard``: dim 0 cut by ``torch.chunk``; for HSDP, ``W`` is the shard dim's size),
    from shapes alone (meta models work): projected weights on the rows side (``P`` ``n×r`` in full,
    states ``M_k×r``), full-rank states at the local shard's shape, torch's own optimizer on the local
    shard as ``base_bytes``. What FSDP2 refuses (int8 tiles, Tucker, GaLore/DCT, bases mixing rows)
    raises the same ValueError the sharded optimizer would (``strict=False``: planned anyway by the same
    closed form at the local shard's shape). A sharded ``P``
    (``projection_sharding="sharded"``, the default) counts this rank's ``torch.chunk`` rows of ``n``;
    the full ``n×r`` gathered for a weight's step is its row's ``transient_bytes`` (the plan's
    ``transient_bytes``: the largest, one weight at a time). Without ``world_size``, an FSDP2-sharded
    optimizer's plan is this rank's bytes (its mesh, its rank)."""
    _check_world(world_size, rank)
    config = opt.config
    rows = []
    shared: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {}  # counted once per key and device
    for p, lay in opt.plan.layouts.items():
        if world_size is not None and strict and not fsdp.is_dtensor(p):
            check_fsdp(lay, config.base)
        here = _here(p, lay, world_size, rank)
        hyper = base_hyperparams(opt.param_groups[lay.group])
        shape_here = tuple(fsdp.local(p).shape) if here is None else (here, *p.shape[1:])
        like = torch.empty(shape_here, dtype=p.dtype, device="meta")
        base, base_detail = base_state_bytes(config.base, hyper, config.base_kwargs, like)
        name, shape = opt.param_name(p), tuple(p.shape)
        if lay.kind is Kind.TORCH:  # torch's own optimizer
            rows.append(MemoryRow(name, shape, str(p.dtype), 0, base, base, base_detail))
            continue
        rows_side = lay.rows_side or here is not None
        detail, rank_ = _state_detail(p, lay, here, rows_side, shared)
        transient = 0
        if here is not None and lay.kind is Kind.MATRIX and lay.settings.projection_sharding == "sharded":
            n = int(p.shape[1])
            p_rows = _basis_rows(lay, n, world_size, rank)
            transient = detail["proj"] if p_rows < n else 0  # (one rank: nothing is gathered)
            detail["proj"] = detail["proj"] * p_rows // n
        total = sum(detail.values())
        rows.append(MemoryRow(name, shape, str(p.dtype), rank_, total, base, detail, transient))
    for key, (shape, sdt, _dev) in sorted(shared.items()):  # e.g. the DCT basis shared by same-width matrices
        b = _nbytes(shape, sdt)
        rows.append(MemoryRow(f"[shared] {key}", tuple(shape), str(sdt), 0, b, 0, {key: b}))
    return MemoryPlan(tuple(rows))


def _basis_rows(lay, n: int, world_size: int | None, rank: int) -> int:
    """This rank's rows of a sharded ``P`` (``n`` rows cut like ``torch.chunk``)."""
    if world_size is None:
        from ..distributed.basis import basis_spec

        return basis_spec(lay.shard, n).local_rows
    return local_rows(n, world_size, rank)


def _state_detail(p, lay, here: int | None, rows_side: bool, shared: dict) -> tuple[dict[str, int], int]:
    """Bytes per state key of one COAP-updated parameter (``here``: its rows on this rank, module
    docstring), and its rank (0: full rank)."""
    spec, shape = lay.states, tuple(p.shape)
    detail = {}
    for n, stg in spec.storages.items():
        s_ = spec.shapes[n]
        if here is not None and n in spec.row_names:  # a row state: this rank's rows (not Adafactor's col)
            s_ = (here, *s_[1:])
        detail[n] = stg.nbytes(s_, spec.kinds.get(n, "other"))
    detail["step"] = 4
    if lay.kind is Kind.TUCKER:  # factors U0 (C_out×r0), U1 (C_in×r1) + core-shaped states
        layout = lay.policy.state_layout(shape, lay.ranks, lay.work_dtype)
        return {**{k: _nbytes(s_, d) for k, (s_, d) in layout.items()}, **detail}, min(lay.ranks)
    if lay.kind is not Kind.MATRIX:
        return detail, 0
    small = shape[1] if rows_side else canonical_dims(shape, lay.transposed)[1]  # N (P: n×r in full)
    extra = {}
    for k, (s_, sdt) in lay.policy.state_layout(small, lay.rank, lay.work_dtype).items():
        extra[k] = _nbytes(s_, lay.precision.proj_dtype if k == "proj" else sdt)
    for key, (s_, sdt) in lay.policy.shared_state_layout(small, lay.work_dtype).items():
        shared.setdefault(f"{key} on {p.device}", (s_, sdt, str(p.device)))
    return {**extra, **detail}, lay.rank
