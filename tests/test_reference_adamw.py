"""The eager reference CoapAdamW: parameter selection, state layout, exactness against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel_close, least_squares, permutation, randn, run, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.projection import FixedProjection, canonical, top_right_singular_vectors
from coap_compile.reference import CoapAdamW

IDENTITY_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@given(seeds, st.integers(1, 40), st.integers(1, 40), st.integers(1, 48))
def test_state_shapes_both_sides_with_rank_clamping(seed, m, n, rank):
    w = randn(seed, m, n).requires_grad_()
    opt = CoapAdamW([{"params": [w], "project": True}], rank=rank)
    w.grad = randn(seed + 1, m, n)
    opt.step()
    big, small, r = max(m, n), min(m, n), min(rank, m, n)
    state = opt.state[w]
    assert state["proj"].shape == (small, r) and state["proj"].dtype == torch.float32
    assert state["exp_avg"].shape == (big, r) == state["exp_avg_sq"].shape
    assert state["step"].shape == () and state["step"].dtype == torch.float32


def test_parameter_selection_rules():
    tall, thin, wide = torch.zeros(10, 8), torch.zeros(10, 3), torch.zeros(6, 9)
    bias, cube, forced_off = torch.zeros(10), torch.zeros(3, 4, 5), torch.zeros(12, 12)
    params = [tall, thin, wide, bias, cube]
    opt = CoapAdamW([{"params": params}, {"params": [forced_off], "project": False}], rank=4)
    for p in [*params, forced_off]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[tall]["exp_avg"].shape == (10, 4) and opt.state[tall]["proj"].shape == (8, 4)
    assert opt.state[wide]["exp_avg"].shape == (9, 4) and opt.state[wide]["proj"].shape == (6, 4)
    for p in (thin, bias, cube, forced_off):  # min(shape) <= rank, not 2-D, or project=False
        assert "proj" not in opt.state[p] and opt.state[p]["exp_avg"].shape == p.shape


def test_rank_ratio_projects_every_matrix():
    a, b = torch.zeros(10, 3), torch.zeros(40, 16)
    opt = CoapAdamW([a, b], rank_ratio=2)
    a.grad, b.grad = torch.ones_like(a), randn(0, 40, 16)
    opt.step()
    assert opt.state[a]["proj"].shape == (3, 1)  # max(3 // 2, 1)
    assert opt.state[b]["proj"].shape == (16, 8)


def test_unprojected_params_match_torch_adamw_bit_for_bit():
    params = [randn(0, 12), randn(1, 5, 3), randn(2, 4, 4)]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    o1 = CoapAdamW(ours, lr=1e-2, rank=8)  # the matrices have min(shape) <= 8: not projected
    o2 = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ours, ref)):
            a.grad = randn(100 * step + i, *a.shape)
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_full_rank_permutation_projection_equals_torch_adamw(shape, dtype):
    # Observed errors are exactly 0: X P is a column permutation and (D Pᵀ) undoes it exactly.
    w0 = randn(0, *shape, dtype=dtype)
    ours, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    o1 = CoapAdamW([{"params": [ours], "project": True}], lr=1e-2, projection=FixedProjection(permutation(3)))
    o2 = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    for step in range(10):
        ours.grad = randn(step + 1, *shape, dtype=dtype)
        ref.grad = ours.grad.clone()
        o1.step()
        o2.step()
    assert o1.state[ours]["proj"].shape == (min(shape), min(shape))
    assert_rel_close(ours, ref, IDENTITY_TOL[dtype], f"CoapAdamW vs AdamW {shape} {dtype}")


def test_scale_multiplies_the_projected_update():
    w0 = randn(0, 6, 4, dtype=torch.float64)
    deltas = []
    for scale in (1.0, 2.5):
        w = w0.clone().requires_grad_()
        opt = CoapAdamW(
            [{"params": [w], "project": True}],
            weight_decay=0.0,
            scale=scale,
            projection=FixedProjection(permutation(1)),
        )
        w.grad = randn(1, 6, 4, dtype=torch.float64)
        opt.step()
        deltas.append(w.detach() - w0)
    # float64: the difference w − w0 (size ~1e-3 against entries ~1) keeps ~1e-13 relative accuracy
    assert_rel_close(deltas[1], 2.5 * deltas[0], 1e-10, "scaled update")


def test_svd_recalibration_gives_orthonormal_basis():
    w = randn(0, 24, 16).requires_grad_()
    opt = CoapAdamW([w], rank=5, update_interval=2, reproject_factor=2)
    eye = torch.eye(5)
    for step in range(5):  # k = 0 init, 2 correlation, 4 svd (on the 5th call)
        w.grad = randn(step + 10, 24, 16)
        opt.step()
        p = opt.state[w]["proj"]
        if step == 2:  # right after the correlation step P is generally not orthonormal any more
            assert float((p.t() @ p - eye).abs().max()) > 1e-6
    assert float((p.t() @ p - eye).abs().max()) < 1e-5


@pytest.mark.parametrize("restore", [False, True])
def test_moments_across_a_refresh(restore):
    beta1, beta2 = 0.9, 0.999
    w = randn(0, 20, 12).requires_grad_()
    opt = CoapAdamW([w], rank=4, update_interval=2, reproject_factor=3, restore_state=restore)
    for step in range(2):
        w.grad = randn(step + 1, 20, 12)
        opt.step()
    state = opt.state[w]
    m_old, v_old, p_old = (state[k].clone() for k in ("exp_avg", "exp_avg_sq", "proj"))
    w.grad = randn(9, 20, 12)
    opt.step()  # k = 2: correlation step
    p_new = state["proj"]
    assert not torch.equal(p_new, p_old)
    g_low = w.grad @ p_new
    if restore:
        m_old, v_old = (m_old @ p_old.t()) @ p_new, ((v_old.sqrt() @ p_old.t()) @ p_new).square()
    # fp32 matmul rounding: observed ~2e-7
    assert_rel_close(state["exp_avg"], beta1 * m_old + (1 - beta1) * g_low, 1e-5, "exp_avg")
    assert_rel_close(state["exp_avg_sq"], beta2 * v_old + (1 - beta2) * g_low.square(), 1e-5, "exp_avg_sq")


@pytest.mark.parametrize("projection", ["coap", "galore", "flora"])
def test_loss_falls_on_least_squares(projection):
    w, b, loss_fn = least_squares(0, 24, 16)
    opt = CoapAdamW([w, b], lr=0.3, rank=4, projection=projection, update_interval=5, reproject_factor=2)
    losses = run(opt, loss_fn, 40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses  # observed ratios 0.18-0.24


def test_per_group_projection_settings():
    a, b = randn(0, 16, 8).requires_grad_(), randn(1, 16, 8).requires_grad_()
    opt = CoapAdamW([{"params": [a], "rank": 2}, {"params": [b], "projection": "galore"}], rank=3)
    a.grad, b.grad = randn(2, 16, 8), randn(3, 16, 8)
    opt.step()
    assert opt.state[a]["proj"].shape == (8, 2)
    assert torch.equal(opt.state[b]["proj"], top_right_singular_vectors(canonical(b.grad)[0], 3))


def test_bf16_params_keep_float32_projection_and_moments():
    w = randn(0, 16, 12, dtype=torch.bfloat16).requires_grad_()
    opt = CoapAdamW([w], lr=1e-2, rank=4, update_interval=2, reproject_factor=2)
    for step in range(5):
        w.grad = randn(step + 1, 16, 12, dtype=torch.bfloat16)
        opt.step()
    state = opt.state[w]
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    assert {k: v.dtype for k, v in state.items()} == dict.fromkeys(state, torch.float32)


def test_closure_is_evaluated_with_grad_enabled():
    w, b, loss_fn = least_squares(1, 8, 6)
    opt = CoapAdamW([w, b], rank=2)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    assert opt.step(closure) is not None and "proj" in opt.state[w]
