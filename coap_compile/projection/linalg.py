"""Small dense linear algebra shared by the projection policies.

All routines take the gradient in the canonical orientation ``X ∈ ℝ^{M×N}`` (``M ≥ N``, see
:mod:`coap_compile.projection.base`) and return a basis ``P ∈ ℝ^{N×r}``. They compute in float32, or in
float64 when ``X`` is float64 (the float64 path exists for the reference optimizers' tests). The global
RNG is never consumed: random draws come from private, seeded ``torch.Generator`` objects.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "OMEGA_SEED",
    "BASES",
    "align_rotation",
    "align_signs",
    "null_columns",
    "orient",
    "orthogonal_basis_sv",
    "overflow_scale",
    "overflow_scale_of",
    "top_right_singular_vectors_sv",
    "check_positive_int",
    "draw_omega",
    "drop_null",
    "gaussian_basis",
    "largest_principal_angle",
    "orthogonal_basis",
    "principal_angles",
    "restore_moments",
    "top_right_singular_vectors",
    "work_dtype",
]

#: Values of the ``basis`` option of the policies (``CoapSettings.basis``): how a refreshed basis is oriented
#: against the previous one (:func:`orient`). ``"official"`` leaves LAPACK's signs (the official code).
BASES = ("signs", "rotation", "official")

#: Seed of the random test matrix Ω of the first randomized SVD (the official code's constant).
OMEGA_SEED = 3407


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int > 0`` (bool excluded); else raise naming ``name`` and ``value``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int > 0, got {value!r} of type {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be an int > 0, got {name}={value!r}")
    return int(value)


def work_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (bf16/fp16 are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_rank(x: Tensor, rank: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(x.shape)}")
    if not 1 <= rank <= x.shape[1]:
        raise ValueError(
            f"rank must be in [1, {x.shape[1]}] for a matrix of shape {tuple(x.shape)}, got rank={rank}"
        )


def draw_omega(n: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """The initial test matrix: ``N×r`` standard normal float32 from a private generator seeded ``seed``.

    The same draw as :func:`orthogonal_basis` makes (on every rank of a sharded refresh).
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(n, rank, generator=gen, dtype=torch.float32, device=device)


def align_signs(p: Tensor, reference: Tensor) -> Tensor:
    """``P`` with each column ``j`` negated where ``⟨reference_j, P_j⟩ < 0`` (a new tensor).

    Makes the sign of a refreshed basis follow the previous ``P`` (or ``Ω``), so that results that
    differ only in the QR/SVD sign conventions agree.
    """
    if p.shape != reference.shape:
        raise ValueError(
            f"p and reference must have the same shape, got {tuple(p.shape)} and {tuple(reference.shape)}"
        )
    dots = (p * reference.to(p.dtype)).sum(0)
    return p * torch.where(dots < 0, -1.0, 1.0).to(p.dtype)


def align_rotation(p: Tensor, reference: Tensor) -> Tensor:
    """The orthonormal basis of ``span(p)`` closest to ``reference`` in Frobenius norm (a new tensor).

    ``p`` must have orthonormal columns (``N×r``). With ``U Σ Vᵀ = svd(pᵀ reference)`` the result is
    ``p U Vᵀ`` (orthogonal Procrustes). It is unchanged when ``p`` is replaced by ``p Q`` for any
    orthogonal ``Q`` (column signs, rotations inside repeated singular values), provided ``pᵀ reference``
    is nonsingular (no direction of the new subspace orthogonal to the reference).
    """
    if p.shape != reference.shape:
        raise ValueError(
            f"p and reference must have the same shape, got {tuple(p.shape)} and {tuple(reference.shape)}"
        )
    u, _, vh = torch.linalg.svd(p.mT @ reference.to(p.dtype))
    return (p @ (u @ vh)).contiguous()


