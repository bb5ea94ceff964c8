"""Gradient validation before a step writes anything (the atomic-step contract)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..distributed import fsdp
from ..errors import NonFiniteGradientError
from .threads import run_members

__all__ = ["all_finite", "check_gradients"]


def check_gradients(
    param_groups: list[dict], name_of: Callable[[Tensor], str], check_finite: bool, comm=None
) -> None:
    """Every gradient's layout, shape, dtype and device (and finiteness), before anything is written:
    ``ValueError`` (or :class:`NonFiniteGradientError`) naming the parameter and what it has. With
    FSDP2 (DTensor) gradients the finiteness verdict is agreed by all ranks (``comm``: a CommLog)."""
    grads, owners = [], []
    for i, group in enumerate(param_groups):
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise ValueError(
                    f"parameter {name_of(p)!r} (param group {i}) has a sparse gradient ({g.layout}); COAP "
                    "needs dense (strided) gradients"
                )
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"parameter {name_of(p)!r} (param group {i}): its gradient is {tuple(g.shape)} {g.dtype} "
                    f"on {g.device}, but the parameter is {tuple(p.shape)} {p.dtype} on {p.device}; they "
                    "must match"
                )
            grads.append(g)
            owners.append(p)
    if not check_finite or not grads:
        return
    if fsdp.any_dtensor(grads):  # FSDP2: every rank reaches the same verdict (one all-reduce)
        ok, index = fsdp.grads_finite(grads, comm)
        if not ok:
            where = "on another rank" if index is None else f"of parameter {name_of(owners[index])!r}"
            raise NonFiniteGradientError(
                f"a gradient {where} contains inf or NaN; nothing was modified on any rank. Pass found_inf= "
                "(GradScaler style) to skip such steps instead, or check_finite=False to disable this check"
            )
        return
    if not all_finite(grads):
        bad = next(p for p, g in zip(owners, grads) if not all_finite([g]))
        raise NonFiniteGradientError(
            f"the gradient of parameter {name_of(bad)!r} (shape {tuple(bad.shape)}) contains inf or "
            "NaN; nothing was modified. Pass found_inf= (GradScaler style) to skip such steps instead, "
            "or check_finite=False to disable this check"
        )


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite.

    First one ``sum`` per tensor, then one stack, one ``isfinite``, one ``all`` and one host read per
    device for the whole list. A sum is finite only if every element is (IEEE: ``±inf + x`` is ``±inf`` or
    NaN for every ``x``, NaN absorbs, in any summation order), so a finite verdict is exact. A non-finite
    sum is either a non-finite element or finite elements whose sum overflowed; the exact check then
    decides: one ``aminmax`` per tensor (min and max are finite iff every element is; NaN propagates).

    Measured (2-core Xeon, 1 thread, a 688×256 float32 gradient, median of 200): ``sum`` 9.1 µs,
    ``aminmax`` 41.9 µs, ``amax`` 15.5 µs (it alone misses ``-inf``), ``isfinite().all()`` 376 µs (a bool
    copy), ``vector_norm(·, inf)`` 559 µs; before, on the demo model's 39 gradients (AMD EPYC), the
    ``aminmax`` pass took 0.52 ms against 0.89 ms for a host read per gradient and 13.0 ms for
    ``torch._foreach_norm(·, inf)``. In a small CPU step the reductions are spread over the member pool
    (:func:`~.threads.run_members`).
    """
    tensors = [t for t in tensors if t.numel()]
    if _finite(tensors, torch.sum):
        return True
    return _finite(tensors, torch.aminmax)  # a non-finite sum: an inf/NaN element, or an overflow


def _finite(tensors: list[Tensor], reduce) -> bool:
    found: list = [None] * len(tensors)

    def one(i: int) -> None:
        out = reduce(tensors[i])
        found[i] = out if isinstance(out, tuple) else (out,)

    run_members([partial(one, i) for i in range(len(tensors))])  # over the member pool in a small step
    by_device: dict[torch.device, list[Tensor]] = {}
    for t, values in zip(tensors, found):
        by_device.setdefault(t.device, []).extend(values)
    return all(bool(torch.stack(v).isfinite().all()) for v in by_device.values())
