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
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["ProjectionPolicy", "RefreshKind", "canonical", "resolve_rank"]

RefreshKind = str  # one of "init", "correlation", "svd", "resample", or "" (no refresh)


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


class ProjectionPolicy(abc.ABC):
    """One way of choosing and refreshing ``P``. Subclasses are registered by ``name``.

    Contract (all methods see the canonical orientation, see the module docstring):

    * :meth:`init_state` builds the state at ``k = 0`` from the first gradient ``X`` and returns a dict
      containing at least ``"proj"`` (``N×r`` float32 on ``X``'s device).
    * :meth:`refresh_kind` is the schedule: which refresh (if any) happens at completed-step count ``k``.
    * :meth:`refresh` performs that refresh in place (``state["proj"].copy_(...)``, never reassigning the
      tensor, so compiled code that captured it stays valid). It returns True if ``P`` changed.
    * :meth:`project` / :meth:`project_back` map between the full and the projected space; the
      optimizer's ``scale`` is applied by the caller, not here.
    """

    name: ClassVar[str]
    #: True if :meth:`refresh` reads the first moment (the correlation-aware step does).
    needs_first_moment: ClassVar[bool] = False

    @abc.abstractmethod
    def init_state(self, x: Tensor, rank: int) -> dict[str, Tensor]: ...

    @abc.abstractmethod
    def refresh_kind(self, k: int) -> RefreshKind: ...

    @abc.abstractmethod
    def refresh(
        self, state: dict[str, Tensor], x: Tensor, k: int, *, first_moment: Tensor | None, transposed: bool
    ) -> bool: ...

    def project(self, state: dict[str, Tensor], x: Tensor) -> Tensor:
        """``X̃ = X P`` in ``P``'s dtype (float32, or float64 for float64 parameters)."""
        proj = state["proj"]
        return x.to(proj.dtype) @ proj

    def project_back(self, state: dict[str, Tensor], d: Tensor) -> Tensor:
        """``D Pᵀ`` in ``P``'s dtype (no ``scale``)."""
        proj = state["proj"]
        return d.to(proj.dtype) @ proj.t()

    def state_layout(
        self, n: int, rank: int, dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the state :meth:`init_state` creates (for memory plans, no allocation)."""
        return {"proj": ((n, rank), dtype)}
