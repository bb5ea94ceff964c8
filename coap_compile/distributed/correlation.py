"""COAP's correlation step on a row-sharded ``X``, with the gradient of ``P`` derived by hand.

Notation: rank ``k`` holds ``X_k`` (``M_k×N``) and the matching rows ``Mo_k`` (``M_k×r``) of the
low-rank first moment; ``P`` (``N×r``) is replicated; ``M = Σ M_k`` (``global_rows``). The loss is
the single-process one (:mod:`coap_compile.projection.correlation`)::

    Y = X P,  E = Y Pᵀ − X,  M̂ = Mo Pᵀ
    S_e = ‖E‖²_F,   mse = S_e / (M N)
    L = mse · (1 − c̄),  c̄ = mean of the cosines of M̂ and X along rows (``transposed=False``,
                         M of them) or along columns (``transposed=True``, N of them)
    cos = ⟨M̂_·, X_·⟩ / (max(‖M̂_·‖, ε) · max(‖X_·‖, ε))          (ε = 1e-8, as F.cosine_similarity)

Gradients (``dS_e = 2⟨E, X dP Pᵀ + X P dPᵀ⟩``)::

    ∇S_e = 2 (Xᵀ (E P) + Eᵀ Y)                                   = Σ_k 2 (X_kᵀ E_k P + E_kᵀ Y_k)
    rows i:    a_i = Mo_i·Y_i,  ‖M̂_i‖² = Mo_i PᵀP Mo_iᵀ
               Σ_i ∇cos_i = Xᵀ (w∘Mo) − P Moᵀ (v∘Mo)
    columns j: a_j = P_j·(XᵀMo)_j,  ‖M̂_{:,j}‖² = P_j MoᵀMo P_jᵀ
               (Σ_j ∇cos_j)_j = w_j (XᵀMo)_j − v_j (P MoᵀMo)_j
    w = 1 / (max(‖M̂‖,ε) max(‖X‖,ε)),  v = a / (max(‖M̂‖,ε)² max(‖X‖,ε) ‖M̂‖)   (v = 0 where ‖M̂‖ = 0)
    ∇L = (1 − c̄)/(M N) · ∇S_e − mse/(#cosines) · Σ ∇cos

(``v`` uses the unclamped norm in its last factor: torch clamps the norms in place under ``no_grad``, so
the clamp is the identity for the gradient.) Every ``∇`` above is a sum of per-shard terms. Rows:
the cosines are local; one all-reduce of ``[S_e, Σ_i cos_i]`` (2 numbers) gives ``c̄`` and ``mse``, then
each rank forms its share of ``∇L`` and one ``N×r`` all-reduce sums it. Columns: each column's dot
product and norms are sums over all rows, so the first all-reduce carries ``[S_e, a, ‖M̂_{:,j}‖²,
‖X_{:,j}‖²]`` (``1 + 3N``). Then, on bit-identical values on every rank, either the paper's step
(:func:`correlation_step`: ``∇ ← ∇·min(1, max_norm/(‖∇‖_F + 1e-6))``, ``P ← P − lr·∇``) or the
normalized one (:func:`normalized_correlation_step`: ``H = ∇ − P Pᵀ∇``, ``t = tan θ / σ_max(H)``,
``P' = A (AᵀA)^{-1/2}`` with ``A = P − tH``, the single-process
:func:`~coap_compile.projection.correlation.normalized_correlation_step`'s math): both need nothing
beyond ``∇L``, so they communicate the same bytes.

``E`` is formed explicitly on the shard (an ``M_k×N`` temporary, the size of the gradient shard) rather
than in closed form (``S_e = ‖X‖² − 2‖Y‖² + ⟨YᵀY, PᵀP⟩``): measured against float64 with ``P`` near the
top-16 subspace of a 384×96 matrix whose tail holds 1e-2 of the spectrum, the closed form's ``S_e``
is off by 5.4e-4 relative (cancellation), the explicit one by 2.3e-7; gradients 1.9e-5 vs 4.3e-6.
(The single-process closed form uses the Gram expression; the two agree to that error.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..projection.correlation import (
    CORRELATION_LR,
    CORRELATION_MAX_NORM,
    COSINE_EPS,
    DEFAULT_ANGLE,
    NORMALIZED_LIMIT,
)
from ..projection.linalg import overflow_scale_of
from .comm import CommLog, all_reduce, broadcast, group_size

__all__ = [
    "correlation_loss_and_grad",
    "correlation_step",
    "normalized_correlation_step",
    "sharded_basis_scale",
    "sharded_overflow_scales",
]


def _amax(t: Tensor) -> float:
    return float(t.detach().abs().amax()) if t.numel() else 0.0


def sharded_overflow_scales(
    x: Tensor,
    first_moment: Tensor,
    *,
    global_rows: int,
    dtype: torch.dtype,
    limit: float | None = None,
    group: dist.ProcessGroup | None = None,
    comm: CommLog | None = None,
) -> tuple[float, float]:
    """``(s_X, s_Mo)``: the single-process :func:`~coap_compile.projection.linalg.overflow_scale` of the
    whole ``X`` (``limit``) and ``Mo`` (bound ``NORMALIZED_LIMIT``, as the single-process
    ``_safe_inputs``) from one 2-element ``MAX`` all-reduce of the shards' ``max|·|``: powers of two,
    identical on every rank (1 for training-scale inputs, which then run unchanged). Issue 19: a finite
    1e18 gradient made the sharded ``X P`` and Gram products overflow to inf/NaN."""
    t = torch.tensor([_amax(x), _amax(first_moment)], dtype=dtype, device=x.device)
    ax, af = all_reduce(t, group, comm, "scale", op="max").tolist()
    r = first_moment.shape[1]
    return (
        overflow_scale_of(ax, global_rows * x.shape[1], dtype, limit),
        overflow_scale_of(af, global_rows * r, dtype, NORMALIZED_LIMIT),
    )


def sharded_basis_scale(
    x: Tensor, dtype: torch.dtype, group: dist.ProcessGroup | None = None, comm: CommLog | None = None
) -> float:
    """The power of two ``X`` is divided by before the sharded low-cost SVD: one 2-element ``MAX``
    all-reduce of ``[max|X_k|, M_k]``; ``M ≤ W·max M_k`` bounds the global size (a larger bound only
    picks a larger power of two, which changes no mantissa)."""
    t = torch.tensor([_amax(x), float(x.shape[0])], dtype=dtype, device=x.device)
    ax, rows = all_reduce(t, group, comm, "scale", op="max").tolist()
    return overflow_scale_of(ax, int(group_size(group) * rows) * x.shape[1], dtype)


def _check(p: Tensor, x: Tensor, mo: Tensor, global_rows: int) -> None:
    if p.ndim != 2 or x.ndim != 2 or mo.ndim != 2:
        raise ValueError(
            "p, x and first_moment must be 2-D, got shapes "
            f"{tuple(p.shape)}, {tuple(x.shape)}, {tuple(mo.shape)}"
        )
    n, r = p.shape
    if x.shape[1] != n or mo.shape != (x.shape[0], r):
        raise ValueError(
            f"shapes do not match: p {tuple(p.shape)} (N×r), x {tuple(x.shape)} (M_local×N), "
            f"first_moment {tuple(mo.shape)} (M_local×r)"
        )
    if isinstance(global_rows, bool) or not isinstance(global_rows, int) or global_rows < max(1, x.shape[0]):
        raise ValueError(
            f"global_rows must be an int >= the local row count {x.shape[0]} (and >= 1), got {global_rows!r}"
        )


def _rescaled(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return t if scale == 1.0 else t.detach().to(dtype) / scale


def _inverse_norm_weights(a: Tensor, n1: Tensor, n2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``cos``, ``w`` and ``v`` of the module docstring from dot products and the two norms."""
    c1, c2 = n1.clamp_min(COSINE_EPS), n2.clamp_min(COSINE_EPS)
    cos = a / (c1 * c2)
    w = 1.0 / (c1 * c2)
    v = torch.where(
        n1 > 0, a / (c1 * c1 * c2 * n1.clamp_min(torch.finfo(n1.dtype).tiny)), torch.zeros_like(a)
    )
    return cos, w, v


