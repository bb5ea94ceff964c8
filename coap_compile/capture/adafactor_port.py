"""A tensor-only, traceable port of ``torch.optim.Adafactor``'s single-tensor update.

``torch/optim/_adafactor.py::_single_tensor_adafactor`` calls ``step.item()``, ``param.norm().item()``
and ``update.norm().item()`` and combines them with Python ``min``/``max``, so ``make_fx`` and Dynamo
cannot capture it. This module computes the same update with 0-d tensor arithmetic only, and without
any shape-dependent constant (no ``numel()``, no sizes), so one traced graph serves every shape.

For a parameter ``W`` with gradient ``G`` (``G ← −G`` when ``maximize``), the number of completed steps
``k`` (so this update is step ``t = k + 1``), learning rate ``lr`` and hyperparameters ``d``,
``c = beta2_decay``, ``λ = weight_decay``, ``ε₁`` (``None`` → ``finfo(dtype).eps``), ``ε₂`` (each a
Python constant or a live 0-d tensor; a constant zero λ skips the decay)::

    β̂_t   = t^c                                   (the weight 1 − β₂,t of the second-moment EMA)
    ρ_t   = min(lr, 1/√t)
    α_t   = max(ε₂, RMS(W)) · ρ_t                  RMS(x) = √mean(x²)   (W before weight decay)
    W     ← W · (1 − lr·λ)                          (only when λ ≠ 0)

    factored (ndim ≥ 2, over the last two dims; R: …×m×1, C: …×1×n):
        R ← lerp(R, mean_{-1}(G²), β̂_t)            C ← lerp(C, mean_{-2}(G²), β̂_t)
        V̂ = (R · C) / max(mean_{-2}(R), ε₁)          (broadcast outer product, not a matmul)
    unfactored (ndim ≤ 1; V shaped like W):
        V ← lerp(V, G², β̂_t)                        V̂ = V

    U     = G / √max(V̂, ε₁²)                       (written as rsqrt(clamp(V̂, min=ε₁²)) · G)
    W     ← W − U · α_t / max(1, RMS(U)/d)

This is torch's math term by term; the only numerical differences are the order of a few
reductions (``mean(G²)`` instead of ``‖G‖²/n``) and the 0-d scalars being evaluated in the tensor
dtype of ``step``/``lr`` (float64 in the capture contract, like torch's Python floats) instead of
Python floats.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adafactor_factored_update", "adafactor_unfactored_update", "resolve_eps1"]


Num = float | Tensor  # a Python constant or a live 0-d tensor hyperparameter


def resolve_eps1(eps1: Num | None, dtype: torch.dtype) -> Num:
    """torch's rule: ``eps1=None`` means the machine epsilon of the parameter dtype."""
    if eps1 is None:
        return float(torch.finfo(dtype).eps)
    return eps1 if isinstance(eps1, Tensor) else float(eps1)


def _is_zero(v: Num) -> bool:
    """A constant zero (a live tensor is never treated as zero: zero-ness is structural)."""
    return not isinstance(v, Tensor) and float(v) == 0.0


def _rms(x: Tensor) -> Tensor:
    """√mean(x²) over all elements, as a 0-d tensor (no numel constant)."""
    return x.mul(x).mean().sqrt()


def _prologue(
    param: Tensor,
    grad: Tensor,
    step: Tensor,
    lr: Tensor,
    *,
    beta2_decay: Num,
    weight_decay: Num,
    eps2: Num,
    maximize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared part: returns ``(g, W after weight decay, t, β̂_t, α_t)``; the last three are 0-d."""
    g = grad.neg() if maximize else grad
    t = step + 1
    beta_hat = t.pow(beta2_decay)  # 0-d, used directly as lerp's weight (like torch's Python float)
    rho = torch.minimum(lr, t.rsqrt())
    alpha = _rms(param).clamp(min=eps2) * rho
    if not _is_zero(weight_decay):
        param = param * (1 - lr * weight_decay)
    return g, param, t, beta_hat, alpha


def _apply(param: Tensor, g: Tensor, var_estimate: Tensor, alpha: Tensor, *, d: Num, eps1: Num) -> Tensor:
    """``W − U · α / max(1, RMS(U)/d)`` with ``U = rsqrt(max(V̂, ε₁²)) · g``."""
    update = var_estimate.clamp(min=eps1 * eps1).rsqrt() * g
    denom = (_rms(update) / d).clamp(min=1.0)
    return param - update * (alpha / denom)


def adafactor_factored_update(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor,
    col_var: Tensor,
    step: Tensor,
    lr: Tensor,
    *,
    d: Num,
    beta2_decay: Num,
    weight_decay: Num,
    eps1: Num | None,
    eps2: Num,
    maximize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Adafactor step for a parameter with ``ndim ≥ 2`` (factored second moment).

    Args:
        param, grad: ``…×m×n``.
        row_var: ``…×m×1``; col_var: ``…×1×n`` (torch's state layout).
        step: 0-d, the number of completed steps; lr: 0-d.

    Returns:
        ``(new_param, new_row_var, new_col_var, step + 1)``; nothing is modified in place.
    """
    e1 = resolve_eps1(eps1, param.dtype)
    g, w, t, beta_hat, alpha = _prologue(
        param,
        grad,
        step,
        lr,
        beta2_decay=beta2_decay,
        weight_decay=weight_decay,
        eps2=eps2,
        maximize=maximize,
    )
    g2 = g * g
    new_row = torch.lerp(row_var, g2.mean(dim=-1, keepdim=True), beta_hat)
    new_col = torch.lerp(col_var, g2.mean(dim=-2, keepdim=True), beta_hat)
    var_estimate = (new_row * new_col) / new_row.mean(dim=-2, keepdim=True).clamp(min=e1)
    return _apply(w, g, var_estimate, alpha, d=d, eps1=e1), new_row, new_col, t


def adafactor_unfactored_update(
    param: Tensor,
    grad: Tensor,
    variance: Tensor,
    step: Tensor,
    lr: Tensor,
    *,
    d: Num,
    beta2_decay: Num,
    weight_decay: Num,
    eps1: Num | None,
    eps2: Num,
    maximize: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adafactor step for a parameter with ``ndim ≤ 1`` (full second moment, shaped like ``param``).

    Returns:
        ``(new_param, new_variance, step + 1)``; nothing is modified in place.
    """
    e1 = resolve_eps1(eps1, param.dtype)
    g, w, t, beta_hat, alpha = _prologue(
        param,
        grad,
        step,
        lr,
        beta2_decay=beta2_decay,
        weight_decay=weight_decay,
        eps2=eps2,
        maximize=maximize,
    )
    new_var = torch.lerp(variance, g * g, beta_hat)
    return _apply(w, g, new_var, alpha, d=d, eps1=e1), new_var, t