def orient(p: Tensor, reference: Tensor, basis: str) -> Tensor:
    """``p`` oriented against ``reference`` by the rule ``basis`` (:data:`BASES`): ``"signs"``
    (:func:`align_signs`), ``"rotation"`` (:func:`align_rotation`), ``"official"`` (``p`` unchanged).

    A reference of another rank (a rank change) is cut or zero-padded to ``p``'s columns: a new
    direction with no old counterpart keeps its sign (signs) or is the Procrustes completion (rotation).
    Null columns of ``p`` (all zero, :func:`null_columns`) stay zero.
    """
    if basis == "official":
        return p
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    ref = reference.to(p.dtype)
    if ref.shape[1] != p.shape[1]:
        r = p.shape[1]
        pad = ref.new_zeros(ref.shape[0], max(r - ref.shape[1], 0))
        ref = ref[:, :r] if ref.shape[1] > r else torch.cat([ref, pad], 1)
    if basis == "signs":
        return align_signs(p, ref).contiguous()
    live = p.abs().amax(0) > 0
    if bool(live.all()):
        return align_rotation(p, ref)
    out = torch.zeros_like(p)
    out[:, live] = align_rotation(p[:, live], ref[:, live])
    return out


#: ``c`` of the null-direction threshold ``σᵢ ≤ c·ε·σ₁·max(M, N)`` (:func:`null_columns`).
NULL_FACTOR = 1.0


def null_columns(sv: Tensor, shape: tuple[int, int]) -> Tensor:
    """Boolean mask of the basis directions whose singular value is numerically zero:
    ``σᵢ ≤ c·ε·σ₁·max(M, N)`` (``ε`` the working dtype's machine epsilon, ``c`` = :data:`NULL_FACTOR`).

    That bound is the backward error of the SVD of an ``M×N`` matrix in floating point (Golub–Van Loan
    §8.6: computed ``σᵢ`` are exact for a matrix within ``≈ ε·‖X‖₂·max(M, N)``), so a direction below it
    is rounding noise: it carries no signal, and Adam would divide that noise by its own square root and
    move the weight a full learning-rate step along it (issue 19: 19.5 % of the first update outside
    the gradient's row space at batch 8, rank 64). A zero gradient (``σ₁ = 0``) has every direction null.
    """
    eps = torch.finfo(sv.dtype).eps
    top = sv.amax() if sv.numel() else sv.new_zeros(())
    return (sv <= NULL_FACTOR * eps * max(int(shape[0]), int(shape[1])) * top) & (top > 0)


#: ``X`` is rescaled by a power of two before products that can overflow when ``max|X|·√(M·N)`` exceeds this
#: (``‖X‖²_F`` and ``(X P)ᵀ(X P)`` stay below ``finfo.max / 2¹⁶``). Below it nothing is rescaled, so the
#: arithmetic (and every recorded trajectory) is unchanged for training-scale gradients.
def overflow_scale(x: Tensor, limit: float | None = None) -> float:
    """A power of two ``s`` such that ``X / s`` is safe for the Gram products of the refreshes, or 1.0.

    Exact: dividing by a power of two changes no mantissa (barring subnormals), so ``X / s`` is ``X``'s
    values at another exponent; the callers undo ``s`` where the result is not scale-invariant. ``limit``
    replaces the bound on ``max|X|·√(M·N)`` (the normalized correlation step forms ``HᵀH ∝ ‖X‖⁸``-sized
    products and uses ``2¹⁶``).
    """
    if x.numel() == 0:
        return 1.0
    return overflow_scale_of(float(x.detach().abs().amax()), x.numel(), work_dtype(x), limit)


def overflow_scale_of(amax: float, numel: int, dtype: torch.dtype, limit: float | None = None) -> float:
    """:func:`overflow_scale` from ``max|X|`` and the element count (a row-sharded ``X``'s all-reduced
    maximum and its global size, :mod:`coap_compile.distributed.correlation`); ``dtype`` the working dtype."""
    if limit is None:
        limit = math.sqrt(torch.finfo(dtype).max) / 2.0**8
    amax = amax * math.sqrt(numel)
    if not math.isfinite(amax) or amax <= limit:
        return 1.0
    return 2.0 ** math.ceil(math.log2(amax / limit))


