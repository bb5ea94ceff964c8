"""Flora: a random Gaussian projection, resampled every ``resample_every`` steps from a stored seed.

State: ``{"proj": P (N×r), "seed": s (0-d int64)}`` with ``P_{ij} ~ 𝒩(0, 1/r)`` drawn from a private
generator seeded by ``s`` (see :func:`~coap_compile.projection.linalg.gaussian_basis`)::

    k = 0                               init:       s = seed,  P = gaussian(N, r, s)
    k > 0, k ≡ 0 (mod resample_every)   "resample": s ← s + 1, P ← gaussian(N, r, s)   (in place)
    otherwise                           P unchanged

``P`` is a pure function of ``(N, r, s, device)``, so it is deterministic and survives a ``state_dict``
round trip bit for bit. The gradient is never read (only its shape, dtype and device).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import LOCAL, Comm, ProjectionPolicy, RefreshKind
from .linalg import check_positive_int, gaussian_basis, work_dtype

__all__ = ["FloraPolicy"]


class FloraPolicy(ProjectionPolicy):
    """Flora projection. ``resample_every``: int > 0 (default 200); ``seed``: the first generator seed."""

    name: ClassVar[str] = "flora"
    needs_first_moment: ClassVar[bool] = False
    supports_sharding: ClassVar[bool] = True  # P is a function of the seed and the shape: no collective

    def __init__(self, resample_every: int = 200, seed: int = 0) -> None:
        self.resample_every = check_positive_int("resample_every", resample_every)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"FloraPolicy(resample_every={self.resample_every}, seed={self.seed})"

    def init_state(self, x: Tensor, rank: int, comm: Comm = LOCAL) -> dict[str, Tensor]:
        proj = gaussian_basis(x.shape[1], rank, self.seed, dtype=work_dtype(x), device=x.device)
        return {"proj": proj, "seed": torch.tensor(self.seed, dtype=torch.int64, device=x.device)}

    def state_layout(
        self, n: int, rank: int, dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"proj": ((n, rank), dtype), "seed": ((), torch.int64)}

    def refresh_kind(self, k: int) -> RefreshKind:
        if k == 0:
            return "init"
        return "resample" if k % self.resample_every == 0 else ""

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
        p, seed = state["proj"], state["seed"]
        seed.add_(1)
        p.copy_(gaussian_basis(p.shape[0], p.shape[1], int(seed), dtype=p.dtype, device=p.device))
        return True