def correlation_loss_and_grad(
    p: Tensor,
    x: Tensor,
    first_moment: Tensor,
    *,
    global_rows: int,
    transposed: bool,
    group: dist.ProcessGroup | None = None,
    comm: CommLog | None = None,
) -> tuple[Tensor, Tensor]:
    """``(L, ∇L)`` of the module docstring, both replicated (0-d and ``N×r``, in ``p``'s dtype).

    Args:
        p: the replicated ``P`` (``N×r``).
        x: this rank's rows of ``X`` (``M_k×N``); ``first_moment``: the matching rows of ``Mo``.
        global_rows: ``M`` (the rows of all ranks together).
        transposed: the cosine runs along columns (dim 0 of ``X``) instead of rows, as in the
            single-process ``correlation_step``.
    """
    _check(p, x, first_moment, global_rows)
    dtype = p.dtype
    p = p.detach()
    x = x.detach().to(dtype)
    mo = first_moment.detach().to(dtype)
    m_total, n = global_rows, p.shape[0]
    y = x @ p
    e = y @ p.mT - x
    g_e = 2.0 * (x.mT @ (e @ p) + e.mT @ y)
    s_e = (e * e).sum().reshape(1)
    if transposed:
        xtm = x.mT @ mo  # N×r, this shard's part of XᵀMo
        mtm = mo.mT @ mo  # r×r, this shard's part of MoᵀMo
        pm = p @ mtm
        stats = all_reduce(
            torch.cat([s_e, (p * xtm).sum(1), (pm * p).sum(1), (x * x).sum(0)]), group, comm, "corr_stats"
        )
        a, n1sq, n2sq = stats[1:].reshape(3, n).unbind(0)
        cos, w, v = _inverse_norm_weights(a, n1sq.clamp_min(0).sqrt(), n2sq.sqrt())
        cos_mean = cos.mean()
        g_c = w[:, None] * xtm - v[:, None] * pm
        count = n
    else:
        a = (mo * y).sum(1)
        n1 = ((mo @ (p.mT @ p)) * mo).sum(1).clamp_min(0).sqrt()
        cos, w, v = _inverse_norm_weights(a, n1, x.norm(dim=1))
        stats = all_reduce(torch.cat([s_e, cos.sum().reshape(1)]), group, comm, "corr_stats")
        cos_mean = stats[1] / m_total
        g_c = x.mT @ (w[:, None] * mo) - p @ (mo.mT @ (v[:, None] * mo))
        count = m_total
    mse = stats[0] / (m_total * n)
    grad = ((1.0 - cos_mean) / (m_total * n)) * g_e - (mse / count) * g_c
    grad = all_reduce(grad.contiguous(), group, comm, "corr_grad")
    return mse * (1.0 - cos_mean), grad


