"""The analysis/rewrite pipeline: derived forms, state kinds, contracts, unsupported optimizers."""

from __future__ import annotations

import pytest
import sympy
import torch
from helpers import WeightAveragingSGD, randn

from coap_compile import UnsupportedOptimizerError
from coap_compile.capture import hyper_values
from coap_compile.compiler import compile_base
from coap_compile.ir import evaluate_epilogue, evaluate_scalars
from coap_compile.passes.base import CompilationUnit, Pass, PassError, PassManager, PassResult
from coap_compile.passes.decompose import GRAD, PARAM
from coap_compile.passes.verify import verify_unit

BASES = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.05}),
    "adam_l2": (torch.optim.Adam, {"weight_decay": 0.1}),
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
    "rmsprop": (torch.optim.RMSprop, {"alpha": 0.9}),
    "adafactor": (torch.optim.Adafactor, {}),
}


def _hyper(cls, kw):
    return {**cls([torch.zeros(1, requires_grad=True)], **kw).defaults}


@pytest.mark.parametrize("name", sorted(BASES))
def test_pipeline_derives_an_equivalent_form(name):
    cls, kw = BASES[name]
    compiled = compile_base(cls, _hyper(cls, kw), torch.float32)
    unit, prog = compiled.unit, compiled.program
    # CheckEquivalence ran: derived form == captured graph at random float64 points.
    assert unit.facts["equivalence_error"] <= 1e-9
    assert [n for n, _, _ in unit.log] == [
        "Normalize",
        "Analyse",
        "Decompose",
        "BuildEpilogue",
        "Rewrite",
        "CheckEquivalence",
    ]
    dec = prog.decomposition
    assert PARAM not in dec.delta.free_symbols and GRAD not in dec.delta.free_symbols
    assert sympy.diff(dec.delta, PARAM) == 0


def test_state_kinds_and_projection_points():
    adamw = compile_base(*_args("adamw")).program
    assert adamw.state_kinds == {"exp_avg": "first_moment", "exp_avg_sq": "second_moment"}
    assert adamw.decomposition.x_expr == GRAD
    assert adamw.first_moment == "exp_avg"
    l2 = compile_base(*_args("adam_l2")).program
    wd = sympy.Symbol("weight_decay")  # a live input: a symbol, not the constant 0.1
    assert sympy.simplify(l2.decomposition.x_expr - (GRAD + wd * PARAM)) == 0  # L2: project g + wd·p
    assert l2.prologue is not None
    sgd = compile_base(*_args("sgd")).program
    assert sgd.state_kinds == {"momentum_buffer": "first_moment"}  # first-step branch became a blend
    rms = compile_base(*_args("rmsprop")).program
    assert rms.first_moment is None  # the runtime keeps its own EMA for COAP's correlation step
    ada = compile_base(*_args("adafactor")).program
    assert ada.epilogue is None and ada.n_phases > 1  # reductions split the update into phases
    assert ada.decomposition.param_stats  # RMS(W) of the full weight


def _args(name):
    cls, kw = BASES[name]
    return cls, _hyper(cls, kw), torch.float32


