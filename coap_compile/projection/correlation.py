"""COAP's correlation-aware step on ``P`` in closed form, and a scale-invariant variant.

Notation (canonical orientation, :mod:`coap_compile.projection.base`): ``X ∈ ℝ^{M×N}`` (``M ≥ N``),
``P ∈ ℝ^{N×r}``, the low-rank first moment ``F ∈ ℝ^{M×r}`` (the state *before* this step's update, spec §4),
``ε = 1e-8`` (``F.cosine_similarity``'s eps), ``⟨A, B⟩ = Σ A∘B``::

    L(P) = E(P) · (1 − c̄(P)),    E = ‖X P Pᵀ − X‖²_F / (M N),    c̄ = mean_i cos(M̂_i, X_i),  M̂ = F Pᵀ

The cosine runs along dim 1 of the *original* weight (spec §4): over the rows ``X_i`` of ``X`` when not
transposed (``M`` of them) and over its columns when ``transposed`` (``N`` of them). Write ``K = #cosines``.

**MSE factor.** With ``Y = X P`` (``M×r``), ``S = PᵀP`` and ``Gy = YᵀY`` (``r×r``) and ``R = Y Pᵀ − X``:
``‖R‖² = ‖X‖² − 2 tr Gy + ⟨S, Gy⟩`` (since ``⟨Y Pᵀ, X⟩ = tr(Yᵀ X P) = tr Gy``), and from
``d‖R‖² = 2⟨R, X dP Pᵀ + Y dPᵀ⟩ = 2⟨Xᵀ R P + Rᵀ Y, dP⟩`` with ``Xᵀ R P = XᵀY S − XᵀY`` and
``Rᵀ Y = P Gy − XᵀY``::

    ∇E = (2 / (M N)) · (Xᵀ Y (S − 2 I) + P Gy)

**Cosine factor** (torch ≥ 2.0 semantics, verified against autograd in the tests): with ``a_i = ⟨M̂_i, X_i⟩``,
``n1_i = ‖M̂_i‖``, ``n2_i = ‖X_i‖``, ``c1 = max(n1, ε)``, ``c2 = max(n2, ε)``, torch computes
``cos_i = a_i / (c1_i c2_i)`` and, because it clamps the norms outside autograd, differentiates it as
``∂cos_i/∂M̂_i = X_i d1_i − M̂_i d2_i`` with ``d1 = 1/(c1 c2)`` and ``d2 = a / (c1² n1 c2)`` (``d2 = 0`` where
``n1 = 0``). The chain rule through ``M̂ = F Pᵀ`` (``∂c̄/∂P = (∂c̄/∂M̂)ᵀ F``) gives

* rows (not transposed): ``a = rowsum(F ∘ Y)``, ``n1² = rowsum((F S) ∘ F)``, ``n2 = ‖X_{i,:}‖``,
  ``∇c̄ = (1/M) (Xᵀ (d1 ∘ F) − P Fᵀ (d2 ∘ F))``;
* columns (transposed): ``C = Xᵀ F`` (``N×r``), ``a = rowsum(C ∘ P)``, ``n1² = rowsum((P Fᵀ F) ∘ P)``,
  ``n2 = ‖X_{:,j}‖``, ``∇c̄ = (1/N) (d1 ∘ C − d2 ∘ (P FᵀF))`` (``d ∘`` scales rows).

**Together**, ``∇L = (1 − c̄) ∇E − E ∇c̄``, with ``α = 2(1 − c̄)/(M N)`` and ``β = E/K``::

    rows:    ∇L = Xᵀ Z + P W,  Z = α Y (S − 2I) − β d1∘F,   W = α Gy + β Fᵀ (d2∘F)
    columns: [T | C] = Xᵀ [Y | F],  Gy = Pᵀ T,  ∇L = α (T (S − 2I) + P Gy) − β d1∘C + β d2∘(P FᵀF)

**Passes over X** (``M×N``): rows: ``Y = X P`` (matmul), the row norms (one read, no temporary) and ``Xᵀ Z``
(matmul): 2 matmul passes + 1 reduction. Columns: ``Y = X P``, the column norms and one matmul ``Xᵀ [Y | F]``
of width ``2r`` (X is read once for both products): 2 matmul passes + 1 reduction. No ``M×N`` intermediate is
formed (autograd materialises ``X̂``, ``M̂``, ``R`` and their gradients: five ``M×N`` tensors and four ``M×N×r``
matmuls). The rest is ``O((M + N) r²)``: ``S, Gy, F S`` (or ``FᵀF, P FᵀF``), ``Y (S − 2I)``, ``Fᵀ(d2∘F)``,
``P W``. ``‖R‖²`` from Gram matrices loses ``≈ ε_mach ‖X‖²`` absolutely (cancellation), which matters only
when ``P`` captures nearly all of ``X``; see the float32 comparison in ``tests/test_correlation.py``.

**Scale invariance.** ``E ∝ ‖X‖²`` and ``c̄`` is scale-free, so ``∇L ∝ ‖X‖²``; after the paper's clip
``∇ · min(1, 1/(‖∇‖ + 1e-6))`` and lr ``0.1`` a training-scale gradient (``‖G‖ ≈ 0.02``) moves ``P`` by
~1e-9 relative (issue 13), i.e. not at all in float32. :func:`normalized_correlation_step` keeps the
*direction* and fixes the *angle*: with ``H = ∇L − P Pᵀ∇L`` (the part of the gradient that changes the
subspace; the within-subspace rotation ``P Pᵀ∇L`` is dropped) and ``t = tan θ / σ_max(H)``::

    A = P − t H,    P' = A (AᵀA)^{-1/2}           (polar retraction: the orthonormal matrix closest to A)

For orthonormal ``P`` (``PᵀH = 0``) the principal angles between ``span P`` and ``span P'`` are
``atan(t σ_i(H))``, so the largest is exactly ``θ``, whatever ``‖G‖`` is. ``Pᵀ P' = (AᵀA)^{-1/2}`` is
symmetric positive definite, so among the bases of the new subspace ``P'`` is the one closest to ``P``: the
low-rank moments, reused without ``restore_state`` (spec §5), keep their meaning as far as possible (a QR
retraction would add an order-dependent triangular rotation). Cost beyond ``∇L``: ``O(N r²)`` and two
``r×r`` ``eigh`` (12 ms each at ``r = 512`` on the 2-core CPU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linalg import overflow_scale

__all__ = [
    "CORRELATION_LR",
    "CORRELATION_MAX_NORM",
    "COSINE_EPS",
    "DEFAULT_ANGLE",
    "autograd_correlation_grad",
    "correlation_grad",
    "correlation_step",
    "normalized_correlation_step",
]

#: Constants of the official ``update_proj`` (not exposed as options there either).
CORRELATION_LR = 0.1
CORRELATION_MAX_NORM = 1.0
COSINE_EPS = 1e-8
#: Largest principal angle (radians) one normalized correlation step moves ``P`` by: 30°, the minimum of the
#: measured correlation loss on the demo model (table in :mod:`coap_compile.projection.coap`).
DEFAULT_ANGLE = math.radians(30.0)


def _cosine_weights(a: Tensor, n1sq: Tensor, n2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(cos, d1, d2)`` of the module docstring from ``a``, ``n1²`` and ``n2`` (torch's eps semantics)."""
    n1 = n1sq.clamp_min(0.0).sqrt()
    c1, c2 = n1.clamp_min(COSINE_EPS), n2.clamp_min(COSINE_EPS)
    d1 = 1.0 / (c1 * c2)
    cos = a * d1
    d2 = torch.where(n1 > 0, a / (c1 * c1 * n1.clamp_min(torch.finfo(n1.dtype).tiny) * c2), 0.0)
    # A zero X_i contributes X_i·d1 = 0 to the gradient; zero d1 there so 0·(1/ε²) never meets an overflow.
    return cos, torch.where(n2 > 0, d1, 0.0), d2


