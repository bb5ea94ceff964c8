"""The projection-policy interface.

A policy decides *which* low-rank subspace a weight matrix's optimizer state lives in and when that
subspace is refreshed. Everything is expressed in the **canonical orientation**: the gradient seen by a
policy is ``X ∈ ℝ^{M×N}`` with ``M ≥ N`` (``X = G`` for a tall or square weight, the "right" side, and
``X = Gᵀ`` for a wide one, the "left" side). The projection matrix is ``P ∈ ℝ^{N×r}`` (columns
approximately orthonormal), so

    X̃ = X P            (M×r, the projected gradient; the optimizer moments have this shape)
    back(D) = D Pᵀ     (M×N, the update mapped back to the full space)

For the left side this is exactly the official code's ``Pᵀ G`` / ``P X`` written on transposed views,
and the right-side ``P`` is the transpose of the official ``r×n`` ``Vh`` (documented difference in layout
only). ``P`` is always stored in float32, whatever the parameter dtype.

A policy object holds only hyperparameters; the per-parameter state is a ``dict[str, Tensor]`` (tensors
only, so ``torch.load(weights_only=True)`` works) created by :meth:`ProjectionPolicy.init_state` and
updated in place by :meth:`ProjectionPolicy.refresh`. The step counter ``k`` passed to a policy is the
number of *completed* optimizer steps for that parameter (``k = 0`` on the first step).

``P`` is whatever :meth:`ProjectionPolicy.basis` returns: ``state["proj"]`` for the dense policies, the
gathered columns of a basis shared between matrices for index policies (``projection="dct"``, whose state
holds only column indices). Callers must read ``P`` through :meth:`~ProjectionPolicy.basis`, never
``state["proj"]``, and map moments across a refresh with :meth:`~ProjectionPolicy.snapshot` before and
:meth:`~ProjectionPolicy.remap_moments` after it. Memory: :meth:`~ProjectionPolicy.state_layout` is the
per-matrix state, :meth:`~ProjectionPolicy.shared_state_layout` the shared part (count each key once).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .correlation import correlation_step, normalized_correlation_step
from .linalg import OMEGA_SEED, orthogonal_basis, orthogonal_basis_sv, restore_moments

__all__ = ["LOCAL", "ROWS", "Comm", "Layout", "ProjectionPolicy", "RefreshKind", "canonical", "resolve_rank"]

RefreshKind = str  # one of "init", "correlation", "svd", "resample", "select", or "" (no refresh)

#: ``{state key: (shape, dtype)}``, as returned by :meth:`ProjectionPolicy.state_layout`.
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def canonical(g: Tensor) -> tuple[Tensor, bool]:
    """Return ``(X, transposed)``: the canonical ``M×N`` (``M ≥ N``) view of a 2-D tensor, no copy."""
    if g.ndim != 2:
        raise ValueError(f"projection needs a 2-D tensor, got shape {tuple(g.shape)}")
    transposed = g.shape[0] < g.shape[1]
    return (g.t() if transposed else g), transposed


def resolve_rank(shape: tuple[int, ...] | torch.Size, rank: int | None, rank_ratio: float | None) -> int:
    """The rank used for a matrix of ``shape``.

    ``rank_ratio`` wins when given: ``r = max(⌊min(m, n) / rank_ratio⌋, 1)`` (the official rule).
    Otherwise ``r = min(rank, min(m, n))`` (rank clamping).
    """
    small = min(int(shape[0]), int(shape[1]))
    if rank_ratio is not None:
        return max(int(small // rank_ratio), 1)
    if rank is None:
        raise ValueError("one of rank or rank_ratio must be given")
    return min(int(rank), small)


class Comm:
    """Where the rows of ``X`` live, and the products a refresh computes over them.

    A policy's :meth:`~ProjectionPolicy.init_state` and :meth:`~ProjectionPolicy.refresh` take one; the
    policy code is the same sharded or not. This base class is the single process: every sum over the
    rows of ``X`` is local. :data:`LOCAL` is the canonical side (the official code's arithmetic; how its
    refreshed bases are oriented is the policy's ``basis`` option, :func:`~.linalg.orient`);
    :data:`ROWS` is the rows side's single-process reference (``projection_side="rows"``), whose bases
    are *aligned* whatever ``basis`` says: after an init or SVD refresh each column's sign follows ``Ω`` or
    the previous ``P`` (:func:`~.linalg.align_signs`), since a sharded QR fixes other signs than LAPACK's.
    :class:`coap_compile.distributed.fsdp.ShardComm` is the FSDP2 row shard: the same two products with
    their sums all-reduced over the shard group.

    Attributes:
        sharded: the rows are split over ranks (a policy without sharded refreshes refuses it).
        aligned: the aligned basis convention above.
    """

    sharded = False

    def __init__(self, *, aligned: bool = False) -> None:
        self.aligned = aligned

    def basis(self, x: Tensor, rank: int, *, omega: Tensor | None = None, seed: int = OMEGA_SEED) -> Tensor:
        """The low-cost SVD / randomized range finder of ``X`` (:func:`~.linalg.orthogonal_basis`)."""
        return orthogonal_basis(x, rank, omega=omega, seed=seed)

    def basis_sv(
        self, x: Tensor, rank: int, *, omega: Tensor | None = None, seed: int = OMEGA_SEED
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`basis` and its singular values (for the null directions, :func:`~.linalg.null_columns`,
        judged against :meth:`global_shape`). A sharded subclass overrides both (FSDP2's
        :class:`~coap_compile.distributed.fsdp.ShardComm`: the same values from its sharded ``B``)."""
        return orthogonal_basis_sv(x, rank, omega=omega, seed=seed)

    def global_shape(self, x: Tensor) -> tuple[int, int]:
        """The ``M×N`` of the whole ``X`` whose rows ``x`` holds (here: all of them)."""
        return int(x.shape[0]), int(x.shape[1])

    def correlation_step(
        self, p: Tensor, x: Tensor, m: Tensor, *, transposed: bool, angle: float | None
    ) -> Tensor:
        """COAP's correlation step (``angle=None``: the paper's; else the normalized step of ``angle``)."""
        if angle is None:
            return correlation_step(p, x, m, transposed=transposed)
        return normalized_correlation_step(p, x, m, transposed=transposed, angle=angle)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(aligned={self.aligned})"


#: One process, canonical side (the default).
LOCAL = Comm()
#: One process, the rows side's aligned basis convention (``projection_side="rows"``).
ROWS = Comm(aligned=True)


class ProjectionPolicy(abc.ABC):
    """One way of choosing and refreshing ``P``. Subclasses are registered by ``name``.

    Contract (all methods see the canonical orientation, see the module docstring):

    * ``comm`` (a :class:`Comm`) says where the rows of ``X`` live; a policy whose refreshes cannot run on
      row shards sets ``supports_sharding = False`` and is refused for sharded weights.
    * :meth:`init_state` builds the state at ``k = 0`` from the first gradient ``X`` (dense policies: a dict
      containing ``"proj"``, ``N×r`` float32 — float64 for float64 ``X`` — on ``X``'s device).
    * :meth:`refresh_kind` is the schedule: which refresh (if any) happens at completed-step count ``k``.
    * :meth:`refresh` performs that refresh in place (``copy_`` into the state tensors, never reassigning
      them, so compiled code that captured them stays valid). It returns True if ``P`` changed.
    * :meth:`basis` is ``P`` (``N×r``); :meth:`project` / :meth:`project_back` map between the full and the
      projected space through it; the optimizer's ``scale`` is applied by the caller, not here.
    """

    name: ClassVar[str]
    #: True if :meth:`refresh` reads the first moment (the correlation-aware step does).
    needs_first_moment: ClassVar[bool] = False
    #: True if :meth:`init_state` and :meth:`refresh` run on row shards (a sharded :class:`Comm`).
    supports_sharding: ClassVar[bool] = False

    @abc.abstractmethod
    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]: ...

    @abc.abstractmethod
    def refresh_kind(self, k: int) -> RefreshKind: ...

    @abc.abstractmethod
    def refresh(
        self,
        state: dict[str, Tensor],
        x: Tensor,
        k: int,
        *,
        first_moment: Tensor | None,
        transposed: bool,
        comm: Comm = LOCAL,
    ) -> bool: ...

    def basis(self, state: dict[str, Tensor]) -> Tensor:
        """``P`` (``N×r``, float32 or float64). Dense policies: ``state["proj"]`` itself (no copy)."""
        return state["proj"]

    def state_shape(self, state: dict[str, Tensor]) -> tuple[int, int]:
        """``(N, r)`` of the basis a state describes, without materializing it."""
        return tuple(state["proj"].shape)  # type: ignore[return-value]

    def project(self, state: dict[str, Tensor], x: Tensor) -> Tensor:
        """``X̃ = X P`` in ``P``'s dtype (float32, or float64 for float64 parameters)."""
        proj = self.basis(state)
        return x.to(proj.dtype) @ proj

    def project_back(self, state: dict[str, Tensor], d: Tensor) -> Tensor:
        """``D Pᵀ`` in ``P``'s dtype (no ``scale``)."""
        proj = self.basis(state)
        return d.to(proj.dtype) @ proj.t()

    def snapshot(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A copy of what :meth:`remap_moments` needs of the state before a refresh (dense: ``P``)."""
        return {"proj": state["proj"].clone()}

    def remap_moments(
        self,
        old: dict[str, Tensor],
        state: dict[str, Tensor],
        *,
        first: Sequence[Tensor] = (),
        second: Sequence[Tensor] = (),
    ) -> None:
        """Map low-rank moments, in place, from the basis of ``old`` (a :meth:`snapshot`) to the current one.

        First moments ``M ← (M P_oldᵀ) P_new``, second moments ``V ← ((√V P_oldᵀ) P_new)²`` (spec §6; the
        ``restore_state`` option).
        """
        restore_moments(self.basis(old), self.basis(state), first, second)

    def state_layout(self, n: int, rank: int, dtype: torch.dtype) -> Layout:
        """Shapes and dtypes of the per-matrix state :meth:`init_state` creates for an ``M×N`` gradient in
        working dtype ``dtype`` (for memory plans, no allocation)."""
        return {"proj": ((n, rank), dtype)}

    def shared_state_layout(self, n: int, dtype: torch.dtype) -> Layout:
        """Tensors shared by every matrix with the same ``N`` and working dtype (per device). The keys name
        the shared object, so a memory plan counts the union of the keys over all matrices once. Dense
        policies share nothing."""
        return {}
