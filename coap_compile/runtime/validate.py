"""Gradient validation before a step writes anything (the atomic-step contract)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NonFiniteGradientError

__all__ = ["check_gradients"]


def check_gradients(param_groups: list[dict], name_of: Callable[[Tensor], str], check_finite: bool) -> None:
    """Every gradient's layout, shape, dtype and device (and finiteness), before anything is written:
    ``ValueError`` (or :class:`NonFiniteGradientError`) naming the parameter and what it has."""
    grads, owners = [], []
    for i, group in enumerate(param_groups):
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            where = f"parameter {name_of(p)!r} (param group {i})"
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(
                    f"{where} has a sparse gradient ({g.layout}); COAP needs dense (strided) gradients"
                )
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"{where}: its gradient is {tuple(g.shape)} {g.dtype} on {g.device}, but the "
                    f"parameter is {tuple(p.shape)} {p.dtype} on {p.device}; they must match"
                )
            grads.append(g)
            owners.append(p)
    if not check_finite or not grads:
        return
    # One reduction pass per gradient and no boolean temporaries: min and max are finite iff every
    # element is (NaN propagates through aminmax).
    ok = torch.stack([torch.isfinite(torch.stack(torch.aminmax(g))).all().cpu() for g in grads])
    if not bool(ok.all()):
        bad = owners[int((~ok).nonzero()[0])]
        raise NonFiniteGradientError(
            f"the gradient of parameter {name_of(bad)!r} (shape {tuple(bad.shape)}) contains inf or "
            "NaN; nothing was modified. Pass found_inf= (GradScaler style) to skip such steps instead, "
            "or check_finite=False to disable this check"
        )
