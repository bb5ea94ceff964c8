"""Closed-form optimizer-state accounting, and measurement of the state an optimizer really holds.

For a parameter with ``numel`` elements and a state element size ``b``:

* full AdamW: ``2 · numel · b`` (``exp_avg``, ``exp_avg_sq``);
* projected ``m×n`` matrix, ``M = max(m, n)``, ``N = min(m, n)``, rank ``r ≤ N``:
  ``2 · M · r · b`` (low-rank moments) ``+ N · r · p`` (the projection ``P``, element size ``p``);
* plus, per parameter, the step counter, ``s`` bytes (a 0-d tensor in torch.optim);
* plus policy extras (:data:`POLICY_EXTRA_BYTES`, e.g. Flora's int64 seed), counted in "ours" only.

Two accountings are reported:

* **ours** (what this library and ``torch.optim.AdamW`` allocate for float32 training):
  ``b = 4``, ``p = 4`` (``P`` is always float32), ``s = 4`` (0-d float32 ``step`` tensor per param);
* **official** (what the reference ``show_memory_usage`` prints for the LLaMA-1B bf16 run):
  ``b = 2``, ``p = 2`` (states and ``P`` in the bf16 param dtype) and ``s = 0`` (the step is a Python
  int, which that function counts as 0 bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from coap_compile.cli.optimizers import projected_linear_weights

__all__ = [
    "OFFICIAL",
    "OURS",
    "POLICY_EXTRA_BYTES",
    "Accounting",
    "ParamRow",
    "closed_form_rows",
    "measured_state_bytes",
    "meta_step",
    "plan_total_bytes",
    "total_bytes",
]

MIB = 1024**2


@dataclass(frozen=True)
class Accounting:
    """Bytes per element of the moments (``state``), of ``P`` (``proj``) and per step counter (``step``).

    ``extras``: whether policy-specific extra state (:data:`POLICY_EXTRA_BYTES`) is counted.
    """

    name: str
    state: int
    proj: int
    step: int
    extras: bool = False


OURS = Accounting("ours", state=4, proj=4, step=4, extras=True)
OFFICIAL = Accounting("official", state=2, proj=2, step=0)

#: Policy-specific per-matrix state beyond ``P`` in this library (bytes): Flora keeps its int64 seed.
POLICY_EXTRA_BYTES = {"flora": 8}


@dataclass(frozen=True)
class ParamRow:
    """One parameter's optimizer state in elements (independent of the accounting's byte sizes)."""

    name: str
    shape: tuple[int, ...]
    rank: int | None
    state_elems: int
    proj_elems: int
    extra_bytes: int = 0

    def bytes(self, acc: Accounting) -> int:
        extra = self.extra_bytes if acc.extras else 0
        return self.state_elems * acc.state + self.proj_elems * acc.proj + acc.step + extra


def closed_form_rows(
    model: nn.Module,
    policy: str,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    target_modules: Sequence[str] | None = None,
) -> list[ParamRow]:
    """Per-parameter state for ``policy`` in ``{"adamw", "coap", "galore", "flora"}`` (AdamW base).

    All three projection policies keep ``P`` (``N×r``) in the state; they differ in how it is refreshed.
    Which weights are projected follows :func:`~coap_compile.cli.optimizers.projected_linear_weights`.
    Works on meta-device models (only shapes are read).
    """
    if policy not in ("adamw", "coap", "galore", "flora"):
        raise ValueError(f"no closed form for optimizer {policy!r}")
    chosen = {} if policy == "adamw" else projected_linear_weights(model, rank, rank_ratio, target_modules)
    rows = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = tuple(p.shape)
        if name in chosen:
            r = chosen[name]
            big, small = max(shape), min(shape)
            rows.append(ParamRow(name, shape, r, 2 * big * r, small * r, POLICY_EXTRA_BYTES.get(policy, 0)))
        else:
            rows.append(ParamRow(name, shape, None, 2 * p.numel(), 0))
    return rows


def total_bytes(rows: Iterable[ParamRow], acc: Accounting = OURS) -> int:
    """Sum of :meth:`ParamRow.bytes` over ``rows``."""
    return sum(r.bytes(acc) for r in rows)


def _tensors(obj: object) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "ortho_matrix"):  # galore-torch / apollo-torch keep P inside a projector object
        yield from _tensors(obj.ortho_matrix)


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested dicts/lists included), each storage counted once.

    Projector objects of the external GaLore/APOLLO packages contribute their ``ortho_matrix``.

    Works for meta tensors too (``numel × element_size``; no memory is touched).
    """
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for t in _tensors(dict(optimizer.state)):
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (str(t.device), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def meta_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every meta parameter a meta gradient and take one step, so lazily created state exists.

    Raises whatever the optimizer raises when its step cannot run on the meta device.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    optimizer.step()


def plan_total_bytes(optimizer: torch.optim.Optimizer) -> int | None:
    """``optimizer.memory_plan().total_bytes`` when the optimizer has a memory plan, else None."""
    plan = getattr(optimizer, "memory_plan", None)
    return None if plan is None else int(plan().total_bytes)
