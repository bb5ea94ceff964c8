"""Eager reference COAP-Adafactor: torch.optim.Adafactor arithmetic, run in a projected low-rank space."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..projection.base import ProjectionPolicy
from .common import LowRank, ProjectedOptimizer, check_number, projection_defaults

__all__ = ["CoapAdafactor"]


class CoapAdafactor(ProjectedOptimizer):
    r"""Adafactor whose factored second moment lives in a low-rank projected space.

    The base arithmetic is ``torch.optim.Adafactor``'s single-tensor path. With ``t`` the 1-based step,
    ``g`` the (projected) gradient of shape ``(…, R, C)`` and ``ε₁ = eps[0]`` (None → machine epsilon of
    the dtype the update is computed in), ``ε₂ = eps[1]``::

        β̂₂ = t^beta2_decay;   ρ = min(lr, 1/√t);   α = max(ε₂, RMS(W)) · ρ     (RMS over the FULL W)
        W ← W · (1 − lr·wd)
        row ← lerp(row, mean_C(g²), β̂₂)      (…, R, 1)
        col ← lerp(col, mean_R(g²), β̂₂)      (…, 1, C)
        V̂ = row ⊗ col / max(mean_R(row), ε₁)          (1-D/0-D: V̂ = v ← lerp(v, g², β̂₂))
        U = g · rsqrt(max(V̂, ε₁²));   c = max(1, RMS(U)/d)
        unprojected: W ← W − (α/c) · U
        projected:   W_view ← W_view − (α/c) · scale · U Pᵀ

    For a projected matrix all of this runs on ``X̃ = X P`` (``M×r``: ``row`` has ``M`` entries, ``col``
    ``r``, and the update-clipping RMS is over ``M·r`` entries), except ``RMS(W)`` which uses the full
    weight — as the official code does (spec §8).

    **First moment for COAP.** torch's Adafactor has no first moment, but the COAP correlation step
    needs one. Projected parameters whose policy needs it (``needs_first_moment``) keep an extra
    low-rank gradient EMA ``coap_exp_avg ← β·coap_exp_avg + (1−β)·X̃`` with
    ``β = first_moment_beta``, updated every step after the refresh (so the correlation step reads the
    value before this step's update, like Adam's ``exp_avg``). It only feeds the refresh; the update is
    torch's. The official ``CoapAdafactor`` instead uses HF's optional ``beta1`` EMA of *lr-scaled,
    clipped, normalised updates* as both the update and the correlation input, and crashes with
    ``KeyError: 'exp_avg'`` at the first refresh when ``beta1`` is None (its default, spec §12).

    Args:
        params, rank, rank_ratio, projection, update_interval, reproject_factor, scale: as
            :class:`~coap_compile.reference.CoapAdamW`.
        lr, beta2_decay, eps, d, weight_decay: as ``torch.optim.Adafactor`` (same defaults).
        restore_state: after each refresh map ``coap_exp_avg`` into the new basis,
            ``M ← (M P_oldᵀ) P_new``; the factored second moment is left alone (as official).
        first_moment_beta: ``β`` of ``coap_exp_avg`` (in ``[0, 1)``).

    State per parameter (tensors only): ``step`` (0-d float32, CPU); unprojected 2-D+: ``row_var``
    ``(…, R, 1)``, ``col_var`` ``(…, 1, C)``, 1-D/0-D: ``variance``, in the parameter's dtype;
    projected: ``row_var`` ``(M, 1)``, ``col_var`` ``(1, r)``, ``proj`` ``(N, r)``, ``coap_exp_avg``
    ``(M, r)`` (COAP only) in float32 (float64 for float64 params), plus policy extras (Flora ``seed``).

    Other deliberate differences from the official code: torch's Adafactor (relative step
    ``min(lr, 1/√t)`` always on, ``α`` scaled by ``RMS(W)``, weight decay ``1 − lr·wd`` with the raw
    ``lr``, ``ε₁`` inside the clamp) instead of HF's (``scale_parameter``, ``relative_step=False``,
    ``wd·lr_t`` decay); in canonical orientation the row/column roles of a wide matrix are swapped
    (``row`` = the official ``col``), which leaves ``V̂`` unchanged up to rounding; ``P`` is ``N×r``
    float32 and no ``P.grad`` buffer is kept; a bf16 parameter's projected update is computed in float32
    and rounded once when added to the weight.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        rank_ratio: float | None = None,
        projection: str | ProjectionPolicy = "coap",
        update_interval: int = 32,
        reproject_factor: int = 5,
        scale: float = 1.0,
        restore_state: bool = False,
        first_moment_beta: float = 0.9,
    ) -> None:
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "first_moment_beta": first_moment_beta,
            **projection_defaults(
                rank, rank_ratio, projection, update_interval, reproject_factor, scale, restore_state
            ),
        }
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0)
        check_number("beta2_decay", group["beta2_decay"], high=0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"eps must be a pair (eps1 or None, eps2), got eps={eps!r}")
        if eps[0] is not None:
            check_number("eps[0]", eps[0], low=0.0)
        check_number("eps[1]", eps[1], low=0.0)
        check_number("d", group["d"], low=1.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        check_number("first_moment_beta", group["first_moment_beta"], low=0.0, high=1.0, high_open=True)

    def _init_state(self, state: dict[str, Tensor], like: Tensor, policy: ProjectionPolicy | None) -> None:
        if like.dim() > 1:
            state["row_var"] = like.new_zeros((*like.shape[:-1], 1))
            state["col_var"] = like.new_zeros((*like.shape[:-2], 1, like.shape[-1]))
        else:
            state["variance"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        if policy is not None and policy.needs_first_moment:
            state["coap_exp_avg"] = torch.zeros_like(like)

    def _first_moment(self, state: dict[str, Tensor]) -> Tensor | None:
        return state.get("coap_exp_avg")

    def _restore_targets(self, state: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return ([state["coap_exp_avg"]] if "coap_exp_avg" in state else []), []

    def _update(self, group: dict[str, Any], p: Tensor, grad: Tensor, low: LowRank | None) -> None:
        state = self.state[p]
        lr, wd, d, beta2_decay = group["lr"], group["weight_decay"], group["d"], group["beta2_decay"]
        eps1, eps2 = group["eps"]
        g = grad if low is None else low.grad
        if eps1 is None:
            eps1 = torch.finfo(g.dtype).eps

        step_t = state["step"]
        step_t += 1
        step = step_t.item()
        one_minus_beta2_t = step**beta2_decay
        rho_t = min(lr, 1 / (step**0.5))
        alpha = max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * rho_t
        if wd != 0:
            p.mul_(1 - lr * wd)
        if "coap_exp_avg" in state:
            state["coap_exp_avg"].lerp_(g, 1 - group["first_moment_beta"])

        if g.dim() > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            row_mean = torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1))
            row_var.lerp_(row_mean, one_minus_beta2_t)
            col_mean = torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2))
            col_var.lerp_(col_mean, one_minus_beta2_t)
            var_estimate = row_var @ col_var
            var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            variance = state["variance"]
            variance.lerp_(g * g, one_minus_beta2_t)
            var_estimate = variance.clone()

        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
        update.mul_(g)
        denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
        if low is None:
            p.add_(update, alpha=-alpha / denom)
        else:
            low.apply_back(p, update, group["scale"], -alpha / denom)