def correlation_grad(p: Tensor, x: Tensor, first_moment: Tensor, *, transposed: bool) -> Tensor:
    """``∂L/∂P`` in closed form (module docstring), in ``P``'s dtype. ``X`` and ``F`` are constants."""
    return _grad_and_gram(p, x, first_moment, transposed)[0]


def _grad_and_gram(p: Tensor, x: Tensor, first_moment: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
    """``(∇L, S = PᵀP)``; ``S`` is returned for the normalized step's retraction."""
    dtype = p.dtype
    x = x.detach().to(dtype)
    f = first_moment.detach().to(dtype)
    p = p.detach()
    m, n = x.shape
    y = x @ p  # pass 1
    s = p.t() @ p
    eye2 = 2.0 * torch.eye(s.shape[0], dtype=dtype, device=s.device)
    n2 = torch.linalg.vector_norm(x, dim=0 if transposed else 1)  # one read of X, no M×N temporary
    if transposed:
        tc = x.t() @ torch.cat([y, f], dim=1)  # pass 2: Xᵀ [Y | F] in one read of X
        t, c = tc[:, : y.shape[1]], tc[:, y.shape[1] :]
        gy = p.t() @ t  # YᵀY = Pᵀ (XᵀY): N r² instead of M r²
    else:
        gy = y.t() @ y
    resid = (n2.square().sum() + ((s - eye2) * gy).sum()).clamp_min(0.0)  # ‖X P Pᵀ − X‖²
    mse = resid / (m * n)
    if not transposed:
        a = (f * y).sum(1)
        cos, d1, d2 = _cosine_weights(a, ((f @ s) * f).sum(1), n2)
        alpha, beta = 2.0 * (1.0 - cos.mean()) / (m * n), mse / m
        z = alpha * (y @ (s - eye2)) - beta * (d1[:, None] * f)
        w = alpha * gy + beta * ((d2[:, None] * f).t() @ f)
        return x.t() @ z + p @ w, s  # pass 2
    pg = p @ (f.t() @ f)
    cos, d1, d2 = _cosine_weights((c * p).sum(1), (pg * p).sum(1), n2)
    alpha, beta = 2.0 * (1.0 - cos.mean()) / (m * n), mse / n
    grad = alpha * (t @ (s - eye2) + p @ gy) - beta * (d1[:, None] * c) + beta * (d2[:, None] * pg)
    return grad, s


def autograd_correlation_grad(p: Tensor, x: Tensor, first_moment: Tensor, *, transposed: bool) -> Tensor:
    """The implementation :func:`correlation_grad` replaced: autograd through ``F.mse_loss`` and
    ``F.cosine_similarity`` (kept as the reference ``bench step`` times against; the tests hold their own
    copy as the oracle). Forms ``X̂``, ``M̂`` and their gradients (``M×N`` each)."""
    x = x.detach().to(p.dtype)
    f = first_moment.detach().to(p.dtype)
    with torch.enable_grad():
        q = p.detach().clone().requires_grad_(True)
        cos = torch.nn.functional.cosine_similarity(f @ q.t(), x, dim=0 if transposed else 1, eps=COSINE_EPS)
        loss = torch.nn.functional.mse_loss((x @ q) @ q.t(), x) * (1.0 - cos.mean())
        (grad,) = torch.autograd.grad(loss, q)
    return grad


def correlation_step(
    p: Tensor,
    x: Tensor,
    first_moment: Tensor,
    *,
    transposed: bool,
    lr: float = CORRELATION_LR,
    max_norm: float = CORRELATION_MAX_NORM,
) -> Tensor:
    """The paper's step (spec §4): ``P − lr · ∇ · min(1, max_norm/(‖∇‖_F + 1e-6))``; returns the new ``P``.

    ``∇`` is :func:`correlation_grad` (no autograd, no ``.grad`` buffer, works under ``no_grad``). ``P`` is
    not modified.
    """
    x, first_moment, sx = _safe_inputs(x, first_moment)
    grad = correlation_grad(p, x, first_moment, transposed=transposed)
    if sx != 1.0:  # ∇L(X) = s²·∇L(X / s): clip the true gradient, in float64 scalars (no overflow)
        true_norm = sx * sx * float(grad.double().norm())
        return p.detach() - (lr * sx * sx * min(1.0, max_norm / (true_norm + 1e-6))) * grad
    coef = max_norm / (float(grad.norm()) + 1e-6)
    if coef < 1.0:
        grad = grad * coef
    return p.detach() - lr * grad


#: ``max|X|·√(M·N)`` above which the normalized step rescales ``X`` (and ``F``): ``HᵀH`` then stays ``≲ 2⁶⁴``.
NORMALIZED_LIMIT = 2.0**16


def _safe_inputs(x: Tensor, first_moment: Tensor, limit: float | None = None) -> tuple[Tensor, Tensor, float]:
    """``(X / s, F / s_F, s)``: both rescaled by powers of two when their Gram products could overflow
    (:func:`~.linalg.overflow_scale`; 1 for training-scale inputs, which then run unchanged). ``c̄`` is
    invariant to the scale of ``F`` and ``X``, ``E`` scales by ``s²``: ``∇L(X, F) = s² ∇L(X/s, F/s_F)``
    (up to the cosine's ``ε = 1e-8`` clamps, which only matter for rows of norm ``< 1e-8·s``).
    ``F`` is bounded by ``max|F|·√(M r) ≤ 2¹⁶`` (the cosine's derivative forms ``‖F‖³‖X‖``: measured, an
    unscaled ``F`` of ``2⁴⁰`` made it overflow to 0 and the step's direction 12 % off)."""
    # F is rescaled to the small bound always: d2 forms ‖F‖³‖X‖ (the cosine's derivative).
    sx, sf = overflow_scale(x, limit), overflow_scale(first_moment, NORMALIZED_LIMIT)
    if sx != 1.0:
        x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32) / sx
    if sf != 1.0:
        first_moment = first_moment.detach().float() / sf
    return x, first_moment, sx


