"""COAP: correlation-aware updates of ``P`` between occasional low-cost SVD recalibrations.

Schedule (``k`` = completed optimizer steps, ``T_u`` = ``update_interval``, ``λ`` = ``reproject_factor``)::

    k = 0                               init:        P = orthogonal_basis(X, r, Ω ~ 𝒩(0,1), seed 3407)
    k > 0, k ≡ 0 (mod T_u·λ)            "svd":       P ← orthogonal_basis(X, r, Ω = P)
    k > 0, k ≡ 0 (mod T_u), otherwise   "correlation": one clipped gradient step on P (below)
    otherwise                           P unchanged

Correlation step (spec §4), in the canonical orientation ``X ∈ ℝ^{M×N}``, ``P ∈ ℝ^{N×r}`` and the
low-rank first moment ``M ∈ ℝ^{M×r}`` (the value *before* this step's moment update)::

    X̂ = (X P) Pᵀ,   M̂ = M Pᵀ
    L(P) = mean((X̂ − X)²) · (1 − mean_i cos(M̂_i, X_i))
    ∇ = ∂L/∂P,  ∇ ← ∇ · min(1, 1/(‖∇‖_F + 1e-6)),  P ← P − 0.1 ∇

The official code takes the cosine along dim 1 of the *original* ``m×n`` matrix for both sides, so in the
canonical orientation it runs along dim 1 when not transposed and along dim 0 when ``transposed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ProjectionPolicy, RefreshKind
from .linalg import OMEGA_SEED, check_positive_int, orthogonal_basis

__all__ = ["CoapPolicy", "correlation_step", "restore_moments"]

#: Constants of the official ``update_proj`` (not exposed as options there either).
CORRELATION_LR = 0.1
CORRELATION_MAX_NORM = 1.0
COSINE_EPS = 1e-8


def correlation_step(
    p: Tensor,
    x: Tensor,
    first_moment: Tensor,
    *,
    transposed: bool,
    lr: float = CORRELATION_LR,
    max_norm: float = CORRELATION_MAX_NORM,
) -> Tensor:
    """One clipped gradient-descent step on ``L(P)`` (module docstring); returns the new ``P``.

    ``P`` itself is not modified and no ``.grad`` is left anywhere: the gradient is taken with
    :func:`torch.autograd.grad` on a detached copy (the official code leaves a zeroed ``P.grad`` buffer
    allocated). Runs under :func:`torch.enable_grad`, so it works inside a ``no_grad`` optimizer step.
    The gradient flows through both factors of ``X̂`` and through ``M̂``; ``X`` and ``M`` are constants.
    """
    dtype = p.dtype
    x = x.detach().to(dtype)
    m = first_moment.detach().to(dtype)
    with torch.enable_grad():
        q = p.detach().clone().requires_grad_(True)
        x_hat = (x @ q) @ q.t()
        m_hat = m @ q.t()
        # dim 1 of the original m×n matrix (see the module docstring); eps as in F.cosine_similarity.
        cos = F.cosine_similarity(m_hat, x, dim=0 if transposed else 1, eps=COSINE_EPS)
        loss = F.mse_loss(x_hat, x) * (1.0 - cos.mean())
        (grad,) = torch.autograd.grad(loss, q)
    coef = max_norm / (float(grad.norm()) + 1e-6)
    if coef < 1.0:
        grad = grad * coef
    return p.detach() - lr * grad


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


class CoapPolicy(ProjectionPolicy):
    """COAP projection (schedule and updates in the module docstring).

    Args:
        update_interval: ``T_u``, steps between refreshes of ``P``.
        reproject_factor: ``λ``; every ``λ``-th refresh is a low-cost SVD instead of a correlation step.
        restore_state: stored flag read by the optimizer, which then maps its moments into the new basis
            with :func:`restore_moments` after each refresh (the policy never touches the moments).
        seed: seed of the private generator drawing the initial Ω (3407 in the official code).
    """

    name: ClassVar[str] = "coap"
    needs_first_moment: ClassVar[bool] = True

    def __init__(
        self,
        update_interval: int = 32,
        reproject_factor: int = 5,
        restore_state: bool = False,
        seed: int = OMEGA_SEED,
    ) -> None:
        self.update_interval = check_positive_int("update_interval", update_interval)
        self.reproject_factor = check_positive_int("reproject_factor", reproject_factor)
        self.restore_state = bool(restore_state)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"CoapPolicy(update_interval={self.update_interval}, reproject_factor={self.reproject_factor}, "
            f"restore_state={self.restore_state}, seed={self.seed})"
        )

    def init_state(self, x: Tensor, rank: int) -> dict[str, Tensor]:
        return {"proj": orthogonal_basis(x, rank, seed=self.seed)}

    def refresh_kind(self, k: int) -> RefreshKind:
        if k == 0:
            return "init"
        if k % self.update_interval != 0:
            return ""
        return "svd" if k % (self.update_interval * self.reproject_factor) == 0 else "correlation"

    def refresh(
        self, state: dict[str, Tensor], x: Tensor, k: int, *, first_moment: Tensor | None, transposed: bool
    ) -> bool:
        kind = self.refresh_kind(k)
        p = state["proj"]
        if kind == "":
            return False
        if kind == "init":
            p.copy_(orthogonal_basis(x, p.shape[1], seed=self.seed))
        elif kind == "svd":
            p.copy_(orthogonal_basis(x, p.shape[1], omega=p))
        else:
            if first_moment is None:
                raise ValueError(
                    f"the COAP correlation step at k={k} needs the low-rank first moment, "
                    "got first_moment=None"
                )
            p.copy_(correlation_step(p, x, first_moment, transposed=transposed))
        return True
