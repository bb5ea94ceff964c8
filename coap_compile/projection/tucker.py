"""Tucker COAP for 4-D convolution weights (spec §1d, §10), in plain torch (no tensorly).

Notation: ``G ∈ ℝ^{C_out×C_in×kh×kw}``; ``T ×ₙ U`` is the mode-n product
``(T ×ₙ U)_{…j…} = Σᵢ T_{…i…} U_{j i}``; factors ``U0 ∈ ℝ^{C_out×r0}``, ``U1 ∈ ℝ^{C_in×r1}`` with
approximately orthonormal columns. Two modes are projected, or mode 0 only when ``kw == 1`` (the
official rule checks the last dim only, so a ``k×1`` kernel is single-mode too)::

    project(G)      = G ×₀ U0ᵀ ×₁ U1ᵀ    (core r0×r1×kh×kw, or r0×C_in×kh×kw; the moments live here)
    project_back(X) = X ×₀ U0 ×₁ U1      (C_out×C_in×kh×kw; the caller multiplies by ``scale``)

Ranks from ``ρ = conv_rank_ratio`` (official semantics: Python floor division, then ``int``)::

    two modes:  r0 = max(1, int(C_out // √ρ)),  r1 = max(1, int(C_in // √ρ))
    one mode:   r0 = max(1, int(C_out // ρ))

Only weights with ``numel > 9216`` (``32·32·3·3``, the official ``MIN_CNN_PARAMS``) are projected.
Deliberate difference: for ``ρ < 1`` the official rule gives a rank above the dimension (tensorly is
then asked for more singular vectors than exist); here each rank is clamped to its dimension.

**Factors** (init, ``k = 0``): HOOI (partial Tucker), as tensorly's ``partial_tucker`` with
``init='svd'``: ``Uₙ`` = top-rₙ left singular vectors of the unfolding ``G₍ₙ₎``, then sweeps
``Uₙ ← top-rₙ left singular vectors of (G ×_{m≠n} Uₘᵀ)₍ₙ₎`` (modes in order, each using the latest
factors) until the relative error ``‖G − Ĝ‖/‖G‖`` (computed directly, not as ``√(‖G‖²−‖core‖²)``,
which cancels in float32) changes by less than ``tol`` or after ``max_sweeps`` sweeps. HOOI is
monotone: no sweep increases the error. Single-mode HOOI is the truncated SVD (no sweeps run).
Defaults ``max_sweeps=10`` (tensorly: 100) and ``tol=1e-4``, from a measurement (float32, ρ = 2): on the
14 projected conv gradients of the vision UNet (``coap_lab/models/unet.py``, 64–256 channels) HOOI met
``tol`` after 0–2 sweeps, with the same error as after 100 sweeps to 4 digits (e.g. init 0.0404, then 0.0402
for both); on an i.i.d. Gaussian 64×64×3×3 tensor (no structure, the worst case) it took 6 sweeps (ρ = 2,
error 0.5559 vs 0.5557 after 100) or hit the cap (ρ = 4, 0.7316 vs 0.7314). 10 sweeps bound the cost
(one sweep of a 256×256×3×3 gradient: 55 ms on 2 CPU cores) at a loss below 0.05 % of the error.
Signs: each column is flipped so its largest-magnitude entry is positive (tensorly's ``svd_flip``
rule), which makes the init deterministic.

**Recalibration** (``k ≡ 0 mod T_u·λ``, the analogue of the matrix low-cost SVD): one HOOI sweep
warm-started from the current factors (deliberate difference: the official code recomputes a cold
HOOI from SVD init every time). The new basis of each span is then rotated to the one closest to the
old factor (orthogonal Procrustes: ``Uₙ ← Uₙ R``, ``R = A Bᵀ`` from ``Uₙᵀ Uₙᵒˡᵈ = A Σ Bᵀ``; the span, hence
the projection error, is unchanged), so moments reused in the new basis (``restore_state=False``)
keep their meaning as far as the subspace allows. Measured on the UNet's 12 two-mode conv gradients
(HOOI at step 0, recalibration with the gradient 5 AdamW steps later, ρ = 2), the change of the
back-projected stale moment ``‖M ×U_new − M ×U_old‖ / ‖M ×U_old‖`` (median): 1.41 for a cold HOOI
(official) and for a warm sweep with ``svd_flip`` signs, 1.38 with signs aligned to the old columns,
**0.73 with Procrustes**, against 0.59 for the best possible (``restore_state``, exact mapping onto
the new span). (1.41 ≈ √2: uncorrelated coordinates, since singular vectors with close singular
values rotate freely between refreshes.)

**Correlation step** (``k ≡ 0 mod T_u`` otherwise), with the core-shaped first moment ``M`` (before
this step's update)::

    Ĝ = (G ×₀ U0ᵀ ×₁ U1ᵀ) ×₀ U0 ×₁ U1,   M̂ = M ×₀ U0 ×₁ U1
    L = mean((Ĝ − G)²) · (1 − c̄),        c̄ = mean_{o,h,w} cos(M̂[o,:,h,w], G[o,:,h,w])   (C_in axis)
    ∇ₙ = ∂L/∂Uₙ  (all at the old factors),   ∇ₙ ← ∇ₙ·min(1, 1/(‖∇ₙ‖ + 1e-6)),   Uₙ ← Uₙ − 0.1·∇ₙ

The gradient is computed in closed form (no autograd, no host sync; tested against autograd). With
``P_m = U_m U_mᵀ``, ``H = G ×_{m≠n} P_m``, ``W = 2(Ĝ − G)/numel``, ``B = M ×_{m≠n} U_m`` and
``D = ∂c̄/∂M̂`` (per fibre ``x = M̂[o,:,h,w]``, ``ŷ = y/max(‖y‖, ε)``:
``(ŷ − [‖x‖ > ε]·cos·x/max(‖x‖, ε)) / max(‖x‖, ε)`` over the fibre count, ε = 1e-8, torch's
``cosine_similarity`` semantics)::

    ∂mse/∂Uₙ = (W₍ₙ₎ H₍ₙ₎ᵀ + H₍ₙ₎ W₍ₙ₎ᵀ) Uₙ,     ∂c̄/∂Uₙ = D₍ₙ₎ B₍ₙ₎ᵀ
    ∇ₙ = (1 − c̄)·∂mse/∂Uₙ − mse·∂c̄/∂Uₙ

Deliberate difference (official bug, spec §10/§12): the official factor ``.grad`` is never zeroed, so
each correlation step used the sum of all gradients since the last recalibration; here every step
uses only its own gradient (a pure function of its inputs).

**restore_state** (as spec §6 with the Tucker transforms): first moments
``M ← (M ×₀ U0ᵒˡᵈ ×₁ U1ᵒˡᵈ) ×₀ U0ⁿᵉʷᵀ ×₁ U1ⁿᵉʷᵀ``; second moments the same on ``√V``, squared again.

All work is float32 (float64 for float64 gradients); the factors are stored in that dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .base import RefreshKind
from .coap import CORRELATION_LR, CORRELATION_MAX_NORM, COSINE_EPS, REPROJECT_FACTOR, UPDATE_INTERVAL
from .linalg import check_positive_int, work_dtype

__all__ = [
    "HOOI_MAX_SWEEPS",
    "HOOI_TOL",
    "MIN_CONV_NUMEL",
    "HooiResult",
    "TuckerPolicy",
    "core_shape",
    "hooi",
    "hooi_sweep",
    "is_tucker_candidate",
    "mode_dot",
    "restore_tucker_moments",
    "tucker_correlation_gradients",
    "tucker_correlation_step",
    "tucker_project",
    "tucker_project_back",
    "tucker_ranks",
    "tucker_relative_error",
    "unfold",
]

#: 4-D weights with at most this many elements are not projected (the official ``MIN_CNN_PARAMS``).
MIN_CONV_NUMEL = 32 * 32 * 3 * 3
HOOI_MAX_SWEEPS = 10
HOOI_TOL = 1e-4


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"Tucker projection needs a 4-D shape (C_out, C_in, kh, kw), got {shape}")
    return shape  # type: ignore[return-value]


def is_tucker_candidate(shape: Sequence[int]) -> bool:
    """True for a 4-D shape with more than :data:`MIN_CONV_NUMEL` elements (the official threshold)."""
    return len(shape) == 4 and math.prod(int(s) for s in shape) > MIN_CONV_NUMEL


def tucker_ranks(shape: Sequence[int], ratio: float) -> tuple[int, ...]:
    """Ranks for ``shape`` from ``conv_rank_ratio`` (module docstring): 1 mode if ``kw == 1``, else 2."""
    c_out, c_in, _, kw = _check_shape(shape)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 0:
        raise ValueError(f"conv_rank_ratio must be a positive number, got {ratio!r}")
    if kw == 1:
        return (min(c_out, max(1, int(c_out // ratio))),)
    root = math.sqrt(ratio)
    return (min(c_out, max(1, int(c_out // root))), min(c_in, max(1, int(c_in // root))))


def core_shape(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Shape of the projected gradient (and of the moments): ranks replace the first ``len(ranks)`` dims."""
    shape = _check_shape(shape)
    if not 1 <= len(ranks) <= 2 or any(not 1 <= r <= c for r, c in zip(ranks, shape)):
        raise ValueError(f"ranks must be 1 or 2 values in [1, dim] for shape {shape}, got {tuple(ranks)}")
    return (*(int(r) for r in ranks), *shape[len(ranks) :])


