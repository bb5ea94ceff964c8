"""COAP's refresh linear algebra for a weight whose ``M×N`` view ``X`` is sharded by rows.

Layout: rank ``k`` of a process group of size ``W`` holds ``X_k`` (``M_k×N``, ``Σ M_k = M``, any
``M_k ≥ 0``: FSDP2's ``torch.chunk`` shards can be empty); ``P`` (``N×r``) is replicated. The sharded
dimension ``M`` is the one ``X P`` does *not* sum over, so ``Y = X P`` and every ``M×r`` moment stay
local; refreshes communicate only ``r×r``, ``r×N``/``N×r`` and vector/scalar sums (table and closed
forms in :mod:`coap_compile.distributed.comm`). With no process group every function is its
single-process counterpart.

Low-cost SVD (:func:`orthogonal_basis`)::

    Y_k = X_k Ω                         local (Ω = P for the recalibration, seeded 𝒩(0,1) at init)
    Q_k = CholeskyQR2(Y)_k              two r×r Gram all-reduces
    B   = Σ_k Q_kᵀ X_k                  one r×N all-reduce
    P'  = svd(B).Vhᵀ                    replicated: every rank factors the same bits

**CholeskyQR2 and its fallback** (decided by measurement, ``M=512``, ``r=32``, float32, ``Y`` with
singular values log-spaced over ``κ``; orthogonality ``‖QᵀQ−I‖_F``): CholeskyQR2 matches Householder QR
(≈1e-6) up to ``κ = 1e4``; from ``κ ≈ 3e4`` the first Cholesky breaks down. Shifted CholeskyQR3
reaches ``κ = 1e5`` but fails at ``1e6`` and on rank-deficient ``Y``, which is common here (a batch with
fewer tokens than ``r`` gives a gradient of rank < r; DCP's ``_init_optim_state`` steps on zero
gradients). Worse, on a rank-deficient ``Y`` perturbed at rounding level (400 random cases, κ log-uniform
in [3e2, 1e9]) the first Cholesky *succeeded* in 76 cases and 17 of them returned a ``Q`` with
orthogonality error up to 0.88, silently. Every such case had ``‖Q₁ᵀQ₁ − I‖_F ≥ 1`` after pass 1,
and every case with ``≤ 0.5`` ended at ≤ 1.1e-6. Rule: pass 2 runs only if the first Cholesky succeeds
and ``‖G₂ − I‖_F ≤ 1/2`` (then ``κ(Q₁) ≤ √3`` and pass 2 is a Cholesky QR of a well-conditioned
matrix); otherwise **TSQR** from ``Y``: local Householder QR ``Y_k = Q̂_k R_k``, all-gather of the
``r×r`` ``R_k`` (zero-padded when ``M_k < r``), Householder QR of the stacked ``Wr×r`` matrix (identical
on every rank), ``Q_k = Q̂_k · (its k-th block)``. TSQR matched Householder (≤1.2e-6) at every κ up to
1e8 and on rank-deficient and zero ``Y``. The branch depends only on all-reduced (bit-identical) values,
so every rank takes the same path (a divergent path would deadlock the collectives).

**Bit-identity across ranks** (measured, gloo, 2/3/4 ranks, float32 tensors of 1 to 4·10⁶ elements):
``all_reduce`` returned bit-identical results on every rank in every case (not the rank-order sum
for W ≥ 3; the reduction order is gloo's). So ``B``, the Gram matrices and the correlation gradient are
identical everywhere, and so is ``P'`` computed from them by the same deterministic kernels. For
backends or devices where that is not established, ``src=`` broadcasts ``P'`` from one rank
(``N·r`` more bytes); :func:`assert_replicated` checks a tensor.

**Signs.** CholeskyQR (and TSQR's final step) return ``R`` with a positive diagonal, Householder QR
does not, so ``Q = Q_hh·S`` (``S`` a diagonal of ±1) and ``B = S·B_hh``: the same singular values and
the same right singular *subspaces*, but LAPACK may return singular vectors with other signs. ``P'``
therefore equals the single-process ``orthogonal_basis`` up to column signs (and rotations inside
repeated singular values). Since COAP keeps its moments across a refresh (``restore_state=False``), a
flipped column reverses the momentum of that direction. Two conventions remove the ambiguity, applied
to the result on both paths (single-process and distributed) so that they agree:
:func:`align_signs` flips ``P'``'s columns to point along a reference (the previous ``P``, or ``Ω``);
:func:`align_rotation` picks, among all orthonormal bases of ``span P'``, the one closest to the
reference (orthogonal Procrustes, ``P' · polar(P'ᵀ P_ref)``), which depends on the subspace only (not on
QR/SVD sign or rotation conventions, not on the device's LAPACK) and keeps the moments' coordinates as
continuous as the subspace allows. Measured on the DDP test's tiny LM (r=4, 9 SVD refreshes): the raw
new basis had ``⟨p_j, p'_j⟩ < 0`` in 22 of 36 columns; ``‖P' − P‖_F`` was 2.3–3.4 raw, 2.1–2.6 after
:func:`align_signs` and 1.1–1.5 after :func:`align_rotation` (the part due to the subspace moving).

**Which side for ``Shard(0)`` parameters** (FSDP2 shards dim 0 of the ``m×n`` weight, ``m`` rows):
``X`` must have the sharded ``m`` as its rows, so ``X = G`` whatever the aspect ratio. The correlation
step's cosine runs along dim 1 of the original weight, i.e. along the rows of ``X = G``: pass
``transposed=False`` in both cases (each cosine is local; only ``Σ cos`` is summed).

* tall or square (``m ≥ n``): ``X = G`` is the canonical side; ``P`` is ``n×r`` on the smaller side.
* wide (``m < n``): ``X = G`` is **not** the canonical side: ``P`` is ``n×r`` on the *larger* side
  and the moments are ``m×r``. Per rank (Adam, float32): ``4·(n r + 2⌈m/W⌉ r)`` bytes instead of the
  canonical ``4·(m r + 2 n r)`` on one device; it is also a different optimizer (the projection acts
  on the other side), so a single-process reference must use the same side. Example ``m=4096,
  n=11008, r=512, W=8`` (a LLaMA-7B down-projection): 24.6 MB per rank (P alone 22.5 MB), against
  53.5 MB for the canonical side on one device and 45.1 MB for torch AdamW's sharded states.
* In both cases ``P`` is replicated: per-rank state is ``4·(n r + 2⌈m/W⌉ r)`` against torch AdamW's
  ``4·2⌈m/W⌉ n``, so COAP saves memory only while ``W < 2m(n − r)/(n r) ≈ 2m/r`` (14 for a
  4096×4096 weight at r=512). Beyond that, ``P`` itself must be sharded and all-gathered at use (an
  ``N×r`` all-gather per step, FSDP-style): :mod:`coap_compile.distributed.basis`, the default.

The canonical side of a wide weight instead contracts over the sharded dimension (``X = Gᵀ``, ``n×m``,
sharded by columns ``m``, ``P`` row-sharded with ``X``'s columns): ``Y = Σ_k X_{:,k} P_k`` is a sum over
ranks **every step** (reduce-scatter of ``n×r`` to row-shard the moments, then an all-gather of the
``n×r`` update ``D`` for the local ``D P_kᵀ``), i.e. ``2nr`` elements per step (25 % of the gradient's
reduce-scatter volume at ``r/m = 1/8``), plus, per refresh: ``QR`` of the reduced ``Y``; ``B_k = QᵀX_{:,k}``
is local but column-sharded, so the SVD needs ``B Bᵀ`` (r×r all-reduce, eigendecomposition, then
``V_k = B_kᵀ U Σ⁻¹`` local); the correlation step's ``X P Pᵀ`` needs ``Y`` complete. That is why the
row layout (``X = G``) is used for ``Shard(0)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..projection.linalg import (  # the basis conventions live with the single-process linear algebra
    OMEGA_SEED,
    align_rotation,
    align_signs,
    check_positive_int,
    draw_omega,
    work_dtype,
)
from .comm import CommLog, all_gather, all_reduce, broadcast, group_rank, group_size
from .correlation import (
    correlation_loss_and_grad,
    correlation_step,
    normalized_correlation_step,
    sharded_basis_scale,
)

__all__ = [
    "ORTHOGONALITY_TOLERANCE",
    "align_rotation",
    "align_signs",
    "assert_replicated",
    "cholesky_qr",
    "correlation_loss_and_grad",
    "correlation_step",
    "draw_omega",
    "normalized_correlation_step",
    "orthogonal_basis",
    "orthogonal_basis_sv",
]

#: Largest ``‖Q₁ᵀQ₁ − I‖_F`` after CholeskyQR's first pass for which the second pass is trusted.
ORTHOGONALITY_TOLERANCE = 0.5


def _upper_cholesky(g: Tensor) -> tuple[Tensor, bool]:
    lower, info = torch.linalg.cholesky_ex(g)
    return lower.mT, int(info) == 0


def _tsqr(y: Tensor, group: dist.ProcessGroup | None, comm: CommLog | None) -> Tensor:
    r = y.shape[1]
    q_loc, r_loc = torch.linalg.qr(y, mode="reduced")  # M_k×k, k×r with k = min(M_k, r)
    k = r_loc.shape[0]
    padded = y.new_zeros(r, r)
    padded[:k] = r_loc
    stacked = all_gather(padded, group, comm, "tsqr_r")
    q_stack = torch.linalg.qr(stacked, mode="reduced").Q  # identical on every rank
    start = group_rank(group) * r
    return q_loc @ q_stack[start : start + k]


def cholesky_qr(y: Tensor, *, group: dist.ProcessGroup | None = None, comm: CommLog | None = None) -> Tensor:
    """The local rows ``Q_k`` of an orthonormal basis of the row-sharded ``Y`` (``M_k×r`` each).

    CholeskyQR2 (``G = Σ Y_kᵀY_k``, ``R = chol(G)ᵀ``, ``Q = Y R⁻¹``, twice) with the TSQR fallback of
    the module docstring; ``comm.qr_paths`` gets ``"cholqr2"``, ``"tsqr-pass1"`` or ``"tsqr-pass2"``.
    """
    if y.ndim != 2:
        raise ValueError(f"y must be a 2-D M_local×r matrix, got shape {tuple(y.shape)}")
    r = y.shape[1]
    g1 = all_reduce((y.mT @ y).contiguous(), group, comm, "gram1")
    r1, ok = _upper_cholesky(g1)
    path = "tsqr-pass1"
    if ok:
        q1 = torch.linalg.solve_triangular(r1, y, upper=True, left=False)
        g2 = all_reduce((q1.mT @ q1).contiguous(), group, comm, "gram2")
        eye = torch.eye(r, dtype=g2.dtype, device=g2.device)
        path = "tsqr-pass2"
        if float(torch.linalg.matrix_norm(g2 - eye)) <= ORTHOGONALITY_TOLERANCE:
            r2, ok = _upper_cholesky(g2)
            if ok:
                if comm is not None:
                    comm.qr_paths.append("cholqr2")
                return torch.linalg.solve_triangular(r2, q1, upper=True, left=False)
    if comm is not None:
        comm.qr_paths.append(path)
    return _tsqr(y, group, comm)


def orthogonal_basis(
    x: Tensor,
    rank: int,
    omega: Tensor | None = None,
    seed: int = OMEGA_SEED,
    *,
    group: dist.ProcessGroup | None = None,
    comm: CommLog | None = None,
    src: int | None = None,
) -> Tensor:
    """Distributed low-cost SVD / randomized range finder; returns the replicated ``P'`` (``N×r``).

    Args:
        x: this rank's rows ``X_k`` (``M_k×N``; ``M_k = 0`` allowed). ``N`` is the same on every rank.
        rank: ``r``, ``1 ≤ r ≤ N``.
        omega: ``Ω`` (``N×r``, identical on every rank; the previous ``P`` for the recalibration), or
            None for :func:`draw_omega` with ``seed`` (the init refresh).
        group: the process group the rows are sharded over (None: the default group, if any).
        comm: records the collectives (bytes) and the QR path taken.
        src: if given, the group rank whose ``P'`` is broadcast to all (see the module docstring).

    Same dtype rule as the single-process version: float64 for float64 ``x``, else float32. An ``X``
    whose products could overflow is divided by a power of two first (:func:`sharded_basis_scale`, the
    first collective; ``P'`` is invariant to it).
    """
    return orthogonal_basis_sv(x, rank, omega, seed, group=group, comm=comm, src=src, broadcast_sv=False)[0]


def orthogonal_basis_sv(
    x: Tensor,
    rank: int,
    omega: Tensor | None = None,
    seed: int = OMEGA_SEED,
    *,
    group: dist.ProcessGroup | None = None,
    comm: CommLog | None = None,
    src: int | None = None,
    broadcast_sv: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`orthogonal_basis` and the singular values of ``B`` (descending, ``P'``'s column order, scaled
    back; replicated as ``B`` is): they decide the null directions
    (:func:`~coap_compile.projection.linalg.null_columns`). With ``src`` they are broadcast with ``P'``."""
    rank = check_positive_int("rank", rank)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D M_local×N matrix, got shape {tuple(x.shape)}")
    n = x.shape[1]
    if rank > n:
        raise ValueError(f"rank must be in [1, {n}] for a matrix with N={n} columns, got rank={rank}")
    dtype = work_dtype(x)
    if omega is None:
        omega = draw_omega(n, rank, seed, x.device)
    if tuple(omega.shape) != (n, rank):
        raise ValueError(f"omega must have shape {(n, rank)}, got {tuple(omega.shape)}")
    a = x.to(dtype)
    s = sharded_basis_scale(a, dtype, group, comm)
    if s != 1.0:
        a = a / s
    q = cholesky_qr(a @ omega.to(dtype), group=group, comm=comm)
    b = all_reduce((q.mT @ a).contiguous(), group, comm, "b")
    _, sv, vh = torch.linalg.svd(b, full_matrices=False)
    p = vh.mT.contiguous()
    if src is not None:
        broadcast(p, src, group, comm, "p")
        if broadcast_sv:
            broadcast(sv, src, group, comm, "sv")
    return p, sv * s


def assert_replicated(t: Tensor, *, group: dist.ProcessGroup | None = None, name: str = "tensor") -> None:
    """Raise ``AssertionError`` unless ``t`` has the same bits on every rank (max = min of its bytes)."""
    if group_size(group) == 1:
        return
    bits = t.detach().contiguous().view(torch.uint8).to(torch.int32)
    hi, lo = bits.clone(), bits.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    if not torch.equal(hi, lo):
        raise AssertionError(f"{name} differs across ranks (shape {tuple(t.shape)}, dtype {t.dtype})")
