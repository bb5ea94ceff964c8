"""Issue 11 through the optimizer: Tucker projection of 4-D convolution weights (``conv_rank_ratio``).

The Tucker math itself (HOOI, the correlation step on the factors, restore) is tested in
``test_tucker.py``; here: selection and ranks, the identity properties at full rank, exact memory,
the refresh schedule, resume, and that any base compiles for the 4-D core."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import randn
from torch import nn

import coap_compile
from coap_compile.projection.tucker import TuckerPolicy


class FixedTucker(TuckerPolicy):
    """Fixed factors (``make(C, r) -> C×r``) and no refresh: for the identity properties."""

    def __init__(self, make):
        super().__init__(update_interval=10**9)
        self.make = make

    def init_state(self, g, ranks):
        return {f"proj{i}": self.make(g.shape[i], r, g.dtype) for i, r in enumerate(ranks)}

    def refresh_kind(self, k):
        return "init" if k == 0 else ""


def _orthogonal(seed):
    def make(n, r, dtype):
        q, _ = torch.linalg.qr(randn(seed + n, n, n, dtype=torch.float64))
        return q[:, :r].to(dtype)

    return make


def _permutation(seed):
    def make(n, r, dtype):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + n))
        return torch.eye(n, dtype=dtype)[:, idx][:, :r]

    return make


@pytest.mark.parametrize(
    ("base", "kw", "make", "tol"),
    [
        # SGD with momentum is linear: orthogonal factors at full rank reproduce it (re-associated sums,
        # observed ≤ 2e-7 relative in fp32).
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, _orthogonal(1), 1e-6),
        # AdamW is elementwise: permutation factors only permute entries (observed ≤ 6e-8, the derived
        # form re-associates the bias corrections).
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}, _permutation(2), 1e-6),
    ],
    ids=["sgd-orthogonal", "adamw-permutation"],
)
def test_full_rank_tucker_equals_the_base(base, kw, make, tol):
    w = randn(0, 24, 20, 3, 3).requires_grad_()  # 4320 elements: below the threshold, so force the policy
    w_ref = w.detach().clone().requires_grad_()
    big = randn(1, 40, 32, 3, 3).requires_grad_()  # 11,520 elements > 9216: Tucker-projected
    big_ref = big.detach().clone().requires_grad_()
    opt = coap_compile.optimize(
        [{"params": [big]}, {"params": [w], "project": False}], base, rank=8, conv_rank_ratio=1,
        conv_policy=FixedTucker(make), **kw,
    )  # fmt: skip
    assert opt.layout(big).ranks == (40, 32) and not opt.layout(w).projected
    ref = base([big_ref, w_ref], **kw)
    for k in range(6):
        g1, g2 = randn(10 + k, *big.shape), randn(20 + k, *w.shape)
        big.grad, big_ref.grad, w.grad, w_ref.grad = g1, g1.clone(), g2, g2.clone()
        opt.step()
        ref.step()
    err = float((big.detach() - big_ref.detach()).norm() / big_ref.detach().norm())
    assert err < tol, err
    assert torch.equal(w.detach(), w_ref.detach())  # project=False: torch's own optimizer


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1),  # 9216 elements: not above the threshold
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),  # two modes
        nn.ReLU(),
        nn.Conv2d(64, 128, (3, 1), padding=(1, 0)),  # kw == 1: mode 0 only (official rule)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 10),
    )


def _train(net, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 16, 8, 8, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_selection_ranks_threshold_and_exact_memory():
    net = _convnet()
    opt = coap_compile.optimize(net, torch.optim.AdamW, rank=8, conv_rank_ratio=4, lr=1e-3)
    plans = {name: opt.layout(p) for name, p in net.named_parameters()}
    assert not plans["0.weight"].projected  # numel 9216 is not > 9216
    assert plans["2.weight"].ranks == (32, 32)  # 64 // √4
    assert plans["4.weight"].ranks == (32,)  # single mode: 128 // 4
    assert plans["7.weight"].rank == 8 and not plans["7.bias"].projected
    _train(net, opt, 3)
    real = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    assert real == opt.memory_plan().total_bytes
    # closed form for 2.weight: U0 64×32 + U1 64×32 (fp32) + exp_avg, exp_avg_sq at the core 32×32×3×3 + step
    row = next(r for r in opt.memory_plan().rows if r.name == "2.weight")
    assert row.state_bytes == 4 * (2 * 64 * 32 + 2 * 32 * 32 * 9) + 4
    assert row.base_bytes == 4 * 2 * 64 * 64 * 9 + 4
    plain = coap_compile.optimize(_convnet(), torch.optim.AdamW, rank=8, lr=1e-3)  # conv_rank_ratio=None
    assert not any(plain.layout(p).ranks for p in plain.projected_parameters())
    assert "Tucker-projected 4-D weights: 2" in opt.explain()


def test_refresh_schedule_moves_the_factors_when_due():
    net = _convnet()
    opt = coap_compile.optimize(
        net, torch.optim.AdamW, rank=8, conv_rank_ratio=4, update_interval=2, reproject_factor=2, lr=1e-2,
        correlation="normalized",
    )  # fmt: skip
    w = net[2].weight
    changed = {}
    for k in range(6):
        before = (
            {n: t.clone() for n, t in opt.state[w].items() if n.startswith("proj")} if opt.state[w] else {}
        )
        _train(net, opt, 1, seed=k)
        if before:
            changed[k] = not torch.equal(before["proj0"], opt.state[w]["proj0"])
    # k = 2: correlation step, k = 4: warm HOOI sweep; k = 1, 3, 5: nothing
    assert changed == {1: False, 2: True, 3: False, 4: True, 5: False}, changed


@pytest.mark.parametrize(
    "base", [torch.optim.AdamW, torch.optim.Adafactor, torch.optim.SGD, torch.optim.RMSprop]
)
@pytest.mark.parametrize("restore", [False, True])
def test_resume_is_bit_identical_across_refreshes(base, restore):
    kw = {"momentum": 0.9} if base is torch.optim.SGD else {}

    def build():
        net = _convnet()
        return net, coap_compile.optimize(
            net, base, rank=8, conv_rank_ratio=4, update_interval=2, reproject_factor=2, lr=1e-3,
            restore_state=restore, **kw,
        )  # fmt: skip

    net_a, opt_a = build()
    _train(net_a, opt_a, 3)
    buf = io.BytesIO()
    torch.save({"model": net_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(net_a, opt_a, 4, seed=1)  # crosses a correlation step (k = 6) and a HOOI sweep (k = 4)
    net_b, opt_b = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    _train(net_b, opt_b, 4, seed=1)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(a, b)


def test_conv_rank_ratio_is_validated_and_rebases():
    net = _convnet()
    with pytest.raises(ValueError, match="conv_rank_ratio must be None or a positive number, got 0"):
        coap_compile.optimize(net, torch.optim.AdamW, rank=8, conv_rank_ratio=0)
    opt = coap_compile.optimize(net, torch.optim.AdamW, rank=8, conv_rank_ratio=4, lr=1e-3)
    _train(net, opt, 2)
    for g in opt.param_groups:
        g["conv_rank_ratio"] = 16  # ranks 64 // 4 = 16: re-based at the next step
    _train(net, opt, 1)
    st = opt.state[net[2].weight]
    assert st["proj0"].shape == (64, 16) and st["exp_avg"].shape == (16, 16, 3, 3)
    assert opt.state[net[2].weight]["step"].item() == 3
