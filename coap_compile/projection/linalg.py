"""Small dense linear algebra shared by the projection policies.

All routines take the gradient in the canonical orientation ``X ∈ ℝ^{M×N}`` (``M ≥ N``, see
:mod:`coap_compile.projection.base`) and return a basis ``P ∈ ℝ^{N×r}``. They compute in float32, or in
float64 when ``X`` is float64 (the float64 path exists for the reference optimizers' tests). The global
RNG is never consumed: random draws come from private, seeded ``torch.Generator`` objects.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = [
    "OMEGA_SEED",
    "check_positive_int",
    "gaussian_basis",
    "orthogonal_basis",
    "top_right_singular_vectors",
    "work_dtype",
]

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
    _check_rank(x, rank)
    dtype = work_dtype(x)
    a = x.to(dtype)
    if omega is None:
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        omega = torch.randn(x.shape[1], rank, generator=gen, dtype=torch.float32, device=x.device)
    if omega.shape != (x.shape[1], rank):
        raise ValueError(f"omega must have shape {(x.shape[1], rank)}, got {tuple(omega.shape)}")
    y = a @ omega.to(dtype)
    q = torch.linalg.qr(y, mode="reduced").Q
    b = q.t() @ a
    vh = torch.linalg.svd(b, full_matrices=False).Vh
    return vh.t().contiguous()


def top_right_singular_vectors(x: Tensor, rank: int) -> Tensor:
    """The exact top-``rank`` right singular vectors of ``X`` as an ``N×r`` matrix (GaLore's projector).

    ``X = U Σ Vh`` (thin SVD, ``torch.linalg.svd(full_matrices=False)``), ``P = Vh[:r]ᵀ``.
    """
    _check_rank(x, rank)
    vh = torch.linalg.svd(x.to(work_dtype(x)), full_matrices=False).Vh
    return vh[:rank].t().contiguous()


def gaussian_basis(n: int, rank: int, seed: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A random ``N×r`` matrix with i.i.d. ``𝒩(0, 1/r)`` entries from a private generator seeded by ``seed``.

    With variance ``1/r``, ``E[P Pᵀ] = I_N``: projecting and projecting back is unbiased in expectation
    (Flora's argument), while ``E[Pᵀ P] = (N/r) I_r`` (the columns are *not* orthonormal).
    The draw is float32 and then cast, so float32 and float64 runs see the same matrix.
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    p = torch.randn(n, rank, generator=gen, dtype=torch.float32, device=device)
    return (p / rank**0.5).to(dtype)