def drop_null(p: Tensor, sv: Tensor | None, shape) -> Tensor:
    """``P`` with the columns :func:`null_columns` finds in ``sv`` set to zero (``sv`` None: ``P``).

    A zero column gives ``X̃ = X P`` a zero column: its moments stay zero and the update has no component
    along it (the effective rank is the number of nonzero columns; the memory stays planned at ``r``).
    The next SVD refresh recomputes every column from the gradient then, so the rank regrows.
    """
    if sv is None:
        return p
    mask = null_columns(sv, shape)
    if not bool(mask.any()):
        return p
    out = p.clone()
    out[:, mask] = 0
    return out


def orthogonal_basis(x: Tensor, rank: int, omega: Tensor | None = None, seed: int = OMEGA_SEED) -> Tensor:
    """Randomized range finder followed by a small SVD ("low-cost SVD", spec §3).

    With ``X ∈ ℝ^{M×N}`` and a test matrix ``Ω ∈ ℝ^{N×r}``::

        Y = X Ω            (M×r)
        Q = qr(Y).Q        (M×r, reduced QR)
        B = Qᵀ X           (r×N)
        U Σ Vh = svd(B)    (thin)
        P = Vhᵀ            (N×r, orthonormal columns)

    ``P`` spans the top-r right singular subspace of ``X`` restricted to the sampled range. When ``omega``
    is None, ``Ω`` is a standard normal ``N×r`` float32 draw from a private generator on ``x.device``
    seeded with ``seed`` (so every call with the same shape/device gets the same Ω, and the global RNG
    is untouched). Passing the previous ``P`` as ``omega`` gives the official recalibration, one block
    power iteration with a Rayleigh–Ritz step.

    Differences from the official ``compute_orthogonal``: the result is returned as ``N×r`` (the
    transpose of the official right-side ``r×N`` ``Vh``; identical to the official left-side ``P``), it
    stays float32/float64 instead of being cast to the gradient dtype, and no ``fork_rng`` is needed
    because the private generator never touches global state. No oversampling, no power iterations and
    no sign normalisation, exactly like the official code.
    """
    return orthogonal_basis_sv(x, rank, omega=omega, seed=seed)[0]


def orthogonal_basis_sv(
    x: Tensor, rank: int, omega: Tensor | None = None, seed: int = OMEGA_SEED
) -> tuple[Tensor, Tensor]:
    """:func:`orthogonal_basis` and the singular values ``Σ`` of ``B`` (descending, ``P``'s column order;
    they approximate ``X``'s top singular values, and decide the null directions, :func:`null_columns`).

    An ``X`` whose Gram products could overflow is divided by :func:`overflow_scale` first (``P`` is
    invariant to the scale of ``X``; ``Σ`` is scaled back).
    """
    _check_rank(x, rank)
    dtype = work_dtype(x)
    a = x.to(dtype)
    s = overflow_scale(a)
    if s != 1.0:
        a = a / s
    if omega is None:
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        omega = torch.randn(x.shape[1], rank, generator=gen, dtype=torch.float32, device=x.device)
    if omega.shape != (x.shape[1], rank):
        raise ValueError(f"omega must have shape {(x.shape[1], rank)}, got {tuple(omega.shape)}")
    y = a @ omega.to(dtype)
    q = torch.linalg.qr(y, mode="reduced").Q
    b = q.t() @ a
    _, sv, vh = torch.linalg.svd(b, full_matrices=False)
    return vh.t().contiguous(), sv * s


def top_right_singular_vectors(x: Tensor, rank: int) -> Tensor:
    """The exact top-``rank`` right singular vectors of ``X`` as an ``N×r`` matrix (GaLore's projector).

    ``X = U Σ Vh`` (thin SVD, ``torch.linalg.svd(full_matrices=False)``), ``P = Vh[:r]ᵀ``.
    """
    return top_right_singular_vectors_sv(x, rank)[0]


