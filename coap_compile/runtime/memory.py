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
local row count (:mod:`coap_compile.distributed.fsdp`), ``P`` and ``step`` count in full, and
``base_bytes`` is the base optimizer's state of the local shard. Tensors a policy shares
between matrices (the DCT basis of each width ``N``: ``N²·b``) are one row each, counted once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..capture import capture, init_states
from ..distributed import fsdp
from .layout import Kind
from .scalars import base_hyperparams
from .selection import canonical_dims

__all__ = ["MemoryPlan", "MemoryRow", "base_keeps_step", "base_state_bytes", "plan_memory"]


@dataclass(frozen=True)
class MemoryRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    rank: int  # 0: not projected
    state_bytes: int
    base_bytes: int
    detail: dict[str, int]


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


def plan_memory(opt) -> MemoryPlan:
    """One row per parameter (and per shared tensor); each state is counted by its storage's exact closed
    form (:meth:`coap_compile.storage.StateStorage.nbytes`: fp32 4 B/element, bf16 2 B (+16 B of rounding
    stream), int8 1 B + a float32 scale per block (+16 B)), ``P`` at its precision."""
    config = opt.config
    rows = []
    shared: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {}  # counted once per key and device
    for p, lay in opt.plan.layouts.items():
        hyper = base_hyperparams(opt.param_groups[lay.group])
        # an FSDP2 (DTensor) parameter: this rank's bytes, from its local shard's shape
        base, base_detail = base_state_bytes(config.base, hyper, config.base_kwargs, fsdp.local(p))
        name, shape = opt.param_name(p), tuple(p.shape)
        if lay.kind is Kind.TORCH:  # torch's own optimizer
            rows.append(MemoryRow(name, shape, str(p.dtype), 0, base, base, base_detail))
            continue
        spec = lay.states
        detail = {
            n: stg.nbytes(spec.shapes[n], spec.kinds.get(n, "other")) for n, stg in spec.storages.items()
        }
        detail["step"] = 4
        rank = 0
        if lay.kind is Kind.TUCKER:  # factors U0 (C_out×r0), U1 (C_in×r1) + core-shaped states
            layout = lay.policy.state_layout(shape, lay.ranks, lay.work_dtype)
            detail = {**{k: _nbytes(s_, d) for k, (s_, d) in layout.items()}, **detail}
            rank = min(lay.ranks)
        elif lay.kind is Kind.MATRIX:
            small = canonical_dims(p.shape, lay.transposed)[1]  # N (P is replicated under FSDP2)
            extra = {}
            for k, (s_, sdt) in lay.policy.state_layout(small, lay.rank, lay.work_dtype).items():
                extra[k] = _nbytes(s_, lay.precision.proj_dtype if k == "proj" else sdt)
            for key, (s_, sdt) in lay.policy.shared_state_layout(small, lay.work_dtype).items():
                shared.setdefault(f"{key} on {p.device}", (s_, sdt, str(p.device)))
            detail = {**extra, **detail}
            rank = lay.rank
        rows.append(MemoryRow(name, shape, str(p.dtype), rank, sum(detail.values()), base, detail))
    for key, (shape, sdt, _dev) in sorted(shared.items()):  # e.g. the DCT basis shared by same-width matrices
        b = _nbytes(shape, sdt)
        rows.append(MemoryRow(f"[shared] {key}", tuple(shape), str(sdt), 0, b, 0, {key: b}))
    return MemoryPlan(tuple(rows))
