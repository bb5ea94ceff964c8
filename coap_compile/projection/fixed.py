"""A fixed projection: ``P = make_proj(N, r, dtype, device)`` at the first step, never refreshed.

Mainly a testing tool: with a permutation matrix at full rank (``r = N``) the projected optimizer must
reproduce the unprojected base optimizer (``X P Pᵀ = X`` and element-wise states just get permuted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .base import LOCAL, Comm, ProjectionPolicy, RefreshKind
from .linalg import work_dtype

__all__ = ["FixedProjection", "MakeProj"]

#: ``make_proj(N, r, dtype, device) -> Tensor`` of shape ``(N, r)``.
MakeProj = Callable[[int, int, torch.dtype, torch.device], Tensor]


class FixedProjection(ProjectionPolicy):
    """``P`` built once by ``make_proj`` (called with the canonical ``N``, the rank, the working dtype
    — float32, or float64 for float64 gradients — and the gradient's device)."""

    name: ClassVar[str] = "fixed"
    needs_first_moment: ClassVar[bool] = False

    def __init__(self, make_proj: MakeProj) -> None:
        if not callable(make_proj):
            raise TypeError(f"make_proj must be callable, got make_proj={make_proj!r}")
        self.make_proj = make_proj

    def __repr__(self) -> str:
        return f"FixedProjection(make_proj={self.make_proj!r})"

    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]:
        n, dtype = x.shape[1], work_dtype(x)
        proj = self.make_proj(n, rank, dtype, x.device)
        if tuple(proj.shape) != (n, rank):
            raise ValueError(f"make_proj returned shape {tuple(proj.shape)}, expected {(n, rank)}")
        return {"proj": proj.to(dtype=dtype, device=x.device).clone()}

    def refresh_kind(self, k: int) -> RefreshKind:
        return "init" if k == 0 else ""

    def refresh(
        self,
        state: dict[str, Tensor],
        x: Tensor,
        k: int,
        *,
        first_moment: Tensor | None,
        transposed: bool,
        comm: Comm = LOCAL,
    ) -> bool:
        return False