def top_right_singular_vectors_sv(x: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """:func:`top_right_singular_vectors` and the top-``rank`` singular values (overflow-safe like
    :func:`orthogonal_basis_sv`)."""
    _check_rank(x, rank)
    a = x.to(work_dtype(x))
    s = overflow_scale(a)
    _, sv, vh = torch.linalg.svd(a / s if s != 1.0 else a, full_matrices=False)
    return vh[:rank].t().contiguous(), sv[:rank] * s


def gaussian_basis(n: int, rank: int, seed: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A random ``N×r`` matrix with i.i.d. ``𝒩(0, 1/r)`` entries from a private generator seeded by ``seed``.

    With variance ``1/r``, ``E[P Pᵀ] = I_N``: projecting and projecting back is unbiased in expectation
    (Flora's argument), while ``E[Pᵀ P] = (N/r) I_r`` (the columns are *not* orthonormal).
    The draw is float32 and then cast, so float32 and float64 runs see the same matrix.
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    p = torch.randn(n, rank, generator=gen, dtype=torch.float32, device=device)
    return (p / rank**0.5).to(dtype)


def principal_angles(p_old: Tensor, p_new: Tensor) -> Tensor:
    """The principal angles (radians, float64, descending, in ``[0, π/2]``) between ``span(p_old)`` and
    ``span(p_new)``.

    Both are ``N×r`` with ``r ≤ N`` and full column rank; they need not be orthonormal (each is
    orthonormalised by a reduced QR first, in float64). With ``Q₁, Q₂`` the orthonormal bases, the cosines of
    the principal angles are the singular values of ``Q₁ᵀ Q₂`` and their sines those of ``Q₂ − Q₁ Q₁ᵀ Q₂``
    (Björck–Golub); pairing the sines in descending with the cosines in ascending order,
    ``θ_i = atan2(sin_i, cos_i)`` is accurate at every angle (``acos`` of a cosine near 1 loses half the
    digits, ``asin`` of a sine near 1 likewise). A rotation of a basis within its span reads 0.
    """
    if p_old.ndim != 2 or p_old.shape != p_new.shape or p_old.shape[1] > p_old.shape[0]:
        raise ValueError(
            f"expected two N×r matrices with r ≤ N of the same shape, got {tuple(p_old.shape)} and "
            f"{tuple(p_new.shape)}"
        )
    q1 = torch.linalg.qr(p_old.detach().to(torch.float64)).Q
    q2 = torch.linalg.qr(p_new.detach().to(torch.float64)).Q
    c = q1.t() @ q2
    cos = torch.linalg.svdvals(c).flip(0)  # ascending
    sin = torch.linalg.svdvals(q2 - q1 @ c)  # descending
    return torch.atan2(sin, cos)


def largest_principal_angle(p_old: Tensor, p_new: Tensor) -> float:
    """The largest of :func:`principal_angles` (radians): how far a refresh moves the subspace at worst.

    For two column subsets of one orthonormal basis it is ``π/2`` as soon as one column differs.
    """
    return float(principal_angles(p_old, p_new)[0])


def restore_moments(
    old_p: Tensor, new_p: Tensor, first: Sequence[Tensor] = (), second: Sequence[Tensor] = ()
) -> None:
    """Map low-rank moments from the basis ``old_p`` to ``new_p``, in place (spec §6, canonical form).

    First moments: ``M ← (M P_oldᵀ) P_new``. Second moments: ``V ← ((√V P_oldᵀ) P_new)²`` (the
    element-wise square root is mapped and squared again, so ``V`` stays non-negative).
    """
    for m in first:
        m.copy_((m @ old_p.t().to(m.dtype)) @ new_p.to(m.dtype))
    for v in second:
        v.copy_(((v.sqrt() @ old_p.t().to(v.dtype)) @ new_p.to(v.dtype)).square())
