"""The tensor-only port of transformers' Adafactor against transformers' own implementation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from coap_compile.capture.hf_adafactor_port import (
    check_hf_hyperparams,
    from_hf_state,
    hf_adafactor_update,
    hyper_names,
    hyper_tensors,
    init,
    make_update,
    state_names,
    to_hf_state,
)

transformers_optimization = pytest.importorskip("transformers.optimization")
HFAdafactor = transformers_optimization.Adafactor

# Relative tolerances on the parameter (relative to the peak ‖W‖, see run_both) and on the states, over
# the flag grid below plus 3-D params (2 settings each, 20 steps). Observed maxima: fp64 param 1.1e-16,
# states 5.0e-16 (op order only); fp32 param 6.7e-8, states 3.3e-7 (RMS as √mean(x²) vs ‖x‖/√n, unfused
# EMA, α_t formed in float64 instead of from a float32 RMS). bf16 params (10 seeds): the same bits as
# transformers (observed 0; both round the same float32 result), float32 states 3.2e-7.
TOL = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 1e-3}
STEPS = 20

LR_MODES = {
    "relative": dict(lr=None, relative_step=True, warmup_init=False),
    "relative+warmup": dict(lr=None, relative_step=True, warmup_init=True),
    "external": dict(lr="schedule", relative_step=False, warmup_init=False),
}
SHAPES = {1: (7,), 2: (6, 5), 3: (2, 4, 3), 4: (4, 3, 2, 3)}


def rel(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = scale if scale is not None else float(b.norm())
    return float((a - b).norm()) / max(den, 1e-300)


def run_both(shape, dtype, hp, seed, steps=STEPS):
    """Run transformers and the port side by side; return the worst (param, state) errors."""
    gen = torch.Generator().manual_seed(seed)
    lrs = [float(x) for x in 10 ** torch.empty(steps, dtype=torch.float64).uniform_(-3, -1, generator=gen)]
    p_ref = randn(seed, *shape, dtype=torch.float64, scale=0.5 + 2 * float(torch.rand((), generator=gen)))
    p_ref = p_ref.to(dtype).requires_grad_(True)
    external = hp["lr"] == "schedule"
    opt = HFAdafactor([p_ref], **{**hp, "lr": lrs[0] if external else None})
    use_m = hp.get("beta1") is not None
    p = p_ref.detach().clone()
    states = init(p, use_first_moment=use_m)
    names = state_names(use_first_moment=use_m, factored=p.dim() >= 2)
    step = torch.zeros((), dtype=torch.float64)
    hyper = hyper_tensors(hp)
    update = make_update(
        use_first_moment=use_m,
        scale_parameter=hp["scale_parameter"],
        relative_step=hp["relative_step"],
        warmup_init=hp["warmup_init"],
    )
    peak = float(p_ref.detach().double().norm())
    worst_p = worst_s = 0.0
    for k in range(steps):
        g = randn(seed + 1 + k, *shape, dtype=torch.float64, scale=10 ** (k % 3 - 1)).to(dtype)
        if external:
            opt.param_groups[0]["lr"] = lrs[k]
        p_ref.grad = g.clone()
        opt.step()
        lr_t = torch.tensor(lrs[k] if external else 0.0, dtype=torch.float64)
        p, *new, step = update(p, g, *(states[n] for n in names), step, lr_t, *hyper)
        states = dict(zip(names, new))
        ref_state = opt.state[p_ref]
        assert p.dtype == dtype and step.item() == ref_state["step"] == k + 1
        # Error relative to the largest ‖W‖ so far: with weight decay and a large ε₂ the weight can
        # shrink towards 0 while the absolute error stays at the rounding level of the peak.
        peak = max(peak, float(p_ref.detach().double().norm()))
        worst_p = max(worst_p, rel(p, p_ref, peak))
        for n in names:
            assert states[n].shape == ref_state[n].shape and states[n].dtype == ref_state[n].dtype, n
            worst_s = max(worst_s, rel(states[n], ref_state[n]))
    return worst_p, worst_s


FLAG_GRID = list(
    itertools.product([None, 0.9], list(LR_MODES), [True, False], [1, 2, 4], [torch.float32, torch.float64])
)


@pytest.mark.parametrize(("beta1", "lr_mode", "scale_parameter", "ndim", "dtype"), FLAG_GRID)
def test_port_matches_transformers_every_flag_combination(beta1, lr_mode, scale_parameter, ndim, dtype):
    # second setting: the clip is active (0.05) and ε₂ = 5 exceeds RMS(W), so max(ε₂, RMS(W)) picks ε₂
    for clip, wd, decay, eps in [(1.0, 0.0, -0.8, (1e-30, 1e-3)), (0.05, 0.1, -0.5, (1e-3, 5.0))]:
        hp = dict(
            LR_MODES[lr_mode], beta1=beta1, scale_parameter=scale_parameter, clip_threshold=clip,
            weight_decay=wd, decay_rate=decay, eps=eps,
        )  # fmt: skip
        err_p, err_s = run_both(SHAPES[ndim], dtype, hp, seed=ndim * 100 + int(clip * 10))
        what = f"{hp} ndim={ndim} {dtype}"
        assert err_p <= TOL[dtype], f"{what}: param error {err_p:.2e}"
        assert err_s <= TOL[dtype], f"{what}: state error {err_s:.2e}"


@given(
    seed=seeds,
    ndim=st.sampled_from([1, 2, 3]),
    beta1=st.sampled_from([None, 0.0, 0.5, 0.9]),
    decay=st.sampled_from([-0.8, -0.5, -1.0]),
    eps=st.sampled_from([(1e-30, 1e-3), (1e-3, 1e-3), (1e-30, 10.0)]),
    clip=st.sampled_from([1.0, 0.1, 100.0]),
    wd=st.sampled_from([0.0, 0.01, 0.5]),
    lr_mode=st.sampled_from(list(LR_MODES)),
    scale=st.booleans(),
)
def test_port_matches_transformers_random_settings_float64(
    seed, ndim, beta1, decay, eps, clip, wd, lr_mode, scale
):
    hp = dict(LR_MODES[lr_mode], beta1=beta1, decay_rate=decay, eps=eps, clip_threshold=clip, weight_decay=wd,
              scale_parameter=scale)  # fmt: skip
    err_p, err_s = run_both(SHAPES[ndim], torch.float64, hp, seed, steps=12)
    assert err_p <= TOL[torch.float64] and err_s <= TOL[torch.float64], (err_p, err_s)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_port_matches_transformers_bf16_params(beta1):
    """Half params: float32 states, arithmetic on a float32 copy, rounded back (as transformers does)."""
    hp = dict(LR_MODES["external"], beta1=beta1, scale_parameter=True, clip_threshold=1.0, weight_decay=0.1,
              decay_rate=-0.8, eps=(1e-30, 1e-3))  # fmt: skip
    err_p, err_s = run_both((6, 5), torch.bfloat16, hp, seed=3)
    assert err_p <= TOL[torch.bfloat16] and err_s <= TOL[torch.float32], (err_p, err_s)


def test_zero_weight_decay_is_exact_noop():
    """λ = 0 is a runtime input: W − (0·α)W must equal W bit for bit (transformers skips the term)."""
    p = randn(0, 6, 5)
    states = init(p, use_first_moment=True)
    names = state_names(use_first_moment=True, factored=True)
    hp = dict(beta1=0.9, decay_rate=-0.8, eps=(1e-30, 1e-3), clip_threshold=1.0, weight_decay=0.0)
    args = (p, randn(1, 6, 5), *(states[n] for n in names), torch.tensor(4.0, dtype=torch.float64),
            torch.tensor(0.01, dtype=torch.float64))  # fmt: skip
    flags = dict(use_first_moment=True, scale_parameter=True, relative_step=False, warmup_init=False)
    out = hf_adafactor_update(*args, *hyper_tensors(hp), **flags)
    update = out[1]  # new exp_avg is the subtracted update
    assert torch.equal(out[0], p - update)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_python_float_hypers_equal_tensor_hypers(wd):
    """A hyper given as a Python float (a baked constant) computes what the tensor input computes."""
    p, g = randn(0, 6, 5), randn(1, 6, 5)
    states = init(p, use_first_moment=True)
    names = state_names(use_first_moment=True, factored=True)
    hp = dict(beta1=0.9, decay_rate=-0.8, eps=(1e-30, 5.0), clip_threshold=1.0, weight_decay=wd)
    args = (p, g, *(states[n] for n in names), torch.tensor(2.0, dtype=torch.float64),
            torch.tensor(0.01, dtype=torch.float64))  # fmt: skip
    flags = dict(use_first_moment=True, scale_parameter=True, relative_step=False, warmup_init=False)
    tensors = hyper_tensors(hp)
    floats = tuple(float(t) for t in tensors)
    a = hf_adafactor_update(*args, *tensors, **flags)
    b = hf_adafactor_update(*args, *floats, **flags)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-6, atol=0), (x, y)  # observed identical or 1 ulp


def test_first_moment_averages_the_clipped_update_not_the_gradient():
    """exp_avg after step 1 is (1−β₁)·α·clip(Û), which is not (1−β₁)·G (the documented semantics)."""
    p, g = randn(0, 6, 5), randn(1, 6, 5) * 100
    st_ = init(p, use_first_moment=True)
    hp = dict(beta1=0.9, decay_rate=-0.8, eps=(1e-30, 1e-3), clip_threshold=1.0, weight_decay=0.0)
    flags = dict(use_first_moment=True, scale_parameter=False, relative_step=False, warmup_init=False)
    lr = torch.tensor(0.01, dtype=torch.float64)
    states = (st_["exp_avg"], st_["exp_avg_sq_row"], st_["exp_avg_sq_col"])
    k = torch.zeros((), dtype=torch.float64)
    out = hf_adafactor_update(p, g, *states, k, lr, *hyper_tensors(hp), **flags)
    m = out[1]
    assert math.isclose(float(m.pow(2).mean().sqrt()), 0.1 * 0.01, rel_tol=1e-5)  # RMS = (1−β₁)·lr·d
    assert float((m - 0.1 * g).norm()) > float(m.norm())


# ------------------------------------------------------------------------------------ tracing


@pytest.mark.parametrize(
    ("beta1", "lr_mode", "ndim"), list(itertools.product([None, 0.9], list(LR_MODES), [1, 2]))
)
def test_port_traces_without_host_syncs_and_is_shape_generic(beta1, lr_mode, ndim):
    use_m = beta1 is not None
    flags = dict(
        use_first_moment=use_m, scale_parameter=True, relative_step=LR_MODES[lr_mode]["relative_step"],
        warmup_init=LR_MODES[lr_mode]["warmup_init"],
    )  # fmt: skip
    update = make_update(**flags)
    names = state_names(use_first_moment=use_m, factored=ndim >= 2)
    hp = dict(beta1=beta1, decay_rate=-0.8, eps=(1e-30, 1e-3), clip_threshold=1.0, weight_decay=0.1)

    def example(shape):
        like = torch.zeros(shape)
        s = init(like, use_first_moment=use_m)
        return (like, like.clone(), *(s[n] for n in names), torch.zeros((), dtype=torch.float64),
                torch.full((), 1e-3, dtype=torch.float64), *hyper_tensors(hp))  # fmt: skip

    codes = []
    for shape in [(5,), (7,)] if ndim == 1 else [(5, 3), (7, 5)]:
        gm = make_fx(functionalize(update, remove="mutations_and_views"), tracing_mode="fake")(
            *example(shape)
        )
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert not any("_local_scalar_dense" in t or "item" in t for t in targets), targets
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == 2 + len(names) + 2 + len(hyper_names(use_m))
        codes.append(gm.code)
        # The traced graph computes exactly what the eager port computes.
        args = list(example(shape))
        args[0], args[1] = randn(0, *shape), randn(1, *shape)
        for a, b in zip(gm(*args), update(*args)):
            assert torch.equal(a, b)
    assert codes[0] == codes[1], "the traced graph depends on the parameter's shape"


# ------------------------------------------------------------------------------ state / checks


def test_state_round_trip_with_transformers(tmp_path):
    p = randn(0, 6, 5).requires_grad_(True)
    opt = HFAdafactor([p], lr=0.01, relative_step=False, beta1=0.9)
    for k in range(3):
        p.grad = randn(k + 1, 6, 5)
        opt.step()
    ours = from_hf_state(opt.state[p], use_first_moment=True, factored=True)
    assert set(ours) == {"exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "step"}
    assert ours["step"].dtype == torch.float64 and ours["step"].item() == 3
    torch.save(ours, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    back = to_hf_state(loaded, p)
    assert back["step"] == 3 and isinstance(back["step"], int)
    assert all(torch.equal(back[n], opt.state[p][n]) for n in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"))


def test_hyperparameter_checks_mirror_transformers():
    with pytest.raises(ValueError, match="relative_step"):
        check_hf_hyperparams({"lr": 0.1, "relative_step": True})
    with pytest.raises(ValueError, match="warmup_init"):
        check_hf_hyperparams({"lr": 0.1, "relative_step": False, "warmup_init": True})
    with pytest.raises(ValueError, match="lr=None"):
        check_hf_hyperparams({"lr": None, "relative_step": False})
    # ...which is what transformers itself does at its first step:
    p = torch.zeros(3, 2, requires_grad=True)
    p.grad = torch.ones(3, 2)
    with pytest.raises(TypeError):
        HFAdafactor([p], lr=None, relative_step=False).step()
    with pytest.raises(TypeError, match="eps"):
        check_hf_hyperparams({"relative_step": True, "eps": (None, 1e-3)})
    with pytest.raises(ValueError, match="beta1"):
        check_hf_hyperparams({"relative_step": True, "beta1": 1.0})
    check_hf_hyperparams({"relative_step": True})  # transformers' defaults are valid


def test_wrong_argument_count_is_a_clear_error():
    p = torch.zeros(3, 2)
    with pytest.raises(TypeError, match="expected 2 states"):
        hf_adafactor_update(p, p, p, use_first_moment=False, scale_parameter=True, relative_step=True,
                            warmup_init=False)  # fmt: skip
