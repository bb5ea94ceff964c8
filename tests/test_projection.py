"""Projection policies and their linear algebra (spec §3–§6), in the canonical orientation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, randn, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.projection import (
    POLICIES,
    CoapPolicy,
    DctPolicy,
    FixedProjection,
    FloraPolicy,
    GaLorePolicy,
    correlation_step,
    gaussian_basis,
    get_policy,
    orthogonal_basis,
    restore_moments,
    top_right_singular_vectors,
)

EYE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@st.composite
def canonical_problems(draw):
    """(seed, M, N, r) with M ≥ N ≥ r ≥ 1, small enough for a fast test."""
    n = draw(st.integers(1, 24))
    m = draw(st.integers(n, 40))
    return draw(seeds), m, n, draw(st.integers(1, n))


def _orth_err(p: torch.Tensor) -> float:
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    return float((p.t() @ p - eye).abs().max())


# ------------------------------------------------------------------------------------------ linalg
@given(canonical_problems(), st.sampled_from([torch.float32, torch.float64]))
def test_orthogonal_basis_is_orthonormal_and_leaves_global_rng(problem, dtype):
    seed, m, n, r = problem
    x = randn(seed, m, n, dtype=dtype)
    before = torch.get_rng_state()
    p = orthogonal_basis(x, r)
    assert torch.equal(torch.get_rng_state(), before)
    assert p.shape == (n, r) and p.dtype == dtype
    assert _orth_err(p) < EYE_TOL[dtype]


def test_orthogonal_basis_default_omega_is_seeded_3407_and_deterministic():
    x = randn(1, 20, 12)
    omega = torch.randn(12, 5, generator=torch.Generator().manual_seed(3407))
    assert torch.equal(orthogonal_basis(x, 5), orthogonal_basis(x, 5, omega=omega))
    assert torch.equal(orthogonal_basis(x, 5), orthogonal_basis(x, 5))
    assert not torch.equal(orthogonal_basis(x, 5), orthogonal_basis(x, 5, seed=7))


@given(seeds)
def test_orthogonal_basis_recovers_an_exactly_low_rank_row_space(seed):
    # X of rank 3: the range finder sees the whole range, so X P Pᵀ = X up to rounding.
    x = randn(seed, 30, 3, dtype=torch.float64) @ randn(seed + 1, 3, 16, dtype=torch.float64)
    p = orthogonal_basis(x, 3)
    assert_rel_close(x @ p @ p.t(), x, 1e-12, "X P Pᵀ")


def test_low_cost_svd_seeded_with_previous_basis_converges_to_top_subspace():
    # Repeated recalibration = subspace iteration: converges to GaLore's exact top-r basis.
    x = randn(3, 32, 12, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)
    p = orthogonal_basis(x, 4)
    for _ in range(30):
        p = orthogonal_basis(x, 4, omega=p)
    exact = top_right_singular_vectors(x, 4)
    assert_rel_close(p @ p.t(), exact @ exact.t(), 1e-10, "projector")


def test_top_right_singular_vectors_match_svd():
    x = randn(4, 20, 8)
    vh = torch.linalg.svd(x, full_matrices=False).Vh
    assert torch.equal(top_right_singular_vectors(x, 3), vh[:3].t().contiguous())


@pytest.mark.parametrize("rank", [0, 9])
def test_linalg_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match=f"rank={rank}"):
        orthogonal_basis(randn(0, 10, 8), rank)
    with pytest.raises(ValueError, match=f"rank={rank}"):
        top_right_singular_vectors(randn(0, 10, 8), rank)


def test_gaussian_basis_is_seeded_and_scaled():
    before = torch.get_rng_state()
    a = gaussian_basis(400, 16, 5, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, gaussian_basis(400, 16, 5, dtype=torch.float32, device=torch.device("cpu")))
    # entry variance 1/r = 0.0625; 6400 samples give a std error of about 0.0011 on the variance.
    assert abs(float(a.var()) - 1 / 16) < 0.006


# ------------------------------------------------------------------------------------------- COAP
def test_coap_schedule_over_400_steps():
    policy = CoapPolicy(update_interval=32, reproject_factor=5)
    kinds = [policy.refresh_kind(k) for k in range(400)]
    assert Counter(kinds) == {"init": 1, "correlation": 10, "svd": 2, "": 387}
    assert [k for k, c in enumerate(kinds) if c == "correlation"][:4] == [32, 64, 96, 128]
    assert [k for k, c in enumerate(kinds) if c == "svd"] == [160, 320]
    assert [k for k, c in enumerate(kinds) if c == "correlation"][4:] == [192, 224, 256, 288, 352, 384]


@given(canonical_problems())
def test_coap_svd_refresh_is_in_place_and_orthonormal(problem):
    seed, m, n, r = problem
    policy = CoapPolicy(update_interval=1, reproject_factor=1)
    state = policy.init_state(randn(seed, m, n), r)
    p = state["proj"]
    ptr = p.data_ptr()
    assert policy.refresh_kind(1) == "svd"
    assert policy.refresh(state, randn(seed + 1, m, n), 1, first_moment=None, transposed=False)
    assert state["proj"] is p and p.data_ptr() == ptr
    assert _orth_err(p) < EYE_TOL[torch.float32]


def _official_update_proj(g, p_off, m_off, side):
    """The official update_proj written in the ORIGINAL orientation (test oracle, spec §4)."""
    q = p_off.clone().requires_grad_(True)
    with torch.enable_grad():
        if side == "right":  # g m×n, P r×n, M m×r
            g_hat, m_hat = (g @ q.t()) @ q, m_off @ q
        else:  # g m×n (m < n), P m×r, M r×n
            g_hat, m_hat = (q @ q.t()) @ g, q @ m_off
        loss = F.mse_loss(g_hat, g) * (1 - F.cosine_similarity(m_hat, g, dim=1).mean())
        loss.backward()
    torch.nn.utils.clip_grad_norm_([q], 1.0)
    return (q - 0.1 * q.grad).detach()


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: the gradient norm exceeds 1, clipping is active
@pytest.mark.parametrize("side", ["right", "left"])
def test_correlation_step_matches_official_orientation(side, scale):
    dt = torch.float64
    m, n, r = (20, 12, 4) if side == "right" else (12, 20, 4)
    g = randn(5, m, n, dtype=dt, scale=scale)
    small = min(m, n)
    basis = torch.linalg.qr(randn(6, small, r, dtype=dt)).Q  # small×r, orthonormal columns
    if side == "right":
        p_off, m_off = basis.t(), randn(7, m, r, dtype=dt)
        expected = _official_update_proj(g, p_off, m_off, side).t()
        got = correlation_step(basis.clone(), g, m_off, transposed=False)
    else:
        p_off, m_off = basis, randn(7, r, n, dtype=dt)
        expected = _official_update_proj(g, p_off, m_off, side)
        got = correlation_step(basis.clone(), g.t(), m_off.t(), transposed=True)
    assert_rel_close(got, expected, 1e-12, f"correlation step ({side})")


def test_correlation_refresh_under_no_grad_leaves_no_grad_buffer():
    policy = CoapPolicy(update_interval=1, reproject_factor=2)
    x = randn(1, 16, 8)
    state = policy.init_state(x, 3)
    before = state["proj"].clone()
    with torch.no_grad():
        assert policy.refresh(state, randn(2, 16, 8), 1, first_moment=randn(3, 16, 3), transposed=False)
    p = state["proj"]
    assert p.grad is None and not p.requires_grad
    assert not torch.equal(p, before)
    step = float((p - before).norm())
    assert 0 < step <= 0.1 + 1e-6  # lr 0.1 times a gradient clipped to norm ≤ 1


def test_correlation_refresh_without_first_moment_raises():
    policy = CoapPolicy(update_interval=1, reproject_factor=2)
    state = policy.init_state(randn(1, 8, 4), 2)
    with pytest.raises(ValueError, match="first_moment=None"):
        policy.refresh(state, randn(2, 8, 4), 1, first_moment=None, transposed=False)


def test_restore_moments_preserves_the_full_space_first_moment():
    dt = torch.float64
    p_old = torch.linalg.qr(randn(1, 10, 4, dtype=dt)).Q
    rot = torch.linalg.qr(randn(2, 4, 4, dtype=dt)).Q
    m = randn(3, 12, 4, dtype=dt)
    m_full = m @ p_old.t()
    restore_moments(p_old, p_old @ rot, first=[m])
    # same subspace, rotated basis: M_new = M P_oldᵀ P_old R = M R, so M_new P_newᵀ = M R Rᵀ P_oldᵀ = M P_oldᵀ
    assert_rel_close(m @ (p_old @ rot).t(), m_full, 1e-12, "first moment in full space")


def test_restore_moments_permutes_second_moment_under_a_permuted_basis():
    p_old = torch.linalg.qr(randn(4, 10, 4)).Q
    perm = torch.tensor([2, 0, 3, 1])
    v = randn(5, 12, 4).abs()
    expected = v[:, perm]
    restore_moments(p_old, p_old[:, perm], second=[v])
    assert (v >= 0).all()
    # fp32 rounding of the two products: observed ~1e-7 relative
    assert_rel_close(v, expected, 1e-5, "second moment")


# -------------------------------------------------------------------------------- other policies
def test_galore_schedule_and_refresh():
    policy = GaLorePolicy(update_gap=10, basis="official")  # the raw SVD, no sign alignment
    assert [policy.refresh_kind(k) for k in (0, 1, 9, 10, 20, 25)] == ["init", "", "", "svd", "svd", ""]
    state = policy.init_state(randn(1, 16, 8), 3)
    assert not policy.refresh(state, randn(2, 16, 8), 5, first_moment=None, transposed=False)
    x = randn(3, 16, 8)
    assert policy.refresh(state, x, 10, first_moment=None, transposed=False)
    assert torch.equal(state["proj"], top_right_singular_vectors(x, 3))


def test_flora_resample_increments_seed_and_regenerates_in_place():
    policy = FloraPolicy(resample_every=3, seed=11)
    state = policy.init_state(randn(1, 16, 8), 3)
    assert state["seed"].dtype == torch.int64 and int(state["seed"]) == 11
    p = state["proj"]
    cpu = torch.device("cpu")
    assert torch.equal(p, gaussian_basis(8, 3, 11, dtype=torch.float32, device=cpu))
    assert not policy.refresh(state, randn(2, 16, 8), 2, first_moment=None, transposed=False)
    assert policy.refresh(state, randn(2, 16, 8), 3, first_moment=None, transposed=False)
    assert int(state["seed"]) == 12 and state["proj"] is p
    assert torch.equal(p, gaussian_basis(8, 3, 12, dtype=torch.float32, device=cpu))


def test_fixed_projection_never_refreshes_and_checks_shape():
    policy = FixedProjection(lambda n, r, dtype, device: torch.eye(n, dtype=dtype, device=device)[:, :r])
    state = policy.init_state(randn(1, 6, 4, dtype=torch.float64), 2)
    assert state["proj"].dtype == torch.float64 and state["proj"].shape == (4, 2)
    assert [policy.refresh_kind(k) for k in range(5)] == ["init", "", "", "", ""]
    assert not policy.refresh(state, randn(1, 6, 4), 32, first_moment=None, transposed=False)
    bad = FixedProjection(lambda n, r, dtype, device: torch.zeros(r, n))
    with pytest.raises(ValueError, match="expected"):
        bad.init_state(randn(1, 6, 4), 2)


# ------------------------------------------------------------------------------------ registry
def test_registry_names_and_instances():
    assert set(POLICIES) == {"coap", "galore", "flora", "dct", "fixed"}
    assert isinstance(get_policy("coap"), CoapPolicy)
    assert get_policy("galore", update_gap=7).update_gap == 7
    inst = FloraPolicy()
    assert get_policy(inst) is inst


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"'svd'.*coap.*dct.*fixed.*flora.*galore"):
        get_policy("svd")


@pytest.mark.parametrize(
    ("factory", "arg", "value", "exc"),
    [
        (CoapPolicy, "update_interval", 0, ValueError),
        (CoapPolicy, "update_interval", 2.5, TypeError),
        (CoapPolicy, "reproject_factor", -1, ValueError),
        (CoapPolicy, "reproject_factor", True, TypeError),
        (GaLorePolicy, "update_gap", 0, ValueError),
        (FloraPolicy, "resample_every", "3", TypeError),
    ],
)
def test_policy_constructor_validation(factory, arg, value, exc):
    with pytest.raises(exc, match=f"{arg}.*{value!r}"):
        factory(**{arg: value})


@pytest.mark.parametrize(
    "policy",
    [
        CoapPolicy(),
        GaLorePolicy(),
        FloraPolicy(seed=4),
        DctPolicy(),
        FixedProjection(lambda n, r, dtype, device: torch.ones(n, r, dtype=dtype, device=device)),
    ],
    ids=lambda p: p.name,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_layout_matches_init_state(policy, dtype):
    state = policy.init_state(randn(0, 12, 7, dtype=dtype), 3)
    assert policy.state_layout(7, 3, dtype) == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


@pytest.mark.parametrize(
    "policy",
    [CoapPolicy(), GaLorePolicy(), FloraPolicy(seed=4)],
    ids=lambda p: p.name,
)
def test_dense_policies_basis_is_the_stored_proj_and_remap_is_restore_moments(policy):
    state = policy.init_state(randn(0, 12, 7), 3)
    assert policy.basis(state) is state["proj"]
    assert policy.shared_state_layout(7, torch.float32) == {}
    x, d = randn(1, 12, 7), randn(2, 12, 3)
    assert torch.equal(policy.project(state, x), x @ state["proj"])
    assert torch.equal(policy.project_back(state, d), d @ state["proj"].t())
    old = policy.snapshot(state)
    assert old["proj"] is not state["proj"] and torch.equal(old["proj"], state["proj"])
    state["proj"].copy_(torch.linalg.qr(randn(3, 7, 3)).Q)
    m, v = randn(4, 12, 3), randn(5, 12, 3).abs()
    m_ref, v_ref = m.clone(), v.clone()
    restore_moments(old["proj"], state["proj"], first=[m_ref], second=[v_ref])
    policy.remap_moments(old, state, first=[m], second=[v])
    assert torch.equal(m, m_ref) and torch.equal(v, v_ref)
