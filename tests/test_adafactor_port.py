"""The tensor-only Adafactor port against ``torch.optim.Adafactor`` (the oracle), and its captured graph."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, randn, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.capture import capture, init_states, run_captured, scalar_dtype
from coap_compile.capture.adafactor_port import (
    adafactor_factored_update,
    adafactor_unfactored_update,
    resolve_eps1,
)

# fp32: the port reduces with mean(g²) instead of ‖g‖²/n and keeps its 0-d scalars as tensors;
# observed ≤ 7e-8 relative over 10 steps. fp64: observed ≤ 2e-16.
TOL = {torch.float32: 1e-6, torch.float64: 1e-13}

shapes = st.one_of(
    st.tuples(st.integers(1, 9)),
    st.tuples(st.integers(1, 8), st.integers(1, 8)),
    st.tuples(st.just(1), st.integers(2, 9)),
    st.tuples(st.integers(2, 9), st.just(1)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)),
)
hyper = st.fixed_dictionaries(
    {
        "beta2_decay": st.sampled_from([-0.8, -0.5, -1.0]),
        "eps": st.sampled_from([(None, 1e-3), (1e-30, 1e-3), (1e-3, 1e-1), (None, 10.0)]),
        "d": st.sampled_from([1.0, 1.25, 4.0]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "maximize": st.booleans(),
    }
)


def port_kwargs(hp):
    eps1, eps2 = hp["eps"]
    keys = ("d", "beta2_decay", "weight_decay", "maximize")
    return {"eps1": eps1, "eps2": eps2, **{k: hp[k] for k in keys}}


def fresh_state(p):
    if p.dim() < 2:
        return [torch.zeros_like(p)]
    return [p.new_zeros(*p.shape[:-1], 1), p.new_zeros(*p.shape[:-2], 1, p.shape[-1])]


@given(seed=seeds, shape=shapes, hp=hyper, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_port_matches_torch_adafactor(seed, shape, hp, dtype):
    gen = torch.Generator().manual_seed(seed)
    lrs = [float(x) for x in 10 ** torch.empty(10, dtype=torch.float64).uniform_(-3, 0, generator=gen)]
    p_ref = randn(seed, *shape, dtype=dtype, scale=float(torch.rand((), generator=gen)) * 3)
    opt = torch.optim.Adafactor([p_ref], lr=lrs[0], foreach=False, **hp)
    p, states = p_ref.clone(), fresh_state(p_ref)
    step = torch.zeros((), dtype=torch.float64)
    names = ("row_var", "col_var") if p.dim() >= 2 else ("variance",)
    peak = float(p_ref.detach().double().norm())
    for k, lr in enumerate(lrs):
        g = randn(seed + 1 + k, *shape, dtype=dtype)
        opt.param_groups[0]["lr"] = lr
        p_ref.grad = g
        opt.step()
        lr_t = torch.tensor(lr, dtype=torch.float64)
        if p.dim() >= 2:
            p, row, col, step = adafactor_factored_update(p, g, *states, step, lr_t, **port_kwargs(hp))
            states = [row, col]
        else:
            p, var, step = adafactor_unfactored_update(p, g, *states, step, lr_t, **port_kwargs(hp))
            states = [var]
        what = f"{shape} {dtype} {hp} step {k}"
        assert p.dtype == dtype and all(s.dtype == dtype for s in states)
        # Error relative to the largest ‖p‖ seen so far, not the current one: with a large eps2 the steps
        # are ~eps2·lr and can cancel (seen: seed 0, shape (1,), eps2 = 10: p went +12 → −0.028, and the
        # port's different op order left 2e-6 of the final value, 5e-9 of the peak, in float32).
        peak = max(peak, float(p_ref.detach().double().norm()))
        err = float((p.double() - p_ref.detach().double()).norm()) / max(peak, 1e-30)
        assert err <= TOL[dtype], (
            f"{what}: param error {err:.2e} (relative to peak ‖p‖ {peak:.3g}) > {TOL[dtype]}"
        )
        for name, s in zip(names, states):
            assert_rel_close(s, opt.state[p_ref][name], TOL[dtype], f"{what}: {name}")
        assert step.item() == opt.state[p_ref]["step"].item() == k + 1


@pytest.mark.parametrize("shape", [(5, 3), (7,), (1, 4), (4, 1), (2, 3, 4)])
def test_captured_graph_equals_port_bitwise(shape):
    """The captured graph is the port's op sequence: re-executed on any shape it gives identical bits."""
    hp = {"beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.1, "maximize": False}
    cu = capture(torch.optim.Adafactor, hp, ndim=len(shape))
    p, g = randn(0, *shape), randn(1, *shape)
    states = list(init_states(cu, p).values())
    step, lr = torch.tensor(3.0, dtype=scalar_dtype(p.dtype)), torch.tensor(0.02, dtype=torch.float64)
    got_p, got_states, got_step = run_captured(cu, p, g, states, step, lr, hp)
    fn = adafactor_factored_update if len(shape) >= 2 else adafactor_unfactored_update
    ref = fn(p, g, *states, step, lr, **port_kwargs(hp))
    assert torch.equal(got_p, ref[0]) and torch.equal(got_step, ref[-1])
    for a, b in zip(got_states, ref[1:-1]):
        assert torch.equal(a, b)


def test_port_is_pure():
    p, g = randn(0, 4, 3), randn(1, 4, 3)
    states = fresh_state(p)
    before = [t.clone() for t in (p, g, *states)]
    adafactor_factored_update(p, g, *states, torch.tensor(0.0), torch.tensor(0.1), d=1.0, beta2_decay=-0.8,
                              weight_decay=0.1, eps1=None, eps2=1e-3, maximize=True)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, (p, g, *states)))


def test_eps1_default_is_dtype_epsilon():
    assert resolve_eps1(None, torch.float32) == torch.finfo(torch.float32).eps
    assert resolve_eps1(None, torch.bfloat16) == torch.finfo(torch.bfloat16).eps
    assert resolve_eps1(1e-30, torch.float32) == 1e-30


def test_first_step_uses_full_weight_and_relative_step_size():
    """Step 1: β̂ = 1 so the factors equal the row/col means of g²; ρ = min(lr, 1) and α uses RMS(W)."""
    p, g = randn(0, 6, 4), randn(1, 6, 4)
    new_p, row, col, step = adafactor_factored_update(
        p, g, *fresh_state(p), torch.tensor(0.0), torch.tensor(5.0), d=1.0, beta2_decay=-0.8,
        weight_decay=0.0, eps1=None, eps2=1e-3, maximize=False,
    )  # fmt: skip
    assert torch.allclose(row, (g * g).mean(-1, keepdim=True)) and torch.allclose(
        col, (g * g).mean(-2, keepdim=True)
    )
    assert step.item() == 1.0
    rms_p = p.pow(2).mean().sqrt()
    update = g / ((row * col) / row.mean()).sqrt()
    denom = (update.pow(2).mean().sqrt()).clamp(min=1.0)
    assert_rel_close(new_p, p - update * (rms_p * 1.0) / denom, 1e-6, "step 1 closed form")
