"""Shared test utilities: seeded tensors (replayable hypothesis failures) and verbose comparisons."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """A standard-normal tensor built from a seeded generator, so a drawn seed replays the failure."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / max(‖expected‖, tiny), computed in float64. NaN anywhere gives inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst at {idx}: "
            f"{actual[idx].item()!r} vs {expected[idx].item()!r}"
        )


def permutation(seed: int):
    """``make_proj`` for FixedProjection: a random N×N permutation matrix (requires r = N)."""

    def make(n: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return torch.eye(n, dtype=dtype, device=device)[:, idx][:, :r]

    return make


def least_squares(seed: int, m: int, n: int):
    """``mean((A Wᵀ + b − Y)²)`` with a rank-3 target ``Y = A W*ᵀ``; returns (W, b, loss_fn)."""
    a = randn(seed, 48, n)
    y = a @ (randn(seed + 1, n, 3) @ randn(seed + 2, 3, m))
    w = randn(seed + 3, m, n).requires_grad_()
    b = torch.zeros(m, requires_grad=True)
    return w, b, lambda: ((a @ w.t() + b - y) ** 2).mean()


def run(opt: torch.optim.Optimizer, loss_fn, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class WeightAveragingSGD(torch.optim.Optimizer):
    """SGD that also keeps an EMA of the weight (like ASGD's ``ax``): its state reads the weight, so it
    cannot live in a low-rank space (the compiler must refuse it, naming the node)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["avg"] = torch.zeros_like(p)
                st["step"] += 1
                st["avg"].lerp_(p, 0.1)
                p.sub_(p.grad * group["lr"])


def spectral_grad(
    seed: int, m: int, n: int, dtype: torch.dtype = torch.float32, decay: float = 0.7
) -> torch.Tensor:
    """A seeded ``m×n`` matrix ``U diag(s) Vᵀ`` with random orthonormal ``U, V`` and ``s_i = decay^i``.

    Tests that compare two runs across an SVD refresh of ``P`` use this: with nearly equal singular values
    (common in i.i.d. Gaussian matrices) the singular vectors are ill-conditioned, so a rounding-level
    difference between the runs before the refresh rotates ``P`` afterwards (seen: a 12×11 Gaussian
    gradient, kernels vs eager, 1e-8 before the SVD and 110 % after it). Real gradients have decaying
    spectra; a 30 % gap between consecutive singular values keeps the refresh well conditioned.
    """
    k = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.t()).to(dtype)


def orthonormal(seed: int):
    """``make_proj`` for FixedProjection: an N×r matrix with orthonormal columns (float64 QR, then cast)."""

    def make(n: int, r: int, dtype: torch.dtype, device) -> torch.Tensor:
        q, _ = torch.linalg.qr(randn(seed, n, r, dtype=torch.float64))
        return q.to(dtype=dtype, device=device)

    return make


class VirtualLowRank:
    """Oracle for a projected weight with a fixed ``P``: torch's own ``cls`` steps a *virtual* ``M×r``
    parameter ``z`` fed ``X̃ = X P``, and ``W ← decay·W + (z' − z) Pᵀ`` (transposed back for a wide
    weight). ``X = G``, or ``G + λW`` for Adam's L2 decay (what the compiler finds); AdamW's decoupled
    decay is ``decay = 1 − lr·λ`` with the group's current lr. ``wd`` is the oracle's λ (torch's own
    decay must not touch ``z``); every other hyperparameter lives in ``opt.param_groups[0]``, so a
    scheduler or an edit applies to the oracle exactly as to the optimizer under test."""

    def __init__(self, cls, w0: torch.Tensor, proj: torch.Tensor, **kw):
        self.w, self.p = w0.detach().clone(), proj
        m, n = w0.shape
        self.wide = m < n
        self.wd = kw.get("weight_decay", 0.0)
        self.decoupled = cls is torch.optim.AdamW or bool(kw.get("decoupled_weight_decay", False))
        self.z = torch.zeros(max(m, n), proj.shape[1], dtype=w0.dtype, requires_grad=True)
        self.opt = cls([self.z], **{**kw, "weight_decay": 0.0})

    def step(self, g: torch.Tensor) -> torch.Tensor:
        x = g if not self.wide else g.t()
        w = self.w if not self.wide else self.w.t()
        lr = float(self.opt.param_groups[0]["lr"])
        if self.wd and not self.decoupled:
            x = x + self.wd * w
        decay = 1.0 - lr * self.wd if self.decoupled else 1.0
        z_old = self.z.detach().clone()
        self.z.grad = x @ self.p
        self.opt.step()
        upd = (self.z.detach() - z_old) @ self.p.t()
        self.w = decay * self.w + (upd if not self.wide else upd.t())
        return self.w


def local_state_bytes(states) -> int:
    """Bytes of the tensors of ``states`` (an optimizer's ``state``: parameter → state dict) that this
    process holds: a DTensor counts its local shard only (what a rank really allocates)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for st_ in states.values():
        for v in st_.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if isinstance(v, DTensor) else v
                total += v.numel() * v.element_size()
    return total
