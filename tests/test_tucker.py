"""Tucker COAP math (coap_compile.projection.tucker) against independent float64 checks."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randn, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.projection.tucker import (
    MIN_CONV_NUMEL,
    TuckerPolicy,
    core_shape,
    hooi,
    hooi_sweep,
    is_tucker_candidate,
    mode_dot,
    restore_tucker_moments,
    tucker_correlation_gradients,
    tucker_correlation_step,
    tucker_project,
    tucker_project_back,
    tucker_ranks,
    tucker_relative_error,
)

D = torch.float64


def orthonormal(seed: int, n: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(randn(seed, n, r, dtype=D)).Q


def exact_tucker(seed: int, shape, ranks) -> torch.Tensor:
    """``core ×₀ A ×₁ B`` with a random core: Tucker rank exactly ``ranks`` (modes 0 and 1)."""
    core = randn(seed, *ranks, *shape[len(ranks) :], dtype=D)
    out = core
    for mode, r in enumerate(ranks):
        out = mode_dot(out, randn(seed + 1 + mode, shape[mode], r, dtype=D), mode)
    return out


def reference_loss(factors, g, m):
    """The official loss written with torch's own mse_loss / cosine_similarity (autograd reference)."""
    g_hat = g
    for mode, u in enumerate(factors):
        g_hat = torch.tensordot(g_hat, u, dims=([mode], [0])).movedim(-1, mode)
    for mode, u in enumerate(factors):
        g_hat = torch.tensordot(g_hat, u, dims=([mode], [1])).movedim(-1, mode)
    m_hat = m
    for mode, u in enumerate(factors):
        m_hat = torch.tensordot(m_hat, u, dims=([mode], [1])).movedim(-1, mode)
    return F.mse_loss(g_hat, g) * (1 - F.cosine_similarity(m_hat, g, dim=1).mean())


# ------------------------------------------------------------------------------------- rank rules


@pytest.mark.parametrize(
    ("shape", "ratio", "ranks"),
    [
        ((64, 64, 3, 3), 2, (45, 45)),  # 64 // √2 = 45.0
        ((64, 64, 3, 3), 4, (32, 32)),  # √4 = 2 exactly
        ((128, 64, 3, 3), 1.5, (104, 52)),  # 128 // 1.2247 = 104.0, 64 // 1.2247 = 52.0
        ((320, 320, 1, 1), 2, (160,)),  # the ControlNet zero-conv of spec §13: mode 0 only, C_out // ρ
        ((128, 256, 3, 1), 4, (32,)),  # only kw is checked: a 3×1 kernel is single-mode
        ((8, 2, 3, 3), 9, (2, 1)),  # C_in // 3 = 0 → max(1, ·) = 1
        ((3, 3, 3, 3), 1000, (1, 1)),
        ((64, 64, 3, 3), 0.25, (64, 64)),  # ρ < 1: clamped to the dims (deliberate difference)
    ],
)
def test_rank_rule_table(shape, ratio, ranks):
    assert tucker_ranks(shape, ratio) == ranks