def unfold(t: Tensor, mode: int) -> Tensor:
    """The mode-``mode`` unfolding ``T₍ₙ₎``: ``dim_n × (product of the other dims)``, C order."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def mode_dot(t: Tensor, u: Tensor, mode: int, *, transpose: bool = False) -> Tensor:
    """``T ×ₙ U`` (``U``: J×dim_n), or ``T ×ₙ Uᵀ`` with ``transpose=True`` (``U``: dim_n×J)."""
    return torch.tensordot(t, u, dims=([mode], [0 if transpose else 1])).movedim(-1, mode)


def tucker_project(g: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``G ×₀ U0ᵀ ×₁ U1ᵀ`` (or ``G ×₀ U0ᵀ``) in the factors' dtype."""
    out = g.to(factors[0].dtype)
    for mode, u in enumerate(factors):
        out = mode_dot(out, u, mode, transpose=True)
    return out


def tucker_project_back(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``X ×₀ U0 ×₁ U1`` (or ``X ×₀ U0``) in the factors' dtype; no ``scale``."""
    out = x.to(factors[0].dtype)
    for mode, u in enumerate(factors):
        out = mode_dot(out, u, mode)
    return out


def tucker_relative_error(g: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``‖G − back(project(G))‖ / ‖G‖`` as a 0-d tensor (0 for ``G = 0``)."""
    a = g.to(factors[0].dtype)
    norm = a.norm()
    diff = (tucker_project_back(tucker_project(a, factors), factors) - a).norm()
    return torch.where(norm > 0, diff / norm.clamp(min=torch.finfo(a.dtype).tiny), torch.zeros_like(norm))


def _leading_left(a: Tensor, r: int) -> Tensor:
    """Top-``r`` left singular vectors of ``a`` (full U when ``r`` exceeds the thin SVD's width)."""
    full = r > min(a.shape)
    return torch.linalg.svd(a, full_matrices=full).U[:, :r]


def _flip_largest_positive(u: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive (tensorly's ``svd_flip``)."""
    idx = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(u.gather(0, idx))
    return u * torch.where(signs == 0, torch.ones_like(signs), signs)


def _procrustes_align(new: Tensor, old: Tensor) -> Tensor:
    """The orthonormal basis of ``span(new)`` closest to ``old`` in Frobenius norm: ``new · A Bᵀ``."""
    a, _, bh = torch.linalg.svd(new.t() @ old.to(new.dtype))
    return new @ (a @ bh)


def _sweep(a: Tensor, factors: list[Tensor]) -> list[Tensor]:
    """One HOOI sweep over the modes in order, each mode seeing the latest factors of the others."""
    factors = list(factors)
    for n in range(len(factors)):
        y = a
        for m, u in enumerate(factors):
            if m != n:
                y = mode_dot(y, u, m, transpose=True)
        factors[n] = _leading_left(unfold(y, n), factors[n].shape[1])
    return factors


class HooiResult(NamedTuple):
    """``factors`` (one per projected mode) and ``errors``: the relative error after the SVD init and
    after each sweep (Python floats, non-increasing)."""

    factors: list[Tensor]
    errors: list[float]


def hooi(
    g: Tensor, ranks: Sequence[int], *, max_sweeps: int = HOOI_MAX_SWEEPS, tol: float = HOOI_TOL
) -> HooiResult:
    """Partial Tucker (modes ``0..len(ranks)-1``) by HOOI with SVD init (module docstring)."""
    core_shape(g.shape, ranks)  # validates
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 0:
        raise ValueError(f"max_sweeps must be an int >= 0, got {max_sweeps!r}")
    a = g.to(work_dtype(g))
    factors = [_leading_left(unfold(a, n), int(r)) for n, r in enumerate(ranks)]
    errors = [float(tucker_relative_error(a, factors))]
    if len(ranks) > 1:
        for _ in range(max_sweeps):
            factors = _sweep(a, factors)
            errors.append(float(tucker_relative_error(a, factors)))
            if abs(errors[-2] - errors[-1]) < tol:
                break
    return HooiResult([_flip_largest_positive(u).contiguous() for u in factors], errors)


def hooi_sweep(g: Tensor, factors: Sequence[Tensor]) -> list[Tensor]:
    """The low-cost recalibration: one HOOI sweep from ``factors``, each new basis Procrustes-aligned
    to the old one (module docstring)."""
    dtype = factors[0].dtype
    new = _sweep(g.to(dtype), [u.to(dtype) for u in factors])
    return [_procrustes_align(u, old).contiguous() for u, old in zip(new, factors)]


def _cosine_grad(m_hat: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``(c̄, ∂c̄/∂M̂)`` for the fibre-wise cosine along dim 1 (torch's eps semantics)."""
    eps = COSINE_EPS
    nx_raw = m_hat.norm(dim=1, keepdim=True)
    nx = nx_raw.clamp(min=eps)
    y_hat = a / a.norm(dim=1, keepdim=True).clamp(min=eps)
    cos = (m_hat / nx * y_hat).sum(dim=1, keepdim=True)
    radial = torch.where(nx_raw > eps, cos / nx, torch.zeros_like(cos))
    return cos.mean(), (y_hat - radial * m_hat) / (nx * cos.numel())


def tucker_correlation_gradients(
    factors: Sequence[Tensor], g: Tensor, first_moment: Tensor
) -> tuple[list[Tensor], Tensor]:
    """``([∂L/∂Uₙ], L)`` in closed form (module docstring), at the given factors, in their dtype."""
    dtype = factors[0].dtype
    us = [u.detach() for u in factors]
    a, m = g.detach().to(dtype), first_moment.detach().to(dtype)
    err = tucker_project_back(tucker_project(a, us), us) - a
    mse = err.square().mean()
    cbar, d_cos = _cosine_grad(tucker_project_back(m, us), a)
    w = err * (2.0 / err.numel())
    grads = []
    for n, u in enumerate(us):
        h, b = a, m
        for j, uj in enumerate(us):
            if j != n:
                h = mode_dot(mode_dot(h, uj, j, transpose=True), uj, j)
                b = mode_dot(b, uj, j)
        wn, hn = unfold(w, n), unfold(h, n)
        d_mse = wn @ (hn.t() @ u) + hn @ (wn.t() @ u)
        grads.append((1 - cbar) * d_mse - mse * (unfold(d_cos, n) @ unfold(b, n).t()))
    return grads, mse * (1 - cbar)


def tucker_correlation_step(
    factors: Sequence[Tensor],
    g: Tensor,
    first_moment: Tensor,
    *,
    lr: float = CORRELATION_LR,
    max_norm: float = CORRELATION_MAX_NORM,
) -> list[Tensor]:
    """One correlation-aware step; returns new factors (inputs untouched, no ``.grad`` anywhere)."""
    grads, _ = tucker_correlation_gradients(factors, g, first_moment)
    out = []
    for u, d in zip(factors, grads):
        coef = (max_norm / (d.norm() + 1e-6)).clamp(max=1.0)  # clip_grad_norm_, per factor
        out.append(u.detach() - lr * (d * coef))
    return out


def restore_tucker_moments(
    old: Sequence[Tensor], new: Sequence[Tensor], first: Sequence[Tensor] = (), second: Sequence[Tensor] = ()
) -> None:
    """Map core-shaped moments from the factors ``old`` to ``new``, in place (module docstring)."""
    for m in first:
        m.copy_(tucker_project(tucker_project_back(m, old), new).to(m.dtype))
    for v in second:
        v.copy_(tucker_project(tucker_project_back(v.sqrt(), old), new).square().to(v.dtype))


def _factors(state: dict[str, Tensor]) -> list[Tensor]:
    return [state[k] for k in ("proj0", "proj1") if k in state]


class TuckerPolicy:
    """COAP for 4-D weights: the :class:`~coap_compile.projection.base.ProjectionPolicy` interface on
    full 4-D gradients (no canonical transpose). State: ``{"proj0": U0, "proj1": U1}`` (``proj1``
    absent for single-mode kernels), tensors only, refreshed in place with ``copy_``.

    Schedule (``k`` = completed steps) identical to :class:`~coap_compile.projection.coap.CoapPolicy`:
    ``"init"`` at ``k = 0`` (HOOI), ``"svd"`` at ``k ≡ 0 (mod T_u·λ)`` (one warm HOOI sweep),
    ``"correlation"`` at other ``k ≡ 0 (mod T_u)``.

    Args:
        update_interval: ``T_u``; reproject_factor: ``λ``.
        restore_state: read by the optimizer, which maps its moments with :func:`restore_tucker_moments`.
        max_sweeps, tol: HOOI bounds of the init.
    """

    name: ClassVar[str] = "tucker"
    needs_first_moment: ClassVar[bool] = True

    def __init__(
        self,
        update_interval: int = UPDATE_INTERVAL,
        reproject_factor: int = REPROJECT_FACTOR,
        restore_state: bool = False,
        max_sweeps: int = HOOI_MAX_SWEEPS,
        tol: float = HOOI_TOL,
    ) -> None:
        self.update_interval = check_positive_int("update_interval", update_interval)
        self.reproject_factor = check_positive_int("reproject_factor", reproject_factor)
        self.restore_state = bool(restore_state)
        if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 0:
            raise ValueError(f"max_sweeps must be an int >= 0, got {max_sweeps!r}")
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        self.max_sweeps, self.tol = max_sweeps, float(tol)

    def __repr__(self) -> str:
        return (
            f"TuckerPolicy(update_interval={self.update_interval}, reproject_factor={self.reproject_factor}, "
            f"restore_state={self.restore_state}, max_sweeps={self.max_sweeps}, tol={self.tol})"
        )

    def init_state(self, g: Tensor, ranks: Sequence[int]) -> dict[str, Tensor]:
        factors = hooi(g, ranks, max_sweeps=self.max_sweeps, tol=self.tol).factors
        return {f"proj{i}": u for i, u in enumerate(factors)}

    def refresh_kind(self, k: int) -> RefreshKind:
        if k == 0:
            return "init"
        if k % self.update_interval != 0:
            return ""
        return "svd" if k % (self.update_interval * self.reproject_factor) == 0 else "correlation"

    def refresh(
        self,
        state: dict[str, Tensor],
        g: Tensor,
        k: int,
        *,
        first_moment: Tensor | None,
        transposed: bool = False,
    ) -> bool:
        """Apply the refresh scheduled at ``k`` in place; True if the factors changed."""
        if transposed:
            raise ValueError("TuckerPolicy works on the 4-D gradient as is; got transposed=True")
        kind = self.refresh_kind(k)
        factors = _factors(state)
        if kind == "":
            return False
        if kind == "init":
            new = self.init_state(g, [u.shape[1] for u in factors])
            new_factors = [new[f"proj{i}"] for i in range(len(factors))]
        elif kind == "svd":
            new_factors = hooi_sweep(g, factors)
        else:
            if first_moment is None:
                raise ValueError(
                    f"the Tucker correlation step at k={k} needs the core-shaped first moment, "
                    "got first_moment=None"
                )
            new_factors = tucker_correlation_step(factors, g, first_moment)
        for u, v in zip(factors, new_factors):
            u.copy_(v)
        return True

    def project(self, state: dict[str, Tensor], g: Tensor) -> Tensor:
        """The core ``G ×₀ U0ᵀ ×₁ U1ᵀ`` in the factors' dtype."""
        return tucker_project(g, _factors(state))

    def project_back(self, state: dict[str, Tensor], d: Tensor) -> Tensor:
        """``D ×₀ U0 ×₁ U1`` in the factors' dtype (no ``scale``)."""
        return tucker_project_back(d, _factors(state))

    def state_layout(
        self, shape: Sequence[int], ranks: Sequence[int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the factors :meth:`init_state` creates (no allocation)."""
        shape = _check_shape(shape)
        core_shape(shape, ranks)
        return {f"proj{i}": ((shape[i], int(r)), dtype) for i, r in enumerate(ranks)}
