"""Eager reference COAP-AdamW: torch.optim.AdamW arithmetic, run in a projected low-rank space."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..projection.base import ProjectionPolicy
from .common import LowRank, ProjectedOptimizer, check_number, projection_defaults

__all__ = ["CoapAdamW"]


class CoapAdamW(ProjectedOptimizer):
    r"""AdamW whose moments live in a low-rank projected space (COAP, GaLore, Flora, … policies).

    The base arithmetic is exactly ``torch.optim.AdamW``'s single-tensor, non-capturable path. With
    ``t`` the 1-based step and ``g`` the (projected) gradient::

        W ← W · (1 − lr·wd)                                      (decoupled decay, full weight, first)
        m ← lerp(m, g, 1 − β₁);   v ← β₂ v + (1 − β₂) g⊙g
        step_size = lr / (1 − β₁ᵗ);   denom = √v / √(1 − β₂ᵗ) + eps
        unprojected:  W ← W − step_size · m / denom              (``addcdiv_``, bit-identical to torch)
        projected:    W_view ← W_view − step_size · scale · (m / denom) Pᵀ

    where for a projected matrix ``g = X P`` (``M×r``, see :mod:`coap_compile.reference.common`) and
    ``P`` is refreshed by the policy on its schedule before the moments are updated.

    Args:
        params: parameters or param groups. A group may override any keyword below and may set
            ``"project": True/False`` to force the choice for its 2-D parameters (True: rank clamped to
            ``min(shape)``, so ``project=True`` without a rank gives full rank).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults).
        rank: projection rank; a 2-D parameter is projected iff ``min(shape) > rank``.
        rank_ratio: if given, every 2-D parameter is projected with ``r = max(⌊min(m,n)/rank_ratio⌋, 1)``.
        projection: ``"coap"`` (default), ``"galore"``, ``"flora"``, or a
            :class:`~coap_compile.projection.ProjectionPolicy` instance. For a name, ``update_interval``
            is the policy's refresh period (COAP's ``T_u``, GaLore's ``update_gap``, Flora's
            ``resample_every``) and ``reproject_factor`` is COAP's ``λ``.
        scale: multiplies the back-projected update of projected matrices only.
        restore_state: after each refresh map the moments into the new basis,
            ``m ← (m P_oldᵀ) P_new``, ``v ← ((√v P_oldᵀ) P_new)²`` (also enabled by a CoapPolicy
            instance constructed with ``restore_state=True``).

    State per parameter (tensors only): ``step`` (0-d float32, CPU); unprojected: ``exp_avg``,
    ``exp_avg_sq`` shaped and typed like the parameter; projected: ``exp_avg``, ``exp_avg_sq`` (``M×r``,
    float32 — float64 for float64 parameters), ``proj`` (``N×r``, same dtype) and any policy extras
    (Flora: ``seed``, 0-d int64).

    Deliberate differences from the official ``CoapAdamW`` (HF legacy AdamW arithmetic, spec §7):

    * eps is added to the bias-corrected ``√v̂`` (torch) instead of the uncorrected ``√v`` (official eps
      1e-6 vs our default 1e-8); the official form equals torch's with ``eps/√(1−β₂ᵗ)``.
    * weight decay is applied before the step with ``lr`` (torch order); the official applies
      ``W ← W − lr·wd·W`` after the Adam update. Default ``weight_decay`` is 1e-2 (official 0.0).
    * ``P`` is stored ``N×r`` in the canonical orientation (official: ``r×n`` for tall matrices) and in
      float32 (official: the parameter dtype); moments of projected matrices are float32 (official:
      the parameter dtype) and the correlation step runs in float32 (official: the parameter dtype).
    * no persistent ``P.grad`` buffer is left by the correlation step; ``P`` and ``step`` are plain
      tensors in the state, not a pickled projector object, so ``weights_only=True`` loading works.
    * with ``rank_ratio`` every matrix is projected, even when ``rank`` is also given (official: a
      matrix with ``min(shape) ≤ rank`` is skipped first, then the ratio sets ``r``); a group key
      ``project`` forces the choice; 4-D convolution weights are not Tucker-projected (plain update).
    * the correlation step evaluates ``(X P) Pᵀ`` for both sides (official left side: ``(P Pᵀ) G``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        projection: str | ProjectionPolicy = "coap",
        update_interval: int = 32,
        reproject_factor: int = 5,
        scale: float = 1.0,
        restore_state: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            **projection_defaults(
                rank, rank_ratio, projection, update_interval, reproject_factor, scale, restore_state
            ),
        }
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0)
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of floats, got betas={betas!r}")
        for i, b in enumerate(betas):
            check_number(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True)

    def _init_state(self, state: dict[str, Tensor], like: Tensor, policy: ProjectionPolicy | None) -> None:
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _first_moment(self, state: dict[str, Tensor]) -> Tensor | None:
        return state["exp_avg"]

    def _restore_targets(self, state: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [state["exp_avg"]], [state["exp_avg_sq"]]

    def _update(self, group: dict[str, Any], p: Tensor, grad: Tensor, low: LowRank | None) -> None:
        state = self.state[p]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        g = grad if low is None else low.grad
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]

        step_t += 1
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)

        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if low is None:
            p.addcdiv_(exp_avg, denom, value=-step_size)
        else:
            low.apply_back(p, exp_avg / denom, group["scale"], -step_size)
