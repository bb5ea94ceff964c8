"""transformers' Adafactor as a COAP base: the capture adapter, the checked first-moment hint, optimize().

Oracles: ``transformers.optimization.Adafactor`` itself (captured graph over 12 steps for every flag
combination; full rank with a permutation ``P``; a *virtual* ``M×r`` parameter stepped by transformers
on ``X̃ = X P`` for a genuinely low rank) and an independent closed form of the optimizer-state bytes.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import sys

import pytest
import torch
from helpers import VirtualLowRank, orthonormal, permutation, randn, rel_err

import coap_compile
from coap_compile import FixedProjection, UnsupportedOptimizerError
from coap_compile.capture import capture, capture_count, clear_capture_cache, init_states, run_captured
from coap_compile.capture.adapter_base import UpdatePlan, canonical_shape
from coap_compile.capture.adapters import AdafactorAdapter
from coap_compile.capture.generic import GenericAdapter
from coap_compile.capture.trace import _trace, adapter_for
from coap_compile.compiler import compile_base, compile_count
from coap_compile.passes.pipeline import compile_update

HFAdafactor = pytest.importorskip("transformers.optimization").Adafactor
from coap_compile.capture.hf_adapter import HFAdafactorAdapter  # noqa: E402  (needs transformers)

LR_MODES = {
    "relative": dict(relative_step=True, warmup_init=False),
    "relative+warmup": dict(relative_step=True, warmup_init=True),
    "external": dict(lr=1e-2, relative_step=False, warmup_init=False),
}
STEPS = 12
# Captured graph vs transformers, error relative to the peak ‖W‖ (states: to their own norm). Observed over
# the flag grid (fp64 and fp32) and the ndim/dtype cases below: fp64 ≤ 8.0e-17 (param), ≤ 4.2e-16 (states);
# fp32 ≤ 4.4e-8 / 2.7e-7 (RMS as √mean(x²), unfused EMAs, α_t in float64: see hf_adafactor_port).
TOL = {torch.float64: 1e-13, torch.float32: 2e-6}


def test_import_coap_compile_does_not_import_transformers():
    code = "import sys, coap_compile; sys.exit(3 if 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_adapter_routing_is_exact():
    assert isinstance(adapter_for(HFAdafactor), HFAdafactorAdapter)
    assert isinstance(adapter_for(torch.optim.Adafactor), AdafactorAdapter)

    class Sub(HFAdafactor):  # may override step(): the generic route, not the port
        pass

    assert isinstance(adapter_for(Sub), GenericAdapter)
    with pytest.raises(UnsupportedOptimizerError, match="int"):  # transformers' int step is refused there
        capture(Sub, {"lr": 1e-2, "relative_step": False})


def _run_captured_vs_hf(hp: dict, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """Worst (param, state) error of the captured graph against transformers over STEPS steps; the live
    hyperparameters (and lr) are edited in the shared param group at step 6."""
    p_ref = randn(seed, *shape, dtype=dtype, scale=1.5).requires_grad_()
    opt = HFAdafactor([p_ref], **hp)
    group = opt.param_groups[0]
    cu = capture(HFAdafactor, group, dtype=dtype, ndim=len(shape))
    count = capture_count()
    p, states = p_ref.detach().clone(), init_states(cu, p_ref.detach())
    st = [states[n] for n in cu.state_names]
    step = torch.zeros((), dtype=torch.float64)
    peak, worst_p, worst_s = float(p.double().norm()), 0.0, 0.0
    for k in range(STEPS):
        if k == 6:  # live edits: the same graph must follow them
            group["clip_threshold"], group["decay_rate"], group["eps"] = 0.05, -0.6, (1e-20, 2e-3)
            if group["beta1"] is not None:
                group["beta1"] = 0.5
            if group["weight_decay"]:
                group["weight_decay"] = 0.3
            if not group["relative_step"]:
                group["lr"] = 3e-2
        g = randn(seed + 1 + k, *shape, dtype=dtype, scale=10.0 ** (k % 3 - 1))
        p_ref.grad = g.clone()
        opt.step()
        lr = torch.tensor(group["lr"] or 0.0, dtype=torch.float64)
        p, st, step = run_captured(cu, p, g, st, step, lr, group)
        ref = opt.state[p_ref]
        assert int(step.item()) == ref["step"] == k + 1
        peak = max(peak, float(p_ref.detach().double().norm()))
        worst_p = max(worst_p, float((p.double() - p_ref.detach().double()).norm()) / peak)
        for n, s in zip(cu.state_names, st):
            worst_s = max(worst_s, rel_err(s, ref[n]))
    assert capture_count() == count, "a live edit re-captured"
    return worst_p, worst_s


GRID = list(itertools.product([None, 0.9], sorted(LR_MODES), [True, False], [0.0, 0.1]))


@pytest.mark.parametrize(("beta1", "lr_mode", "scale_parameter", "wd"), GRID)
def test_captured_graph_matches_transformers_every_flag_combination(beta1, lr_mode, scale_parameter, wd):
    hp = dict(LR_MODES[lr_mode], beta1=beta1, scale_parameter=scale_parameter, weight_decay=wd)
    err_p, err_s = _run_captured_vs_hf(hp, (6, 5), torch.float64, seed=7)
    assert err_p <= TOL[torch.float64] and err_s <= TOL[torch.float64], (hp, err_p, err_s)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_captured_graph_matches_transformers_ndim_and_dtype(shape, dtype, beta1):
    hp = dict(LR_MODES["external"], beta1=beta1, weight_decay=0.1)
    err_p, err_s = _run_captured_vs_hf(hp, shape, dtype, seed=len(shape))
    assert err_p <= TOL[dtype] and err_s <= TOL[dtype], (err_p, err_s)


def test_signature_live_and_structural():
    clear_capture_cache()  # the structural variants below must each trace once
    base = dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1)
    cu = capture(HFAdafactor, base)
    names = ["beta1", "decay_rate", "eps1", "eps2", "clip_threshold", "weight_decay"]
    assert [h.name for h in cu.hypers] == names
    assert [h.where for h in cu.hypers][2:4] == ["eps[0]", "eps[1]"]
    assert cu.state_names == ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col")
    assert dict(cu.state_kinds) == {"exp_avg": "first_moment"}
    count = capture_count()
    same = capture(HFAdafactor, {**base, "beta1": 0.5, "clip_threshold": 0.1, "eps": (1e-20, 1e-2)})
    assert same is cu and capture_count() == count  # float values are live inputs
    no_m = capture(HFAdafactor, {**base, "beta1": None})
    no_wd = capture(HFAdafactor, {**base, "weight_decay": 0.0})
    assert no_m.state_names == ("exp_avg_sq_row", "exp_avg_sq_col") and not no_m.state_kinds
    assert "weight_decay" not in [h.name for h in no_wd.hypers]  # gated zero: a constant, structural
    for flag in ("scale_parameter", "warmup_init"):
        hp = {**base, flag: not base.get(flag, flag == "scale_parameter")}
        if flag == "warmup_init":
            hp = {**hp, "relative_step": True, "lr": None}
        assert capture(HFAdafactor, hp) is not cu
    assert capture_count() == count + 4


@pytest.mark.parametrize(
    ("hp", "pattern"),
    [
        ({"lr": 1e-2}, "lr=0.01 cannot be combined with relative_step=True"),
        ({"lr": 1e-2, "relative_step": False, "warmup_init": True}, "warmup_init=True requires"),
        ({"lr": None, "relative_step": False}, "give an lr"),
        ({"beta1": 1.0}, r"beta1 must be None or in \[0, 1\)"),
        ({"clip_threshold": None}, "clip_threshold must be a number"),
    ],
)
def test_settings_transformers_refuses_are_refused(hp, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern) as info:
        capture(HFAdafactor, hp)
    assert "transformers.optimization.Adafactor" in str(info.value)


def test_constructor_drift_fails_loudly():
    class Drifted(torch.optim.Optimizer):
        def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.5):
            super().__init__(params, {"lr": lr})

    with pytest.raises(UnsupportedOptimizerError, match="constructor changed"):
        HFAdafactorAdapter(Drifted).check_signature()


# ----------------------------------------------------------------------------- the first-moment hint


def test_exp_avg_is_the_first_moment_by_a_checked_hint():
    hp = {"lr": 1e-2, "relative_step": False, "beta1": 0.9}
    prog = compile_base(HFAdafactor, hp, torch.float32).program
    assert prog.first_moment == "exp_avg"
    assert prog.decomposition.hinted == frozenset({"exp_avg"})
    assert prog.state_kinds["exp_avg_sq_row"] == "other"
    # Without the hint the classifier calls it "other" (an EMA of the update, not of x) …
    plain, _ = _compile(capture(HFAdafactor, hp), {})
    assert plain.state_kinds["exp_avg"] == "other" and plain.first_moment is None
    # … and with beta1=None there is no first moment: the runtime keeps its own coap_exp_avg.
    none = compile_base(HFAdafactor, {"lr": 1e-2, "relative_step": False}, torch.float32).program
    assert none.first_moment is None


def _compile(cu, hints):
    def make_states(like):
        st = init_states(cu, like)
        return [st[n] for n in cu.state_names]

    gm = torch.fx.GraphModule(cu.graph_module, cu.graph_module.graph)
    values = [0.9, -0.8, 1e-30, 1e-3, 1.0][: len(cu.hypers)]
    return compile_update(
        cu.optimizer, gm, cu.state_names, make_states, hyper_values=values, state_kinds=hints
    )


def _custom(update, names=("s",)):
    """Trace a hand-written ``(p, g, *states, step, lr)`` update into the graph contract."""
    plan = UpdatePlan(names, update, lambda like: {n: torch.zeros_like(like) for n in names})
    gm = _trace(plan, canonical_shape(2), torch.float32, "custom")

    def make_states(like):
        return [torch.zeros_like(like) for _ in names]

    return gm, make_states


def _normalized_ema(p, g, s, step, lr):  # s' = 0.9 s + 0.1 g/RMS(g): an EMA of a nonlinear u(x)
    s2 = s * 0.9 + g / g.square().mean().sqrt() * 0.1
    return p - s2 * lr, s2, step + 1


def test_hint_accepted_for_a_linear_recurrence_of_a_nonlinear_term():
    gm, make = _custom(_normalized_ema)
    prog, _ = compile_update("custom", gm, ("s",), make)
    assert prog.state_kinds == {"s": "other"}
    gm, make = _custom(_normalized_ema)
    prog, _ = compile_update("custom", gm, ("s",), make, state_kinds={"s": "first_moment"})
    assert prog.state_kinds == {"s": "first_moment"} and prog.decomposition.hinted == {"s"}


def _reads_itself_through_a_reduction(p, g, s, k, lr):  # not a·s + u(x): u reads s
    return p - lr * s, s * 0.9 + g * s.mean(), k + 1


def _coefficient_reads_x(p, g, s, k, lr):  # a = x is not a scalar
    return p - lr * s, s * g + g, k + 1


def _quadratic_in_state(p, g, s, k, lr):
    return p - lr * s, s * s * 0.5 + g, k + 1


def _no_recurrence(p, g, s, k, lr):
    return p - lr * s, g.square().mean().sqrt() * g, k + 1


def _free_of_x(p, g, s, k, lr):
    return p - lr * (s + g), s * 0.5 + 1.0, k + 1


def _second_moment(p, g, s, k, lr):  # proven second_moment: a first_moment hint contradicts it
    return p - lr * g / (s.sqrt() + 1), s * 0.9 + g * g * 0.1, k + 1


@pytest.mark.parametrize(
    ("update", "hint", "pattern"),
    [
        (_reads_itself_through_a_reduction, "first_moment", "through a reduction"),
        (_coefficient_reads_x, "first_moment", "not a scalar"),
        (_quadratic_in_state, "first_moment", "not affine"),
        (_no_recurrence, "first_moment", "does not read the state"),
        (_free_of_x, "first_moment", "does not read the projected quantity"),
        (_second_moment, "first_moment", "contradicts its proven kind 'second_moment'"),
        (_normalized_ema, "second_moment", "only \\['first_moment'\\] can be hinted"),
    ],
)
def test_hint_that_does_not_hold_is_refused_naming_the_state(update, hint, pattern):
    gm, make = _custom(update)
    with pytest.raises(UnsupportedOptimizerError, match=pattern) as info:
        compile_update("custom", gm, ("s",), make, state_kinds={"s": hint})
    assert "'s'" in str(info.value)


def test_hint_on_an_unknown_state_is_refused():
    gm, make = _custom(_normalized_ema)
    with pytest.raises(UnsupportedOptimizerError, match="'m', which is not a state"):
        compile_update("custom", gm, ("s",), make, state_kinds={"m": "first_moment"})
    zeros = lambda like: {"s": torch.zeros_like(like)}  # noqa: E731
    plan = UpdatePlan(("s",), _normalized_ema, zeros, state_kinds={"m": "x"})
    from coap_compile.capture.trace import _build

    class _A:
        optimizer = "custom"

        def plan(self, *a):
            return plan

    with pytest.raises(UnsupportedOptimizerError, match=r"hints name \['m'\]"):
        _build(_A(), {}, (), {}, torch.float32, 2)


# ------------------------------------------------------------------------------------ through optimize()

OPT_HP = {
    "beta1+wd": dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.05),
    "beta1+clip": dict(lr=3e-2, relative_step=False, beta1=0.5, clip_threshold=0.05, scale_parameter=False),
    "no_beta1": dict(lr=1e-2, relative_step=False, eps=(1e-3, 1e-2)),
}


@pytest.mark.parametrize("name", sorted(OPT_HP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_full_rank_permutation_equals_transformers(name, dtype, shape):
    """Full rank with a permutation P (no refresh) reproduces transformers' Adafactor on the weight."""
    kw = OPT_HP[name]
    w = randn(11, *shape, dtype=dtype).requires_grad_()
    w_base = w.detach().clone().requires_grad_()
    opt = coap_compile.optimize(
        [{"params": [w], "project": True}], HFAdafactor, rank=min(shape),
        projection=FixedProjection(permutation(3)), **kw,
    )  # fmt: skip
    base = HFAdafactor([w_base], **kw)
    for k in range(10):
        g = randn(100 + k, *shape, dtype=dtype, scale=10.0 ** (k % 3 - 1))
        w.grad, w_base.grad = g.clone(), g.clone()
        opt.step()
        base.step()
    # Observed: fp32 ≤ 1.1e-7 (the derived form re-associates the port's arithmetic, which itself is within
    # 4.4e-8 of transformers), fp64 ≤ 1.9e-16.
    err = rel_err(w.detach(), w_base.detach())
    assert err <= (1e-6 if dtype == torch.float32 else 1e-12), err


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_low_rank_equals_transformers_on_virtual_param_and_follows_live_edits(shape):
    """W' = W + (z' − z) Pᵀ with z (M×r) stepped by transformers on X̃ = X P (fixed orthonormal P; with
    scale_parameter=False α_t = lr, so the oracle needs no RMS of the full weight). At step 6 β₁ and the
    clip threshold are edited in both optimizers' param groups: the projected update follows with no
    re-capture and no re-compile, and differs from the unedited run."""
    dtype, r = torch.float64, 3
    kw = dict(lr=2e-2, relative_step=False, beta1=0.9, scale_parameter=False, clip_threshold=1.0)
    w0 = randn(5, *shape, dtype=dtype)
    make = orthonormal(9)
    proj = make(min(shape), r, dtype, "cpu")
    w, w_plain = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opts = [
        coap_compile.optimize([{"params": [v], "project": True}], HFAdafactor, rank=r,
                              projection=FixedProjection(make), **kw)
        for v in (w, w_plain)
    ]  # fmt: skip
    oracle = VirtualLowRank(HFAdafactor, w0, proj, **kw)
    counts = None
    for k in range(12):
        if k == 6:
            for group in (opts[0].param_groups[0], oracle.opt.param_groups[0]):
                group["beta1"], group["clip_threshold"] = 0.5, 0.05
            counts = (capture_count(), compile_count())
        g = randn(200 + k, *shape, dtype=dtype)
        for v, o in zip((w, w_plain), opts):
            v.grad = g.clone()
            o.step()
        expect = oracle.step(g)
        # Observed ≤ 2.7e-16 (fp64; only the association of the derived form differs).
        assert rel_err(w.detach(), expect) <= 1e-12, k
    assert (capture_count(), compile_count()) == counts, "a live edit re-captured or re-compiled"
    assert rel_err(w.detach(), w_plain.detach()) > 1e-3  # the edit changed the projected update