@pytest.mark.parametrize("name", ["adamw", "adam_l2", "sgd", "rmsprop"])
@pytest.mark.parametrize("seed", [0, 1])
def test_epilogue_matches_lowrank_graph(name, seed):
    """The kernel epilogue (hoisted scalars + CSE body) computes what the eager low-rank graph does."""
    compiled = compile_base(*_args(name))
    prog = compiled.program
    ep = prog.epilogue
    assert ep is not None
    hv = hyper_values(compiled.captured, _args(name)[1])
    x = randn(seed, 9, 4)
    states = [randn(seed + 1, 9, 4).abs() for _ in prog.state_names]
    for k in (0.0, 5.0):
        step, lr = torch.tensor(k, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)
        decay, delta, *rest = prog.lowrank(torch.zeros(9, 4), x, *states, step, lr, *hv)
        c = evaluate_scalars(ep, step + 1, lr, hv)
        new_states, d = evaluate_epilogue(ep, x, states, c)
        torch.testing.assert_close(d, delta, rtol=1e-5, atol=1e-7)
        for got, want in zip(new_states, rest[:-1]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        dec = (
            ep.decay
            if isinstance(ep.decay, (int, float)) or ep.decay.is_Number
            else c[list(ep.scalar_symbols).index(ep.decay)]
        )
        torch.testing.assert_close(
            torch.as_tensor(float(dec), dtype=torch.float64),
            torch.as_tensor(decay, dtype=torch.float64),
            rtol=1e-6,
            atol=0,
        )


def test_adamw_epilogue_is_three_lines():
    """m', v', D; the scalars are functions of the live β₁, β₂, ε, λ (never their values)."""
    ep = compile_base(*_args("adamw")).program.epilogue
    assert len(ep.body) == 3 and ep.hypers == ("beta1", "beta2", "eps", "weight_decay")
    b1, b2, eps, wd, t, lr = sympy.symbols("beta1 beta2 eps weight_decay step lr")
    want = [
        1 - b1,
        b2,
        1 - b2,
        -eps * sympy.sqrt(1 - b2**t),
        lr * sympy.sqrt(1 - b2**t) / (1 - b1**t),
        1 - lr * wd,
    ]
    assert len(ep.scalars) == len(want)
    for (_, got), w in zip(ep.scalars, want):
        assert sympy.simplify(got - w) == 0, (got, w)
    assert all(not e.atoms(sympy.Float) for _, e in ep.scalars)  # no baked hyperparameter value


def test_unsupported_optimizer_names_the_node():
    with pytest.raises(
        UnsupportedOptimizerError, match=r"WeightAveragingSGD.*graph node '\w+'.*'avg'.*weight"
    ) as info:
        compile_base(WeightAveragingSGD, {"lr": 0.1}, torch.float32)
    assert info.value.node
    # ASGD has a 0-d per-parameter state (eta) and is refused at capture, naming it.
    with pytest.raises(UnsupportedOptimizerError, match="ASGD.*'eta'"):
        compile_base(torch.optim.ASGD, _hyper(torch.optim.ASGD, {}), torch.float32)


def test_generic_route_supports_adagrad_and_adamax():
    compiled = compile_base(torch.optim.Adagrad, _hyper(torch.optim.Adagrad, {}), torch.float32)
    assert compiled.program.state_kinds == {"sum": "second_moment"}
    assert compiled.program.epilogue is not None
    adamax = compile_base(torch.optim.Adamax, _hyper(torch.optim.Adamax, {}), torch.float32).program
    assert adamax.state_kinds == {"exp_avg": "first_moment", "exp_inf": "other"}  # exp_inf is a running max
    assert adamax.epilogue is not None


class _Needs(Pass):
    requires = frozenset({"never"})

    def run(self, unit):
        return PassResult(unit, False)


class _Claims(Pass):
    ensures = frozenset({"something"})

    def run(self, unit):
        return PassResult(unit, False)


def test_pass_manager_checks_contracts():
    gm = compile_base(*_args("adamw")).captured.graph_module
    unit = CompilationUnit("x", gm, ("exp_avg", "exp_avg_sq"))
    with pytest.raises(PassError, match="requires facts"):
        PassManager([_Needs()], verify_unit).run(unit)
    with pytest.raises(PassError, match="did not establish"):
        PassManager([_Claims()], verify_unit).run(unit)


def test_one_compile_per_signature():
    from coap_compile import compiler
    from coap_compile.compiler import compile_count

    compiler._CACHE.clear()  # the structural variants below must not have been compiled by another test
    compile_base(*_args("adamw"))
    before = compile_count()
    for _ in range(5):
        compile_base(*_args("adamw"))
    assert compile_count() == before
    cls, kw = BASES["adamw"]
    for betas, eps, wd in [((0.8, 0.99), 1e-6, 0.3), ((0.5, 0.5), 1e-3, 1.0)]:  # live values: same program
        hp = _hyper(cls, {**kw, "betas": betas, "eps": eps, "weight_decay": wd})
        assert compile_base(cls, hp, torch.float32) is compile_base(*_args("adamw"))
    assert compile_count() == before
    compile_base(cls, _hyper(cls, {**kw, "amsgrad": True}), torch.float32)  # structural: new signature
    compile_base(cls, _hyper(cls, {**kw, "weight_decay": 0.0}), torch.float32)  # zero decay: gated
    assert compile_count() == before + 2
