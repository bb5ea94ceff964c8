"""The eager reference CoapAdafactor: state layout, exactness against torch.optim.Adafactor, refreshes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, least_squares, permutation, randn, run, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.projection import FixedProjection
from coap_compile.reference import CoapAdafactor

IDENTITY_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@given(seeds, st.integers(1, 40), st.integers(1, 40), st.integers(1, 48))
def test_state_shapes_both_sides(seed, m, n, rank):
    w = randn(seed, m, n).requires_grad_()
    opt = CoapAdafactor([{"params": [w], "project": True}], rank=rank)
    w.grad = randn(seed + 1, m, n)
    opt.step()
    big, small, r = max(m, n), min(m, n), min(rank, m, n)
    state = opt.state[w]
    assert set(state) == {"step", "proj", "row_var", "col_var", "coap_exp_avg"}
    assert state["proj"].shape == (small, r)
    assert state["row_var"].shape == (big, 1) and state["col_var"].shape == (1, r)
    assert state["coap_exp_avg"].shape == (big, r)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_first_moment_only_kept_for_policies_that_read_it():
    w = randn(0, 16, 8).requires_grad_()
    opt = CoapAdafactor([w], rank=3, projection="galore")
    w.grad = randn(1, 16, 8)
    opt.step()
    assert set(opt.state[w]) == {"step", "proj", "row_var", "col_var"}


def test_coap_exp_avg_is_a_gradient_ema_in_the_projected_space():
    beta = 0.8
    w = randn(0, 16, 8).requires_grad_()
    opt = CoapAdafactor([w], rank=3, first_moment_beta=beta, update_interval=100)
    grads = [randn(i + 1, 16, 8) for i in range(3)]
    expected = torch.zeros(16, 3)
    for g in grads:
        w.grad = g
        opt.step()
        expected = beta * expected + (1 - beta) * (g @ opt.state[w]["proj"])
    # fp32 lerp vs mul-add: observed ~1e-8
    assert_rel_close(opt.state[w]["coap_exp_avg"], expected, 1e-6, "coap_exp_avg")


def test_unprojected_params_match_torch_adafactor_bit_for_bit():
    params = [randn(0, 12), randn(1, 5, 3), randn(2, 4, 4), randn(3, 2, 3, 4), randn(4, 1).reshape(())]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    o1 = CoapAdafactor(ours, weight_decay=0.1, rank=8)  # matrices with min(shape) <= 8: not projected
    o2 = torch.optim.Adafactor(ref, weight_decay=0.1, foreach=False)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ours, ref)):
            a.grad = randn(100 * step + i, a.numel()).reshape(a.shape)  # also 0-d
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_full_rank_permutation_projection_equals_torch_adafactor(shape, dtype):
    # The permutation changes the summation order of the row/column means and of RMS(update); observed
    # ~1e-8 (fp32) and ~3e-18 (fp64). For the wide shape the canonical orientation also swaps the
    # row/col roles (mean(row) vs mean(col) normalisation: equal up to rounding).
    w0 = randn(0, *shape, dtype=dtype)
    ours, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    o1 = CoapAdafactor(
        [{"params": [ours], "project": True}], weight_decay=0.05, projection=FixedProjection(permutation(3))
    )
    o2 = torch.optim.Adafactor([ref], weight_decay=0.05, foreach=False)
    for step in range(10):
        ours.grad = randn(step + 1, *shape, dtype=dtype)
        ref.grad = ours.grad.clone()
        o1.step()
        o2.step()
    assert_rel_close(ours, ref, IDENTITY_TOL[dtype], f"CoapAdafactor vs Adafactor {shape} {dtype}")


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_works_past_several_refreshes(shape):
    w, b, loss_fn = least_squares(2, *shape)
    opt = CoapAdafactor([w, b], lr=0.3, rank=4, update_interval=2, reproject_factor=2)
    losses = run(opt, loss_fn, 20)  # correlation at k = 2, 6, 10, …; svd at k = 4, 8, …
    assert all(torch.isfinite(torch.tensor(losses))) and torch.isfinite(w).all()
    assert losses[-1] < 0.5 * losses[0], losses  # observed ratios ~0.1-0.2
    p = opt.state[w]["proj"]
    assert p.shape == (min(shape), 4)


@pytest.mark.parametrize("projection", ["coap", "galore", "flora"])
def test_loss_falls_on_least_squares(projection):
    w, b, loss_fn = least_squares(0, 24, 16)
    opt = CoapAdafactor([w, b], lr=0.3, rank=4, projection=projection, update_interval=5, reproject_factor=2)
    losses = run(opt, loss_fn, 40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.3 * losses[0], losses  # observed ratios 0.05-0.10


@pytest.mark.parametrize("restore", [False, True])
def test_first_moment_across_a_refresh(restore):
    beta = 0.9
    w = randn(0, 20, 12).requires_grad_()
    opt = CoapAdafactor([w], rank=4, update_interval=2, reproject_factor=3, restore_state=restore)
    for step in range(2):
        w.grad = randn(step + 1, 20, 12)
        opt.step()
    state = opt.state[w]
    m_old, p_old = state["coap_exp_avg"].clone(), state["proj"].clone()
    row, col = state["row_var"].clone(), state["col_var"].clone()
    w.grad = randn(9, 20, 12)
    opt.step()  # k = 2: correlation step, which reads coap_exp_avg before its update
    p_new = state["proj"]
    if restore:
        m_old = (m_old @ p_old.t()) @ p_new
    # fp32 matmul rounding: observed ~2e-7
    expected = beta * m_old + (1 - beta) * (w.grad @ p_new)
    assert_rel_close(state["coap_exp_avg"], expected, 1e-5, "coap_exp_avg")
    # the factored second moment is never restored: it is just updated with the new projected gradient
    assert not torch.equal(state["row_var"], row) and not torch.equal(state["col_var"], col)
