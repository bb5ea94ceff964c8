"""How far each projection policy moves ``P`` per refresh, and how well ``P`` then fits the gradients.

:func:`subspace_study` replays a stream of gradients (one dict ``{name: gradient}`` per step) through several
policies side by side, each with its own ``P`` and an Adam-style first moment ``F ← β₁ F + (1 − β₁) X P``
(the state COAP's correlation step reads), without touching the weights. Per policy it reports

* ``<kind>_max_deg`` / ``<kind>_mean_deg``: the largest / the mean principal angle between ``P`` before and
  after each refresh of that kind, median over refreshes and matrices
  (:func:`~coap_compile.projection.linalg.principal_angles`; for DCT the mean is 90° × the share of
  replaced columns, the largest is 90° as soon as one column changes);
* ``residual``: the mean over steps and matrices of ``ρ = ‖X − X P Pᵀ‖² / ‖X‖²`` (the share of the gradient
  the optimizer loses to the projection);
* ``loss``: the mean of the scale-free correlation loss ``ρ · (1 − c̄)``, ``c̄`` = mean cosine of ``F Pᵀ``
  and ``X`` along the weight's rows (the objective COAP's correlation step descends, here measured on *every*
  step, i.e. also on the gradients that come after a refresh).

:func:`demo_gradients` yields the gradient stream of the demo model trained with plain AdamW (so the stream
is the same for every policy). The numbers behind ``DEFAULT_ANGLE`` come from::

    python -m coap_lab.studies.projection   # 112 steps, T_u = 16
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from coap_compile.projection import ProjectionPolicy, canonical, principal_angles, resolve_rank

__all__ = ["demo_gradients", "main", "subspace_study"]


def _cosine_mean(f: Tensor, p: Tensor, x: Tensor, transposed: bool) -> float:
    m_hat = f @ p.t()
    return float(torch.nn.functional.cosine_similarity(m_hat, x, dim=0 if transposed else 1).mean())


def subspace_study(
    grads: Iterable[dict[str, Tensor]],
    policies: dict[str, ProjectionPolicy],
    *,
    rank_ratio: float = 4.0,
    beta1: float = 0.9,
) -> list[dict[str, object]]:
    """One row per policy (module docstring). ``grads`` yields ``{name: 2-D gradient}`` per step."""
    states: dict[tuple[str, str], dict[str, Tensor]] = {}
    moments: dict[tuple[str, str], Tensor] = {}
    angles: dict[str, dict[str, list[tuple[float, float]]]] = {v: {} for v in policies}
    resid: dict[str, list[float]] = {v: [] for v in policies}
    loss: dict[str, list[float]] = {v: [] for v in policies}
    for k, step in enumerate(grads):
        for name, g in step.items():
            x, transposed = canonical(g.detach().float())
            rank = resolve_rank(g.shape, None, rank_ratio)
            for v, policy in policies.items():
                key = (v, name)
                if k == 0:
                    states[key] = policy.init_state(x, rank)
                    moments[key] = torch.zeros(x.shape[0], rank)
                else:
                    kind = policy.refresh_kind(k)
                    if kind:
                        old = policy.basis(states[key]).clone()
                        policy.refresh(states[key], x, k, first_moment=moments[key], transposed=transposed)
                        new = policy.basis(states[key])
                        theta = torch.rad2deg(principal_angles(old, new))
                        angles[v].setdefault(kind, []).append((float(theta[0]), float(theta.mean())))
                p = policy.basis(states[key])
                xp = x @ p
                rho = float((x - xp @ p.t()).square().sum() / x.square().sum().clamp_min(1e-30))
                resid[v].append(rho)
                if k > 0:
                    loss[v].append(rho * (1.0 - _cosine_mean(moments[key], p, x, transposed)))
                moments[key].lerp_(xp, 1.0 - beta1)
    rows = []
    for v in policies:
        row: dict[str, object] = {"policy": v, "residual": statistics.fmean(resid[v])}
        row["loss"] = statistics.fmean(loss[v]) if loss[v] else float("nan")
        for kind, vals in sorted(angles[v].items()):
            row[f"{kind}_max_deg"] = statistics.median(a for a, _ in vals)
            row[f"{kind}_mean_deg"] = statistics.median(b for _, b in vals)
        rows.append(row)
    return rows


def demo_gradients(
    steps: int = 200,
    *,
    seed: int = 0,
    lr: float = 3e-3,
    warmup: int = 30,
    layers: str = r"layers\.(0|3)\.",
) -> Iterator[dict[str, Tensor]]:
    """Gradients of the demo model's projected weights (``nn.Linear`` in the ``layers`` regex) under AdamW.

    Batch 8 × 128 bytes of the standard library's ``.py`` files, lr with linear warm-up then cosine to 10 %,
    gradient clipping at 1 (the quality benchmark's recipe).
    """
    from coap_lab.data import BatchSampler, load_corpus
    from coap_lab.models import build_llama, demo_config

    cfg = demo_config()
    model = build_llama(cfg, seed=seed)
    pattern = re.compile(layers)
    tracked = {
        n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)
    }
    sampler = BatchSampler(load_corpus(max_bytes=4_000_000).train, 8, cfg.max_seq_len, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for k in range(steps):
        frac = (k + 1) / warmup if k < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * k / steps))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, frac)
        opt.zero_grad(set_to_none=True)
        model.loss(sampler.next()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        yield {n: w.grad.detach().clone() for n, w in tracked.items()}
        opt.step()


def main(
    steps: int = 112,
    update_interval: int = 16,
    angles_deg: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0),
) -> None:
    """Print the study table for the paper step, the SVD-only schedule, normalized steps at ``angles_deg`` and
    DCT, all refreshing every ``update_interval`` steps (``reproject_factor`` 5)."""
    from coap_compile.projection import CoapPolicy, DctPolicy

    def coap(**kw) -> CoapPolicy:
        return CoapPolicy(update_interval=update_interval, **kw)

    policies: dict[str, ProjectionPolicy] = {
        "paper": coap(),
        "off (svd only)": coap(correlation="off"),
        **{
            f"normalized {a:g}°": coap(correlation="normalized", correlation_angle=math.radians(a))
            for a in angles_deg
        },
        "dct": DctPolicy(update_interval=update_interval),
    }
    rows = subspace_study(demo_gradients(steps), policies)
    keys = sorted({k for r in rows for k in r if k != "policy"})
    print(f"{'policy':<18}" + "".join(f"{k:>20}" for k in keys))
    for r in rows:
        print(f"{r['policy']:<18}" + "".join(f"{r.get(k, float('nan')):>20.4g}" for k in keys))


if __name__ == "__main__":
    main()