def _resume_run(bias: bool) -> None:
    """COAP refreshes (correlation step at k = 2, 6; low-cost SVD at k = 4) read transformers' exp_avg
    (no coap_exp_avg is created); a checkpoint taken at k = 3 loads with weights_only=True and continues
    bit-identically."""

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 24, bias=bias), torch.nn.Tanh(), torch.nn.Linear(24, 8, bias=bias)
        )
        kw = dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.01)
        opt = coap_compile.optimize(model, HFAdafactor, rank=4, update_interval=2, reproject_factor=2, **kw)
        return model, opt

    x, y = randn(1, 32, 16), randn(2, 32, 8)

    def step(model, opt):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    model, opt = build(0)
    w = model[0].weight
    assert opt.projected_parameters() == [w, model[2].weight]
    for _ in range(3):
        step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(4):
        step(model, opt)
    assert "coap_exp_avg" not in opt.state[w] and opt.state[w]["exp_avg"].shape == (24, 4)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = build(1)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(4):
        step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_correlation_step_reads_exp_avg_and_resumes_exactly_from_a_weights_only_checkpoint():
    _resume_run(bias=False)  # every parameter projected


def test_resume_with_full_rank_parameters_under_transformers_adafactor():
    """transformers' own step keeps an int ``step`` and an ``RMS`` float, so full-rank parameters of this
    base run their compiled update (tensor-only state) and resume bit-identically too."""
    _resume_run(bias=True)


