"""Hand-written :class:`~coap_compile.ir.Epilogue`s and a float64 reference for the kernel tests.

The compiler will derive these from ``torch.optim`` automatically; here they are written out from the
update rules (canonical orientation, ``g = X P``):

* AdamW:  m' = β1·m + (1-β1)·g;  v' = β2·v + (1-β2)·g²;
          D = m'·c1 / (√v' + c2),  c1 = lr·√(1-β2^t)/(1-β1^t),  c2 = eps·√(1-β2^t);
          W ← c0·W − D Pᵀ,  c0 = 1 − lr·wd   (decoupled decay)
* SGD with momentum:  b' = μ·b + g;  D = c0·b';  W ← W − D Pᵀ,  c0 = lr
* RMSprop-like (exercises Abs, Max, Min, x**-1/2):  v' = α·v + (1-α)·|g|²;
          D = c0 · Min(Max(g / √(v' + eps²), -10), 10);  W ← W − D Pᵀ
* Lion-like (exercises sign and a decay):  D = c0·sign(β1·m + (1-β1)·g);  m' = β2·m + (1-β2)·g;
          W ← c1·W − D Pᵀ
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy as sp
import torch
from torch import Tensor

from coap_compile.ir import Epilogue, evaluate_epilogue

step, lr, g = sp.symbols("step lr g")
c0, c1, c2 = sp.symbols("c0 c1 c2")


def adamw(beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, wd: float = 0.01) -> Epilogue:
    m, v, m2, v2, d = sp.symbols("exp_avg exp_avg_sq m_new v_new d")
    bc2 = 1 - sp.Float(beta2) ** step
    scalars = (
        (c0, 1 - lr * wd),
        (c1, lr * sp.sqrt(bc2) / (1 - sp.Float(beta1) ** step)),
        (c2, eps * sp.sqrt(bc2)),
    )
    body = (
        (m2, beta1 * m + (1 - beta1) * g),
        (v2, beta2 * v + (1 - beta2) * g**2),
        (d, m2 * c1 / (sp.sqrt(v2) + c2)),
    )
    return Epilogue(("exp_avg", "exp_avg_sq"), scalars, body, (m2, v2), d, c0, -1.0)


def sgd_momentum(momentum: float = 0.9) -> Epilogue:
    b, b2, d = sp.symbols("momentum_buffer buf_new d")
    body = ((b2, momentum * b + g), (d, c0 * b2))
    return Epilogue(("momentum_buffer",), ((c0, lr),), body, (b2,), d, sp.Integer(1), -1.0)


def rmsprop_like(alpha: float = 0.99, eps: float = 1e-8) -> Epilogue:
    v, v2, u, d = sp.symbols("square_avg v_new u d")
    body = (
        (v2, alpha * v + (1 - alpha) * sp.Abs(g) ** 2),
        (u, g * (v2 + eps**2) ** sp.Rational(-1, 2)),
        (d, c0 * sp.Min(sp.Max(u, -10), 10)),
    )
    return Epilogue(("square_avg",), ((c0, lr),), body, (v2,), d, sp.Integer(1), -1.0)


def lion_like(beta1: float = 0.9, beta2: float = 0.99, wd: float = 0.1) -> Epilogue:
    m, m2, d = sp.symbols("exp_avg m_new d")
    body = ((d, c0 * sp.sign(beta1 * m + (1 - beta1) * g)), (m2, beta2 * m + (1 - beta2) * g))
    return Epilogue(("exp_avg",), ((c0, lr), (c1, 1 - lr * wd)), body, (m2,), d, c1, -1.0)


EPILOGUES = {"adamw": adamw(), "sgd_momentum": sgd_momentum(), "rmsprop_like": rmsprop_like()}


def scalars64(ep: Epilogue, t: float, lr_value: float) -> Tensor:
    """The hoisted scalars in float64 (the kernels get them rounded to float32)."""
    vals = [float(sp.lambdify((step, lr), e, "math")(float(t), float(lr_value))) for _, e in ep.scalars]
    return torch.tensor(vals, dtype=torch.float64)


def initial_states(ep: Epilogue, m: int, r: int, seed: int) -> list[Tensor]:
    """Non-trivial starting states (second-moment-like states non-negative)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in ep.state_names:
        s = torch.randn(m, r, generator=gen, dtype=torch.float64) * 0.1
        out.append((s.abs() * 0.01 if "sq" in name or "square" in name else s).float())
    return out


def reference_step(
    ep: Epilogue, x: Tensor, p: Tensor, states: Sequence[Tensor], t: float, lr_value: float
) -> tuple[float, Tensor, list[Tensor], Tensor]:
    """One projected step in float64: ``(decay, U, new states, D)`` with ``W_new = decay·W + U``."""
    c = scalars64(ep, t, lr_value)
    gp = x.double() @ p.double()
    new, d = evaluate_epilogue(ep, gp, [s.double() for s in states], c)
    d = torch.broadcast_to(d, gp.shape).clone()
    decay = sp.sympify(ep.decay)
    dec = 1.0 if decay == 1 else float(decay.subs({s: c[i].item() for i, s in enumerate(ep.scalar_symbols)}))
    return dec, ep.scale * (d @ p.double().T), [torch.broadcast_to(s, gp.shape).clone() for s in new], d


def w_tolerance(w_ref: Tensor, w_before: Tensor, dtype: torch.dtype) -> Tensor:
    """Elementwise bound for |W_kernel − W_ref|: fp32 error of the update + one round-to-nearest to W's
    dtype (unit roundoff ``u·|W|``; two fp32 ulps for fp32 W)."""
    unit = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    upd = (w_ref - w_before.double()).abs().max().item() if w_ref.numel() else 0.0
    return unit * w_ref.abs() + 2e-5 * upd + 1e-30


def is_close_w(actual: Tensor, w_before: Tensor, decay: float, upd: Tensor) -> tuple[bool, float]:
    """Whether ``actual`` ≈ ``decay·w_before + upd`` (see :func:`w_tolerance`); also the worst err/tol."""
    w_ref = decay * w_before.double() + upd
    err = (actual.double() - w_ref).abs()
    tol = w_tolerance(w_ref, w_before, actual.dtype)
    worst = float((err / tol).max()) if err.numel() else 0.0
    return bool((err <= tol).all()), worst


__all__ = [
    "EPILOGUES",
    "adamw",
    "initial_states",
    "is_close_w",
    "lion_like",
    "reference_step",
    "rmsprop_like",
    "scalars64",
    "sgd_momentum",
    "w_tolerance",
]
