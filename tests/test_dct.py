"""The DCT projection policy: basis, column choice, shared cache, state, schedule, moments."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import assert_rel_close, randn, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.projection import (
    DctPolicy,
    dct_basis,
    get_policy,
    restore_moments,
    select_columns,
    shared_basis,
    shared_basis_builds,
)
from coap_compile.projection import dct as dct_module

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_cache():
    dct_module.clear_shared_bases()
    yield
    dct_module.clear_shared_bases()


def definition(n: int) -> torch.Tensor:
    """DCT-II straight from its definition, one ``math.cos`` per entry (independent of :func:`dct_basis`)."""
    rows = []
    for j in range(n):
        rows.append(
            [math.sqrt((1 if k == 0 else 2) / n) * math.cos(math.pi * (j + 0.5) * k / n) for k in range(n)]
        )
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------------------ basis
@pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
def test_dct_basis_matches_the_definition(n):
    # float64: observed ≤ 4e-16 (both are correctly rounded cosines of nearly the same argument).
    assert float((dct_basis(n, dtype=F64) - definition(n)).abs().max()) < 1e-14


@pytest.mark.parametrize("n", [1, 5, 64, 257, 1024])
def test_dct_basis_is_orthonormal(n):
    b = dct_basis(n, dtype=F64)
    # float64 Gram matrix of N-term sums: observed 2.7e-15 at N = 1024.
    assert float((b.t() @ b - torch.eye(n, dtype=F64)).abs().max()) < 1e-13
    # The columns are the DCT-II frequencies: column k changes sign k times down the column.
    signs = (b[1:] * b[:-1] < 0).sum(0)
    assert signs.tolist() == list(range(n))


def test_dct_basis_float32_is_the_rounded_float64_basis():
    assert torch.equal(dct_basis(300), dct_basis(300, dtype=F64).float())


def test_shared_basis_is_built_once_per_key_and_shared():
    cpu = torch.device("cpu")
    a = shared_basis(16, torch.float32, "cpu")
    assert shared_basis(16, torch.float32, cpu) is a
    shared_basis(16, F64, cpu)
    shared_basis(12, torch.float32, cpu)
    builds = {(16, torch.float32, cpu): 1, (16, F64, cpu): 1, (12, torch.float32, cpu): 1}
    assert shared_basis_builds() == builds
    # Two policies and five matrices of width 16 all use the one basis.
    for seed in range(5):
        policy = DctPolicy()
        state = policy.init_state(randn(seed, 20 + seed, 16), 4)
        assert policy.shared(state) is a
    assert shared_basis_builds()[(16, torch.float32, cpu)] == 1


# ---------------------------------------------------------------------------------- column choice
@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 8))
    return draw(seeds), draw(st.integers(n, 12)), n, draw(st.integers(1, n))


@given(small_problems())
def test_selected_columns_are_the_best_index_set_by_brute_force(problem):
    seed, m, n, r = problem
    x = randn(seed, m, n, dtype=F64)
    b = dct_basis(n, dtype=F64)
    got = select_columns(x, b, r)

    def residual(cols):
        p = b[:, list(cols)]
        return float((x - x @ p @ p.t()).norm())

    best = min(itertools.combinations(range(n), r), key=residual)
    assert sorted(got.tolist()) == sorted(best)
    assert got.dtype == torch.int64
    # Descending scores (the order entrants take vacated slots in).
    scores = (x @ b[:, got]).norm(dim=0)
    assert (scores[:-1] >= scores[1:]).all()


@given(seeds)
def test_blocked_scoring_equals_one_matmul(seed):
    x, b = randn(seed, 40, 30), dct_basis(30)
    whole = select_columns(x, b, 7)
    saved = dct_module._SCORE_BLOCK_ELEMS
    dct_module._SCORE_BLOCK_ELEMS = 40 * 4  # 4 columns per block: 8 blocks, the last one partial
    try:
        assert torch.equal(select_columns(x, b, 7), whole)
    finally:
        dct_module._SCORE_BLOCK_ELEMS = saved


def test_select_columns_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank=9"):
        select_columns(randn(0, 10, 8), dct_basis(8), 9)


# ---------------------------------------------------------------------------------------- policy
def test_schedule_and_in_place_refresh_keeping_slots():
    policy = DctPolicy(update_interval=3)
    assert [policy.refresh_kind(k) for k in range(8)] == ["init", "", "", "select", "", "", "select", ""]
    x0 = randn(1, 30, 16)
    state = policy.init_state(x0, 5)
    index = state["dct_index"]
    ptr = index.data_ptr()
    before = index.clone()
    assert not policy.refresh(state, randn(2, 30, 16), 2, first_moment=None, transposed=False)
    assert torch.equal(index, before)
    x = x0 + 0.7 * randn(3, 30, 16)  # a related gradient: part of the set survives
    assert policy.refresh(state, x, 3, first_moment=None, transposed=False)
    assert state["dct_index"] is index and index.data_ptr() == ptr
    best = select_columns(x, shared_basis(16, torch.float32, "cpu"), 5)
    assert set(index.tolist()) == set(best.tolist())
    kept = [i for i, c in enumerate(before.tolist()) if c in set(best.tolist())]
    assert 0 < len(kept) < 5, "the example should keep some columns and replace others"
    assert all(index[i] == before[i] for i in kept)  # retained columns keep their slot
    entered = [i for i in range(5) if i not in kept]
    assert index[entered].tolist() == [c for c in best.tolist() if c not in set(before.tolist())]
    # Same gradient again: nothing changes, refresh reports it.
    assert not policy.refresh(state, x, 6, first_moment=None, transposed=False)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_basis_projects_through_the_gathered_columns(dtype):
    policy = DctPolicy()
    x = randn(4, 24, 10, dtype=dtype)
    state = policy.init_state(x, 3)
    work = F64 if dtype == F64 else torch.float32
    b = shared_basis(10, work, "cpu")
    p = policy.basis(state)
    assert p.dtype == work and torch.equal(p, b[:, state["dct_index"]])
    assert torch.equal(policy.project(state, x), x.to(work) @ p)
    d = randn(5, 24, 3, dtype=work)
    assert torch.equal(policy.project_back(state, d), d @ p.t())


@given(seeds, st.integers(1, 20), st.booleans())
def test_full_rank_is_an_exact_round_trip(seed, n, double):
    dtype = F64 if double else torch.float32
    x = randn(seed, n + 3, n, dtype=dtype)
    policy = DctPolicy()
    state = policy.init_state(x, n)
    assert sorted(state["dct_index"].tolist()) == list(range(n))  # a permutation of all columns
    back = policy.project_back(state, policy.project(state, x))
    # Orthonormal basis: X P Pᵀ = X. Observed 3e-16 (float64) / 2.5e-7 (float32) relative.
    assert_rel_close(back, x, 1e-13 if double else 1e-6, "X P Pᵀ")


def test_state_saves_and_loads_with_weights_only(tmp_path):
    policy = DctPolicy()
    x = randn(6, 20, 12, dtype=F64)
    state = policy.init_state(x, 4)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(loaded["dct_index"], state["dct_index"])
    assert torch.equal(policy.basis(loaded), policy.basis(state))
    # A generic load_state_dict may cast the floating key to the parameter dtype: the basis stays float32.
    cast = {**loaded, "dct_basis_key": loaded["dct_basis_key"].to(torch.bfloat16)}
    assert policy.basis(cast).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_layouts_match_state_and_basis(dtype):
    policy = DctPolicy()
    state = policy.init_state(randn(0, 12, 7, dtype=dtype), 3)
    assert policy.state_layout(7, 3, dtype) == {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    assert sum(v.numel() * v.element_size() for v in state.values()) == 3 * 8  # only the indices take bytes
    ((shape, dt),) = policy.shared_state_layout(7, dtype).values()
    b = policy.shared(state)
    assert (shape, dt) == (tuple(b.shape), b.dtype)
    assert policy.shared_state_layout(7, dtype) == policy.shared_state_layout(7, dtype)
    assert policy.shared_state_layout(7, dtype).keys() != policy.shared_state_layout(8, dtype).keys()


@given(seeds, st.booleans())
def test_remap_moments_equals_the_dense_restore(seed, reorder):
    policy = DctPolicy(update_interval=1)
    x0 = randn(seed, 20, 12, dtype=F64)
    state = policy.init_state(x0, 5)
    old = policy.snapshot(state)
    policy.refresh(state, x0 + randn(seed + 1, 20, 12, dtype=F64), 1, first_moment=None, transposed=False)
    if reorder:  # any order of the new set, not just the policy's slot order
        state["dct_index"].copy_(state["dct_index"].flip(0))
    m, v = randn(seed + 2, 20, 5, dtype=F64), randn(seed + 3, 20, 5, dtype=F64).abs()
    m_dense, v_dense = m.clone(), v.clone()
    restore_moments(policy.basis(old), policy.basis(state), first=[m_dense], second=[v_dense])
    policy.remap_moments(old, state, first=[m], second=[v])
    # Dense: products with an orthonormal basis, exact up to float64 rounding (observed 1e-16 absolute).
    assert float((m - m_dense).abs().max()) < 1e-13 and float((v - v_dense).abs().max()) < 1e-13


def test_registry_and_validation():
    policy = get_policy("dct", update_interval=7)
    assert isinstance(policy, DctPolicy) and policy.update_interval == 7
    assert not policy.needs_first_moment
    with pytest.raises(ValueError, match="update_interval.*0"):
        DctPolicy(update_interval=0)
    with pytest.raises(TypeError, match="update_interval"):
        DctPolicy(update_interval=1.5)