def correlation_step(
    p: Tensor,
    x: Tensor,
    first_moment: Tensor,
    *,
    global_rows: int,
    transposed: bool,
    lr: float = CORRELATION_LR,
    max_norm: float = CORRELATION_MAX_NORM,
    group: dist.ProcessGroup | None = None,
    comm: CommLog | None = None,
    src: int | None = None,
) -> Tensor:
    """One clipped gradient step on ``L(P)``; returns the new replicated ``P`` (``p`` is not modified).

    Arguments as :func:`correlation_loss_and_grad`; ``src``: broadcast the result from that group rank.
    """
    _check(p, x, first_moment, global_rows)
    sx, sf = sharded_overflow_scales(
        x, first_moment, global_rows=global_rows, dtype=p.dtype, group=group, comm=comm
    )
    x, first_moment = _rescaled(x, sx, p.dtype), _rescaled(first_moment, sf, p.dtype)
    _, grad = correlation_loss_and_grad(
        p, x, first_moment, global_rows=global_rows, transposed=transposed, group=group, comm=comm
    )
    if sx != 1.0:  # ∇L(X) = s²·∇L(X / s): clip the true gradient, in float64 scalars (single-process rule)
        true_norm = sx * sx * float(grad.double().norm())
        new_p = (p.detach() - (lr * sx * sx * min(1.0, max_norm / (true_norm + 1e-6))) * grad).contiguous()
    else:
        coef = max_norm / (float(grad.norm()) + 1e-6)
        if coef < 1.0:
            grad = grad * coef
        new_p = (p.detach() - lr * grad).contiguous()
    if src is not None:
        broadcast(new_p, src, group, comm, "p")
    return new_p


def normalized_correlation_step(
    p: Tensor,
    x: Tensor,
    first_moment: Tensor,
    *,
    global_rows: int,
    transposed: bool,
    angle: float = DEFAULT_ANGLE,
    group: dist.ProcessGroup | None = None,
    comm: CommLog | None = None,
    src: int | None = None,
) -> Tensor:
    """Turn ``span P`` by ``angle`` (radians, largest principal angle) down ``L``; returns the new ``P``.

    The distributed ``∇L`` of :func:`correlation_loss_and_grad`, then the replicated polar retraction of
    the module docstring. ``P`` is returned unchanged (a copy) where ``r = N`` (decided from shapes, before
    any collective) or ``σ_max(H) ≤ √ε·‖∇L‖_F`` (``H`` is rounding noise), as in the single-process step.
    """
    if not 0.0 < angle < math.pi / 2:
        raise ValueError(f"angle must be in (0, π/2) radians, got angle={angle!r}")
    p = p.detach()
    if p.shape[1] >= p.shape[0]:
        return p.clone()
    _check(p, x, first_moment, global_rows)
    scales = sharded_overflow_scales(
        x,
        first_moment,
        global_rows=global_rows,
        dtype=p.dtype,
        limit=NORMALIZED_LIMIT,
        group=group,
        comm=comm,
    )  # the step is invariant to the scale of ∇L: nothing to undo
    x, first_moment = (_rescaled(t, sc, p.dtype) for t, sc in zip((x, first_moment), scales))
    _, grad = correlation_loss_and_grad(
        p, x, first_moment, global_rows=global_rows, transposed=transposed, group=group, comm=comm
    )
    s = p.mT @ p
    ptg = p.mT @ grad
    h = grad - p @ ptg
    hth = h.mT @ h
    sigma_max = float(torch.linalg.eigvalsh(hth)[-1].clamp_min(0.0).sqrt())
    if not math.isfinite(sigma_max) or sigma_max <= math.sqrt(torch.finfo(p.dtype).eps) * float(grad.norm()):
        new_p = p.clone()
    else:
        t = math.tan(angle) / sigma_max
        pth = ptg - s @ ptg  # Pᵀ H
        evals, evecs = torch.linalg.eigh(s - t * (pth + pth.mT) + (t * t) * hth)  # AᵀA
        new_p = ((p - t * h) @ ((evecs * evals.rsqrt()) @ evecs.mT)).contiguous()
    if src is not None:
        broadcast(new_p, src, group, comm, "p")
    return new_p
