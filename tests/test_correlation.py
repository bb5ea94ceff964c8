"""COAP's correlation step: the closed form against autograd, the normalized step, principal angles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, randn, rel_err, seeds
from hypothesis import given
from hypothesis import strategies as st

from coap_compile.projection import (
    CORRELATION_MODES,
    CoapPolicy,
    correlation_grad,
    correlation_step,
    largest_principal_angle,
    normalized_correlation_step,
    orthogonal_basis,
    principal_angles,
)

F64 = torch.float64


# --------------------------------------------------------------------------------- the oracle
def autograd_grad(p, x, first_moment, *, transposed):
    """The previous implementation of the correlation gradient (autograd through torch's own ops)."""
    q = p.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        x_hat = (x @ q) @ q.t()
        m_hat = first_moment @ q.t()
        cos = F.cosine_similarity(m_hat, x, dim=0 if transposed else 1, eps=1e-8)
        loss = F.mse_loss(x_hat, x) * (1.0 - cos.mean())
        (grad,) = torch.autograd.grad(loss, q)
    return grad


def autograd_step(p, x, first_moment, *, transposed):
    grad = autograd_grad(p, x, first_moment, transposed=transposed)
    coef = 1.0 / (float(grad.norm()) + 1e-6)
    return p - 0.1 * (grad * coef if coef < 1.0 else grad)


def loss(p, x, f, transposed):
    cos = F.cosine_similarity(f @ p.t(), x, dim=0 if transposed else 1, eps=1e-8)
    return float(F.mse_loss((x @ p) @ p.t(), x) * (1.0 - cos.mean()))


@st.composite
def problems(draw):
    """(P, X, F, transposed) in float64 with M ≥ N ≥ r ≥ 1, optionally with zero, tiny and scaled rows."""
    seed = draw(seeds)
    n = draw(st.integers(1, 12))
    m = draw(st.integers(n, 24))
    r = draw(st.sampled_from([1, n, draw(st.integers(1, n))]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen, dtype=F64) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    f = torch.randn(m, r, generator=gen, dtype=F64)
    p = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=F64)).Q
    if draw(st.booleans()):  # drifted P, as after paper steps (the formula does not assume PᵀP = I)
        p = p + 0.1 * torch.randn(n, r, generator=gen, dtype=F64)
    # Zero rows of X (cosine along rows), zero columns of X (cosine along columns), zero rows of F, and rows
    # below the cosine eps 1e-8 (torch's clamp regime).
    for t, dim in ((x, 0), (x, 1), (f, 0)):
        for i in draw(st.lists(st.integers(0, t.shape[dim] - 1), max_size=2)):
            t.select(dim, i).zero_()
    if draw(st.booleans()):
        x[draw(st.integers(0, m - 1))] *= 1e-11
        f[draw(st.integers(0, m - 1))] *= 1e-11
    return p, x, f, draw(st.booleans())


def _scale(p, x):
    """Size of the individual terms of ∇L, ``2‖X‖²‖P‖/(M N)``: rounding is relative to it, and at ``r = N``
    with orthonormal ``P`` the terms cancel exactly, leaving ∇L itself pure rounding in both versions."""
    return 2 * float(x.norm()) ** 2 * float(p.norm()) / x.numel()


@given(problems())
def test_closed_form_gradient_matches_autograd_float64(problem):
    p, x, f, transposed = problem
    got = correlation_grad(p, x, f, transposed=transposed)
    want = autograd_grad(p, x, f, transposed=transposed)
    err = float((got - want).norm())
    # float64: observed ≤ 2.3e-15 relative to max(‖∇‖, term size) over 300 random examples.
    assert err <= 1e-12 * max(float(want.norm()), _scale(p, x)), (err, float(want.norm()))


@given(problems())
def test_closed_form_step_matches_autograd_step_float64(problem):
    p, x, f, transposed = problem
    got = correlation_step(p, x, f, transposed=transposed)
    want = autograd_step(p, x, f, transposed=transposed)
    # The step is P − 0.1·clipped ∇: compared relative to ‖P‖ (the step itself may be all rounding at r = N).
    # Observed ≤ 1.1e-14 over 300 random examples.
    assert float((got - want).norm()) <= 1e-12 * float(p.norm())


@pytest.mark.parametrize("transposed", [False, True])
def test_closed_form_clip_and_lr_constants(transposed):
    # Large X: ‖∇‖ ≫ 1, the clip is active and the step has length 0.1·‖∇‖/(‖∇‖ + 1e-6) exactly.
    x, f = randn(1, 20, 10, dtype=F64, scale=100.0), randn(2, 20, 3, dtype=F64)
    p = orthogonal_basis(x, 3)
    step = correlation_step(p, x, f, transposed=transposed) - p
    gn = float(correlation_grad(p, x, f, transposed=transposed).norm())
    assert gn > 10
    assert abs(float(step.norm()) - 0.1 * gn / (gn + 1e-6)) < 1e-15
    # Small X: no clip, the step is 0.1·∇.
    small = correlation_step(p, x * 1e-3, f, transposed=transposed)
    assert torch.equal(small, p - 0.1 * correlation_grad(p, x * 1e-3, f, transposed=transposed))