def normalized_correlation_step(
    p: Tensor, x: Tensor, first_moment: Tensor, *, transposed: bool, angle: float = DEFAULT_ANGLE
) -> Tensor:
    """Move ``span P`` by exactly ``angle`` (largest principal angle, radians) down the correlation loss.

    See the module docstring: ``H = (I − P Pᵀ) ∇L``, ``P' = polar(P − (tan θ / σ_max(H)) H)``. ``P`` should
    have orthonormal columns (the COAP schedule guarantees it: the init and SVD refreshes return orthonormal
    bases and this step keeps them); ``P'`` always has orthonormal columns. ``P`` is returned unchanged (a
    copy) where the subspace cannot or need not move: ``r = N``, or ``σ_max(H) ≤ √ε_mach · ‖∇L‖_F`` (``∇L``
    lies in the subspace's own rotations up to rounding, e.g. ``X = F = 0``; there ``H``'s direction would be
    rounding noise).
    """
    p = p.detach()
    if p.shape[1] >= p.shape[0]:
        return p.clone()
    # The step is invariant to the scale of ∇L, which HᵀH raises to the 4th power of ‖X‖²: rescale early.
    x, first_moment, _ = _safe_inputs(x, first_moment, NORMALIZED_LIMIT)
    grad, s = _grad_and_gram(p, x, first_moment, transposed)
    ptg = p.t() @ grad
    h = grad - p @ ptg
    hth = h.t() @ h
    sigma_max = float(torch.linalg.eigvalsh(hth)[-1].clamp_min(0.0).sqrt())
    floor = math.sqrt(torch.finfo(p.dtype).eps) * float(grad.norm())
    if not math.isfinite(sigma_max) or sigma_max <= floor:
        return p.clone()
    t = math.tan(angle) / sigma_max
    pth = ptg - s @ ptg  # Pᵀ H (≈ 0 for orthonormal P), so AᵀA needs no further N×r product
    ata = s - t * (pth + pth.t()) + (t * t) * hth
    evals, evecs = torch.linalg.eigh(ata)
    return (p - t * h) @ ((evecs * evals.rsqrt()) @ evecs.t())
