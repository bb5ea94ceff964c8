"""GaLore: ``P`` = the top-r right singular vectors of the gradient, recomputed every ``update_gap`` steps.

With the canonical gradient ``X = U Σ Vh`` (thin SVD)::

    k = 0                         init:  P = Vh[:r]ᵀ        (N×r, orthonormal columns)
    k > 0, k ≡ 0 (mod update_gap) "svd": P ← Vh[:r]ᵀ of the current X
    otherwise                     P unchanged

No first moment is read. The SVD runs in float32 (float64 for float64 input), on ``X`` rescaled by a power
of two when its products could overflow (:func:`~.linalg.overflow_scale`).

``basis`` (as :class:`~.coap.CoapPolicy`): each refreshed basis is oriented against the previous one
(``"signs"``/``"rotation"``, :func:`~.linalg.orient`), and directions whose singular value is numerically zero
(:func:`~.linalg.null_columns`) are zeroed at init and at every refresh; ``"official"`` is the original
GaLore (LAPACK's signs, every direction kept).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import LOCAL, Comm, ProjectionPolicy, RefreshKind
from .linalg import BASES, check_positive_int, drop_null, orient, top_right_singular_vectors_sv

__all__ = ["GaLorePolicy"]


class GaLorePolicy(ProjectionPolicy):
    """GaLore projection. ``update_gap`` (an int > 0, default 200 as in GaLore) is the refresh period."""

    name: ClassVar[str] = "galore"
    needs_first_moment: ClassVar[bool] = False

    def __init__(self, update_gap: int = 200, basis: str = "signs") -> None:
        self.update_gap = check_positive_int("update_gap", update_gap)
        if not isinstance(basis, str) or basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got basis={basis!r}")
        self.basis_rule = basis

    def __repr__(self) -> str:
        return f"GaLorePolicy(update_gap={self.update_gap}, basis={self.basis_rule!r})"

    def _svd(self, x: Tensor, rank: int) -> Tensor:
        p, sv = top_right_singular_vectors_sv(x, rank)
        return p if self.basis_rule == "official" else drop_null(p, sv, x.shape)

    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]:
        return {"proj": self._svd(x, rank)}

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
        p.copy_(orient(self._svd(x, p.shape[1]), p, self.basis_rule))
        return True