@given(c_out=st.integers(1, 600), c_in=st.integers(1, 600), kw=st.integers(1, 4), ratio=st.floats(1, 16))
def test_rank_rule_matches_official_formula(c_out, c_in, kw, ratio):
    got = tucker_ranks((c_out, c_in, 3, kw), ratio)
    if kw == 1:
        assert got == (max(1, int(c_out // ratio)),)
    else:
        s = math.sqrt(ratio)
        assert got == (max(1, int(c_out // s)), max(1, int(c_in // s)))


@pytest.mark.parametrize(
    ("shape", "projected"),
    [
        ((32, 32, 3, 3), False),  # exactly 9216: not projected (numel > 9216 is required)
        ((33, 32, 3, 3), True),
        ((64, 64, 3, 3), True),
        ((1024, 9, 1, 1), False),
        ((1025, 9, 1, 1), True),
        ((64, 1, 3, 3), False),
        ((96, 96), False),  # 2-D: matrix path, never Tucker
        ((4, 48, 8, 8), True),  # 12288
    ],
)
def test_size_threshold(shape, projected):
    assert MIN_CONV_NUMEL == 9216
    assert is_tucker_candidate(shape) is projected


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "2", None])
def test_rank_ratio_errors(bad):
    with pytest.raises(ValueError, match="conv_rank_ratio"):
        tucker_ranks((64, 64, 3, 3), bad)


def test_shape_errors():
    with pytest.raises(ValueError, match="4-D"):
        tucker_ranks((64, 64), 2)
    with pytest.raises(ValueError, match="ranks"):
        core_shape((8, 8, 3, 3), (9, 2))


# ------------------------------------------------------------------------------------------- HOOI


@given(seed=seeds, c_out=st.integers(3, 9), c_in=st.integers(3, 9), k=st.integers(1, 3), data=st.data())
def test_hooi_recovers_exact_tucker_rank(seed, c_out, c_in, k, data):
    r0, r1 = data.draw(st.integers(1, c_out - 1)), data.draw(st.integers(1, c_in - 1))
    g = exact_tucker(seed, (c_out, c_in, k, k + 1), (r0, r1))
    res = hooi(g, (r0, r1))
    recon = tucker_project_back(tucker_project(g, res.factors), res.factors)
    err = float((recon - g).norm() / g.norm())  # independent of HOOI's own error bookkeeping
    assert err < 1e-10, f"exact-rank tensor reconstructed with relative error {err:.2e}"
    for u in res.factors:
        assert torch.allclose(u.t() @ u, torch.eye(u.shape[1], dtype=D), atol=1e-12)


@given(seed=seeds, c_out=st.integers(2, 10), c_in=st.integers(2, 10), data=st.data())
def test_hooi_errors_monotone_and_bounded(seed, c_out, c_in, data):
    r0, r1 = data.draw(st.integers(1, c_out)), data.draw(st.integers(1, c_in))
    g = randn(seed, c_out, c_in, 3, 3, dtype=D)
    res = hooi(g, (r0, r1), max_sweeps=30, tol=0.0)
    errs = res.errors
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errs)), f"HOOI error increased: {errs}"
    # The recorded error is the true one (independent reconstruction).
    assert abs(errs[-1] - float(tucker_relative_error(g, res.factors))) < 1e-12
    # Lower bounds (Eckart–Young on each unfolding): no rank-(r0, r1) Tucker model beats either
    # single-mode truncated SVD.
    for mode, r in ((0, r0), (1, r1)):
        s = torch.linalg.svdvals(g.movedim(mode, 0).reshape(g.shape[mode], -1))
        floor = float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
        assert errs[-1] >= floor - 1e-12


@given(seed=seeds, c_out=st.integers(2, 12), c_in=st.integers(1, 6), data=st.data())
def test_single_mode_is_truncated_svd(seed, c_out, c_in, data):
    """Mode 0 only: the factor spans the top-r0 left singular space; the error is Eckart–Young's."""
    r0 = data.draw(st.integers(1, c_out))
    g = randn(seed, c_out, c_in, 3, 1, dtype=D)
    res = hooi(g, (r0,))
    s = torch.linalg.svdvals(g.reshape(c_out, -1))
    expect = float(s[r0:].square().sum().sqrt() / s.square().sum().sqrt())
    assert res.errors == [pytest.approx(expect, abs=1e-12)]
    assert tucker_project(g, res.factors).shape == (r0, c_in, 3, 1)


def test_hooi_is_deterministic_and_sign_normalised():
    g = randn(0, 12, 10, 3, 3)
    a, b = hooi(g, (5, 4)), hooi(g.clone(), (5, 4))
    for u, v in zip(a.factors, b.factors):
        assert torch.equal(u, v)
        top = u.gather(0, u.abs().argmax(0, keepdim=True))
        assert (top > 0).all()


@given(seed=seeds, data=st.data())
def test_hooi_sweep_is_procrustes_aligned_and_does_not_increase_error(seed, data):
    g = randn(seed, 16, 12, 3, 3, dtype=D)
    init = hooi(g, (6, 5), max_sweeps=0)
    # start from a rotated basis of the same spans: the sweep must rotate back towards it
    start = [u @ orthonormal(seed + 1 + i, u.shape[1], u.shape[1]) for i, u in enumerate(init.factors)]
    new = hooi_sweep(g, start)
    assert float(tucker_relative_error(g, new)) <= init.errors[0] + 1e-12  # HOOI monotonicity
    for u, old in zip(new, start):
        assert torch.allclose(u.t() @ u, torch.eye(u.shape[1], dtype=D), atol=1e-12)
        # Procrustes optimality: Uᵀ U_old is symmetric positive semi-definite
        c = u.t() @ old
        assert torch.allclose(c, c.t(), atol=1e-12)
        assert float(torch.linalg.eigvalsh((c + c.t()) / 2).min()) >= -1e-12
    # same spans as an independently written sweep (the alignment only rotates within each span)
    y0 = torch.einsum("oikl,is->oskl", g, start[1]).reshape(16, -1)
    span0 = torch.linalg.svd(y0, full_matrices=False).U[:, :6]
    y1 = torch.einsum("oikl,or->irkl", g, new[0]).reshape(12, -1)
    span1 = torch.linalg.svd(y1, full_matrices=False).U[:, :5]
    for u, ref in zip(new, (span0, span1)):
        assert torch.allclose(u @ u.t(), ref @ ref.t(), atol=1e-10)


def test_hooi_float32_input_gives_float32_factors():
    res = hooi(randn(2, 8, 8, 3, 3), (4, 4))
    assert all(u.dtype == torch.float32 for u in res.factors)


# ----------------------------------------------------------------------------- project / back


@given(seed=seeds, c_out=st.integers(1, 7), c_in=st.integers(1, 7), kw=st.integers(1, 3))
def test_full_rank_orthogonal_factors_are_identity(seed, c_out, c_in, kw):
    g = randn(seed, c_out, c_in, 2, kw, dtype=D)
    factors = [orthonormal(seed + 1, c_out, c_out)] + ([orthonormal(seed + 2, c_in, c_in)] if kw > 1 else [])
    back = tucker_project_back(tucker_project(g, factors), factors)
    assert torch.allclose(back, g, atol=1e-12, rtol=0)


@given(seed=seeds)
def test_projection_matches_einsum(seed):
    g = randn(seed, 6, 5, 3, 2, dtype=D)
    u0, u1 = orthonormal(seed + 1, 6, 3), orthonormal(seed + 2, 5, 2)
    core = tucker_project(g, [u0, u1])
    assert torch.allclose(core, torch.einsum("oikl,or,is->rskl", g, u0, u1), atol=1e-13)
    x = randn(seed + 3, 3, 2, 3, 2, dtype=D)
    assert torch.allclose(
        tucker_project_back(x, [u0, u1]), torch.einsum("rskl,or,is->oikl", x, u0, u1), atol=1e-13
    )


# ------------------------------------------------------------------------------ correlation step


@given(seed=seeds, kw=st.sampled_from([1, 3]), zero_fibre=st.booleans())
def test_correlation_gradient_matches_autograd(seed, kw, zero_fibre):
    shape = (7, 6, 3, kw)
    ranks = tucker_ranks(shape, 2)
    g = randn(seed, *shape, dtype=D)
    factors = [orthonormal(seed + 1 + i, shape[i], r) + 0.05 * randn(seed + 5 + i, shape[i], r, dtype=D)
               for i, r in enumerate(ranks)]  # fmt: skip
    m = randn(seed + 9, *core_shape(shape, ranks), dtype=D)
    if zero_fibre:  # M̂ = 0 on fibre (0, :, 0, 0): torch clamps the norm at eps there
        m[:, :, 0, 0] = 0
    leaves = [u.clone().requires_grad_(True) for u in factors]
    ref = torch.autograd.grad(reference_loss(leaves, g, m), leaves)
    got, loss = tucker_correlation_gradients(factors, g, m)
    assert abs(float(loss) - float(reference_loss(factors, g, m))) < 1e-14
    for a, b in zip(got, ref):
        # observed ≤ 2e-15 relative (float64 rounding of a different but equal contraction order)
        assert float((a - b).norm() / b.norm()) < 1e-11


def autograd_step(factors, g, m):
    """The official step with .grad zeroed (the fixed behaviour), written with autograd."""
    leaves = [u.clone().requires_grad_(True) for u in factors]
    reference_loss(leaves, g, m).backward()
    out = []
    for u in leaves:
        torch.nn.utils.clip_grad_norm_([u], 1.0)
        out.append((u - 0.1 * u.grad).detach())
    return out


@given(seed=seeds)
def test_correlation_step_equals_clipped_autograd_step_without_accumulation(seed):
    shape, ranks = (9, 8, 3, 3), (5, 4)
    g1, g2 = randn(seed, *shape, dtype=D), randn(seed + 1, *shape, dtype=D) * 3
    m1, m2 = randn(seed + 2, *ranks, 3, 3, dtype=D), randn(seed + 3, *ranks, 3, 3, dtype=D)
    f0 = hooi(randn(seed + 4, *shape, dtype=D), ranks).factors
    policy = TuckerPolicy(update_interval=2, reproject_factor=10)
    state = {f"proj{i}": u.clone() for i, u in enumerate(f0)}
    assert policy.refresh(state, g1, 2, first_moment=m1) and policy.refresh(state, g2, 4, first_moment=m2)
    f1 = autograd_step(f0, g1, m1)
    f2 = autograd_step(f1, g2, m2)  # step 2 uses only its own gradient
    for i, ref in enumerate(f2):
        assert torch.allclose(state[f"proj{i}"], ref, atol=1e-13, rtol=0)
        assert state[f"proj{i}"].grad is None
    # The official bug (∇ accumulated: step 2 uses ∇₁ + ∇₂) gives a different answer, so the check can fail.
    g1_at_f0 = tucker_correlation_gradients(f0, g1, m1)[0]
    g2_at_f1 = tucker_correlation_gradients(f1, g2, m2)[0]
    buggy = [u - 0.1 * (a + b) * min(1.0, 1 / (float((a + b).norm()) + 1e-6))
             for u, a, b in zip(f1, g1_at_f0, g2_at_f1)]  # fmt: skip
    assert any(float((b - state[f"proj{i}"]).norm()) > 1e-6 for i, b in enumerate(buggy))


def test_correlation_step_clips_each_factor_separately():
    g = randn(0, 8, 8, 3, 3, dtype=D) * 1e3  # large loss → both gradients clipped
    f = [orthonormal(1, 8, 3), orthonormal(2, 8, 3)]
    m = randn(3, 3, 3, 3, 3, dtype=D)
    new = tucker_correlation_step(f, g, m)
    grads = tucker_correlation_gradients(f, g, m)[0]
    for u, v, d in zip(f, new, grads):
        assert float(d.norm()) > 1.0
        assert abs(float((u - v).norm()) - 0.1 * float(d.norm()) / (float(d.norm()) + 1e-6)) < 1e-12


# --------------------------------------------------------------------------------------- restore


@given(seed=seeds)
def test_restore_round_trip_full_rank(seed):
    shape = (5, 4, 3, 3)
    old = [orthonormal(seed, 5, 5), orthonormal(seed + 1, 4, 4)]
    new = [orthonormal(seed + 2, 5, 5), orthonormal(seed + 3, 4, 4)]
    m, v = randn(seed + 4, *shape, dtype=D), randn(seed + 5, *shape, dtype=D).abs()
    m0, v0 = m.clone(), v.clone()
    restore_tucker_moments(old, new, first=[m], second=[v])
    # first moments: the back-projection is preserved exactly; second: (map √V)², closed form
    assert torch.allclose(tucker_project_back(m, new), tucker_project_back(m0, old), atol=1e-12)
    s = torch.einsum("rskl,or,is,op,iq->pqkl", v0.sqrt(), old[0], old[1], new[0], new[1])
    assert torch.allclose(v, s.square(), atol=1e-12)
    restore_tucker_moments(new, old, first=[m])
    assert torch.allclose(m, m0, atol=1e-12)


@given(seed=seeds)
def test_restore_round_trip_permutations_second_moment(seed):
    """With permutation factors √V keeps its signs, so the second-moment map is invertible too."""
    gen = torch.Generator().manual_seed(seed)
    old = [torch.eye(n, dtype=D)[:, torch.randperm(n, generator=gen)] for n in (5, 4)]
    new = [torch.eye(n, dtype=D)[:, torch.randperm(n, generator=gen)] for n in (5, 4)]
    v = randn(seed, 5, 4, 3, 3, dtype=D).abs()
    v0 = v.clone()
    restore_tucker_moments(old, new, second=[v])
    restore_tucker_moments(new, old, second=[v])
    assert torch.allclose(v, v0, atol=1e-13)


@given(seed=seeds)
def test_restore_within_subspace_rotation(seed):
    """A rotation inside the same low-rank subspace maps M to Rᵀ-rotated coordinates, losslessly."""
    u0, u1 = orthonormal(seed, 9, 4), orthonormal(seed + 1, 7, 3)
    r0, r1 = orthonormal(seed + 2, 4, 4), orthonormal(seed + 3, 3, 3)
    m = randn(seed + 4, 4, 3, 3, 3, dtype=D)
    m0 = m.clone()
    restore_tucker_moments([u0, u1], [u0 @ r0, u1 @ r1], first=[m])
    expect = mode_dot(mode_dot(m0, r0.t(), 0), r1.t(), 1)
    assert torch.allclose(m, expect, atol=1e-12)


# ---------------------------------------------------------------------------------------- policy


def test_policy_schedule_matches_coap():
    p = TuckerPolicy(update_interval=32, reproject_factor=5)
    kinds = {k: p.refresh_kind(k) for k in (0, 1, 31, 32, 64, 128, 160, 192, 320)}
    assert kinds == {0: "init", 1: "", 31: "", 32: "correlation", 64: "correlation", 128: "correlation",
                     160: "svd", 192: "correlation", 320: "svd"}  # fmt: skip


@pytest.mark.parametrize("shape", [(12, 10, 3, 3), (12, 10, 1, 1)])
def test_policy_state_layout_refresh_and_weights_only_load(shape):
    policy = TuckerPolicy(update_interval=1, reproject_factor=2)
    ranks = tucker_ranks(shape, 4)
    g = randn(0, *shape)
    state = policy.init_state(g, ranks)
    layout = policy.state_layout(shape, ranks, torch.float32)
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == layout
    assert policy.project(state, g).shape == core_shape(shape, ranks)
    assert policy.project_back(state, policy.project(state, g)).shape == shape
    m = torch.zeros(core_shape(shape, ranks)) + 0.1
    ids = {k: id(v) for k, v in state.items()}
    assert policy.refresh(state, randn(1, *shape), 1, first_moment=m)  # correlation
    assert policy.refresh(state, randn(2, *shape), 2, first_moment=m)  # svd (warm sweep)
    assert {k: id(v) for k, v in state.items()} == ids  # updated in place
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="first moment"):
        policy.refresh(state, g, 1, first_moment=None)
    with pytest.raises(ValueError, match="transposed"):
        policy.refresh(state, g, 1, first_moment=m, transposed=True)


@pytest.mark.parametrize(("kw", "value"), [("update_interval", 0), ("max_sweeps", -1), ("tol", -1.0)])
def test_policy_argument_errors(kw, value):
    with pytest.raises((ValueError, TypeError), match=kw):
        TuckerPolicy(**{kw: value})