def _llama_closed_form(cfg, rank: int) -> tuple[int, int]:
    """(transformers' Adafactor bytes, COAP bytes) for a LLaMA config, from the shapes alone.

    transformers, beta1 set, float32: a matrix m×n keeps exp_avg (m·n), exp_avg_sq_row (m) and
    exp_avg_sq_col (n); a vector keeps exp_avg and exp_avg_sq (2·d); its step is a Python int (0 tensor
    bytes, as the plan counts it; its 0-d ``RMS`` is not counted in the base column). COAP's full-rank
    parameters keep the same moments plus a 4-byte float32 step (they run their compiled update: this
    base's own state is not tensor-only). COAP for a projected m×n matrix (M ≥ N, rank r): P (N·r),
    exp_avg (M·r), the factored second moment of the M×r update (M + r) and the float32 step (1).
    """
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    matrices = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]  # q k v o, gate up (f×d), down (d×f)
    full = 2 * 4 * (v * d + v + d) + (2 * layers + 1) * 4 * 2 * d  # embedding, untied head, norms
    base = full + layers * sum(4 * (m * n + m + n) for m, n in matrices)
    coap = full + 4 * (2 + 2 * layers + 1)  # + a step per full-rank parameter
    for m, n in matrices:
        big, small = max(m, n), min(m, n)
        coap += layers * 4 * (small * rank + big * rank + big + rank + 1)
    return base, coap