@pytest.mark.parametrize("transposed", [False, True])
def test_closed_form_float32_realistic_scale(transposed):
    # A 512×256 gradient at training scale (‖G‖ ≈ 0.02, decaying spectrum), r = 64, moments from earlier
    # steps.
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(512, 256, generator=gen, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(256, 256, generator=gen, dtype=F64)).Q
    s = torch.logspace(0, -2, 256, dtype=F64)
    x64 = (u * (0.02 * s / s.norm())) @ v.t()
    p64 = orthogonal_basis(x64, 64)
    f64 = 0.3 * (x64 @ p64) + 1e-5 * torch.randn(512, 64, generator=gen, dtype=F64)
    exact = autograd_grad(p64, x64, f64, transposed=transposed)
    x, p, f = x64.float(), p64.float(), f64.float()
    closed = correlation_grad(p, x, f, transposed=transposed)
    auto = autograd_grad(p, x, f, transposed=transposed)
    # Observed against float64: closed form 1.8e-6 / 1.4e-6, autograd 4.9e-7 / 9.6e-7 (rows / columns), closed
    # vs autograd 1.8e-6 / 1.7e-6. The Gram-matrix residual ‖X‖² − tr(YᵀY) + … cancels 85 % of ‖X‖² here
    # (P captures 85 % of the energy), hence the closed form's larger float32 rounding.
    assert rel_err(closed, exact) < 1e-5
    assert rel_err(auto, exact) < 1e-5


def test_closed_form_zero_row_of_x_never_meets_an_overflow():
    # A zero row X_i has c2 = ε and a first-moment row below ε has c1 = ε: d1 = 1/ε² = 1e16, and β·d1·F_i
    # overflows for ‖X‖² near the float64 limit. Autograd multiplies by X_i = 0 first; so must the closed
    # form.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 10, generator=gen, dtype=F64) * 8e151
    x[3] = 0
    f = torch.randn(20, 3, generator=gen, dtype=F64)
    f[3] *= 0.9e-8 / f[3].norm()
    p = torch.linalg.qr(torch.randn(10, 3, generator=gen, dtype=F64)).Q
    want = autograd_grad(p, x, f, transposed=False)
    got = correlation_grad(p, x, f, transposed=False)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_closed_form_needs_no_autograd_and_leaves_p_alone():
    x, f = randn(1, 16, 8), randn(2, 16, 3)
    p = orthogonal_basis(x, 3).requires_grad_(True)
    before = p.detach().clone()
    with torch.no_grad():
        new = correlation_step(p, x, f, transposed=False)
    assert p.grad is None and not new.requires_grad and torch.equal(p.detach(), before)


# ---------------------------------------------------------------------------------- normalized
def _orth(seed, m, n, r, dtype=F64):
    x = randn(seed, m, n, dtype=dtype)
    p = orthogonal_basis(x, r)
    f = 0.5 * (x @ p) + 0.1 * randn(seed + 1, m, r, dtype=dtype)
    return p, x, f


