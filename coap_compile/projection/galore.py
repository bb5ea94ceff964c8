"""GaLore: ``P`` = the top-r right singular vectors of the gradient, recomputed every ``update_gap`` steps.

With the canonical gradient ``X = U Σ Vh`` (thin SVD)::

    k = 0                         init:  P = Vh[:r]ᵀ        (N×r, orthonormal columns)
    k > 0, k ≡ 0 (mod update_gap) "svd": P ← Vh[:r]ᵀ of the current X
    otherwise                     P unchanged

No first moment is read. The SVD runs in float32 (float64 for float64 input).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import LOCAL, Comm, ProjectionPolicy, RefreshKind
from .linalg import check_positive_int, top_right_singular_vectors

__all__ = ["GaLorePolicy"]


class GaLorePolicy(ProjectionPolicy):
    """GaLore projection. ``update_gap`` (an int > 0, default 200 as in GaLore) is the refresh period."""

    name: ClassVar[str] = "galore"
    needs_first_moment: ClassVar[bool] = False

    def __init__(self, update_gap: int = 200) -> None:
        self.update_gap = check_positive_int("update_gap", update_gap)

    def __repr__(self) -> str:
        return f"GaLorePolicy(update_gap={self.update_gap})"

    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]:
        return {"proj": top_right_singular_vectors(x, rank)}

    def refresh_kind(self, k: int) -> RefreshKind:
        if k == 0:
            return "init"
        return "svd" if k % self.update_gap == 0 else ""

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
        if self.refresh_kind(k) == "":
            return False
        p = state["proj"]
        p.copy_(top_right_singular_vectors(x, p.shape[1]))
        return True