@pytest.mark.parametrize(("size", "rank", "saved"), [("350m", 256, 0.496), ("1b", 512, 0.545)])
def test_memory_plan_llama_shows_the_saving_against_transformers_adafactor(size, rank, saved):
    from coap_lab.models import LLAMA_CONFIGS, build_llama

    cfg = LLAMA_CONFIGS[size]
    model = build_llama(cfg, device="meta")
    opt = coap_compile.optimize(
        model, HFAdafactor, rank=rank, lr=1e-3, relative_step=False, beta1=0.9,
        target_modules=[r"(q|k|v|o|gate|up|down)_proj"],
    )  # fmt: skip
    plan = opt.memory_plan()
    assert len(opt.projected_parameters()) == 7 * cfg.num_layers
    base, coap = _llama_closed_form(cfg, rank)
    assert (plan.base_bytes, plan.total_bytes) == (base, coap)
    assert abs(plan.saved_fraction - saved) < 5e-4 and plan.saved_fraction >= 0.40


def _real_vs_plan(bias: bool) -> tuple[int, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24, bias=bias), torch.nn.Linear(24, 8, bias=bias))
    opt = coap_compile.optimize(model, HFAdafactor, rank=4, lr=1e-2, relative_step=False, beta1=0.9)
    model(torch.randn(3, 40)).square().sum().backward()
    opt.step()
    tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    real = sum(v.numel() * v.element_size() for v in tensors)
    return real, opt.memory_plan().total_bytes


def test_memory_plan_equals_the_real_state_of_projected_parameters():
    real, planned = _real_vs_plan(bias=False)
    # 40×24 and 24×8 weights, r = 4: P (N·r) + exp_avg (M·r) + row (M) + col (r) + step, float32
    assert real == planned == 4 * ((24 * 4 + 40 * 4 + 40 + 4 + 1) + (8 * 4 + 24 * 4 + 24 + 4 + 1))


def test_memory_plan_counts_full_rank_parameters_exactly():
    """Full-rank parameters of this base hold their moments and a tensor step (no ``RMS``): plan == real."""
    real, planned = _real_vs_plan(bias=True)
    assert real == planned