@given(seeds, st.integers(2, 10), st.booleans(), st.sampled_from([1e-4, 0.03, 0.5, 1.2]))
def test_normalized_step_turns_the_subspace_by_exactly_theta(seed, n, transposed, angle):
    r = max(1, n // 3)
    p, x, f = _orth(seed, n + 5, n, r)
    new = normalized_correlation_step(p, x, f, transposed=transposed, angle=angle)
    eye = torch.eye(r, dtype=F64)
    assert float((new.t() @ new - eye).abs().max()) < 1e-13
    # float64: observed |angle error| ≤ 3e-15 rad.
    assert abs(largest_principal_angle(p, new) - angle) < 1e-11
    # Polar retraction: PᵀP' symmetric positive definite (P' is the new subspace's basis closest to P).
    c = p.t() @ new
    assert_rel_close(c, c.t(), 1e-12, "PᵀP' symmetric")
    assert float(torch.linalg.eigvalsh(c).min()) > 0


@given(seeds, st.booleans())
def test_normalized_step_is_scale_invariant_and_the_paper_step_is_not(seed, transposed):
    p, x, f = _orth(seed, 24, 10, 3)
    ref = normalized_correlation_step(p, x, f, transposed=transposed)
    paper = []
    for s in (1e-4, 1e3):
        scaled = normalized_correlation_step(p, x * s, f * s, transposed=transposed)
        assert_rel_close(scaled, ref, 1e-9, f"×{s}")
        paper.append(largest_principal_angle(p, correlation_step(p, x * s, f * s, transposed=transposed)))
    assert paper[0] < 1e-6 < paper[1]  # ∇ ∝ ‖X‖²: at ‖X‖ ~ 1e-4 the paper's step does nothing


@given(seeds, st.booleans())
def test_normalized_step_descends_the_correlation_loss(seed, transposed):
    p, x, f = _orth(seed, 30, 12, 4)
    new = normalized_correlation_step(p, x, f, transposed=transposed, angle=1e-3)
    assert loss(new, x, f, transposed) < loss(p, x, f, transposed)


def test_normalized_step_leaves_p_where_the_subspace_cannot_move():
    x, f = randn(1, 12, 6, dtype=F64), randn(2, 12, 6, dtype=F64)
    full = orthogonal_basis(x, 6)  # r = N: the span is everything
    assert torch.equal(normalized_correlation_step(full, x, f, transposed=False), full)
    p = orthogonal_basis(x, 2)
    zero = torch.zeros(12, 6, dtype=F64)
    assert torch.equal(normalized_correlation_step(p, zero, zero[:, :2], transposed=True), p)


# ------------------------------------------------------------------------------ principal angle
def _rotated(n, angles, dtype=F64):
    """Basis e_1..e_r and the basis with column i turned by angles[i] towards e_{r+i}."""
    r = len(angles)
    eye = torch.eye(n, dtype=dtype)
    a = torch.tensor(angles, dtype=dtype)
    return eye[:, :r], eye[:, :r] * torch.cos(a) + eye[:, r : 2 * r] * torch.sin(a)


@pytest.mark.parametrize("angles", [[1e-9, 3e-10], [0.3, 0.1, 0.2], [math.pi / 2, 0.0], [1.5707, 1.2]])
def test_largest_principal_angle_of_known_rotations(angles):
    p1, p2 = _rotated(8, angles)
    q = torch.linalg.qr(randn(3, len(angles), len(angles), dtype=F64)).Q
    mix = p2 @ q * 3.0 + 0.0  # a rotated, scaled basis of the same span reads the same angle
    want = torch.tensor(sorted(angles, reverse=True), dtype=F64)
    for b in (p2, mix):
        got = largest_principal_angle(p1, b)
        assert abs(got - max(angles)) <= 1e-12 * max(1.0, max(angles)) + 1e-15, got
        # All of them, descending; float64: observed ≤ 2.3e-16 absolute, ≤ 3.5e-16 relative (also 1e-9 rad).
        assert float((principal_angles(p1, b) - want).abs().max()) <= 1e-12 * float(want.max()) + 1e-15


def test_largest_principal_angle_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(6, 2\) and \(6, 3\)"):
        largest_principal_angle(torch.zeros(6, 2), torch.zeros(6, 3))


# --------------------------------------------------------------------------------------- policy
def test_policy_correlation_modes_and_default():
    assert CORRELATION_MODES == ("paper", "normalized", "off")
    x, f = randn(1, 16, 8), randn(2, 16, 3)
    for mode, fn in (("paper", correlation_step), ("normalized", normalized_correlation_step)):
        policy = CoapPolicy(update_interval=1, reproject_factor=2, correlation=mode)
        state = policy.init_state(x, 3)
        expected = fn(state["proj"], randn(3, 16, 8), f, transposed=True)
        assert policy.refresh_kind(1) == "correlation"
        assert policy.refresh(state, randn(3, 16, 8), 1, first_moment=f, transposed=True)
        assert torch.equal(state["proj"], expected)
    assert CoapPolicy().correlation == "paper"


def test_policy_correlation_off_keeps_only_the_svd_schedule():
    off, paper = CoapPolicy(correlation="off"), CoapPolicy()
    kinds = [off.refresh_kind(k) for k in range(400)]
    assert [k for k, c in enumerate(kinds) if c] == [0, 160, 320]
    assert all(off.refresh_kind(k) == paper.refresh_kind(k) for k in (0, 160, 320))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"correlation": "fast"}, ValueError, r"correlation.*\('paper', 'normalized', 'off'\).*='fast'"),
        ({"correlation": None}, ValueError, r"correlation.*None"),
        ({"correlation_angle": 0.0}, ValueError, r"correlation_angle.*\(0, π/2\).*0\.0"),
        ({"correlation_angle": 2.0}, ValueError, r"correlation_angle=2\.0"),
        ({"correlation_angle": "1"}, TypeError, r"correlation_angle.*'1'"),
    ],
)
def test_policy_correlation_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CoapPolicy(**kwargs)
