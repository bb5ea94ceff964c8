"""The scalar split of a low-rank update graph (:mod:`coap_compile.lowering.scalarsplit`, issue 20).

``scalars(k, lr, *h)`` then ``body(param, x̃, *states, k, lr, *h, *scalars)`` must give exactly what
``lowrank`` gives (the same torch ops on the same operands, eagerly), and the body must read no
step/lr/hyperparameter-only computation of its own (those are what Inductor re-evaluated per vector).
"""

from __future__ import annotations

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings

import coap_compile
from coap_compile.lowering.scalarsplit import split_scalars

BASES = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.05}),
    "adam-l2": (torch.optim.Adam, {"weight_decay": 0.1}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.5}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adamax": (torch.optim.Adamax, {}),
}


def _program(name: str):
    base, kw = BASES[name]
    w = torch.nn.Parameter(torch.zeros(12, 10))
    w.grad = torch.zeros_like(w)
    opt = coap_compile.optimize([w], base, rank=3, lr=1e-2, **kw)
    opt.step()
    return opt.plan.layouts[w].program.program


def _scalar_names(gm: torch.fx.GraphModule, n_states: int) -> set[str]:
    """Nodes computed from the step/lr/hyperparameter placeholders only."""
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalar = set(ph[2 + n_states :])
    for n in gm.graph.nodes:
        if n.op == "call_function" and all(a in scalar for a in n.all_input_nodes):
            scalar.add(n)
    return {n.name for n in scalar if n.op == "call_function"}


@pytest.mark.parametrize("name", sorted(BASES))
@settings(max_examples=3, deadline=None)
@given(seed=seeds)
def test_split_equals_lowrank_bit_for_bit(name, seed):
    program = _program(name)
    lowrank, n = program.lowrank, len(program.state_names)
    split = split_scalars(lowrank, n)
    param, x = randn(seed, 2, 12, 3), randn(seed + 1, 2, 12, 3)
    states = [randn(seed + 2 + i, 2, 12, 3).abs() for i in range(n)]  # second moments must be ≥ 0
    hyper_ph = [p for p in lowrank.graph.nodes if p.op == "placeholder"][4 + n :]
    gen = torch.Generator().manual_seed(seed)
    k = torch.tensor(float(torch.randint(0, 50, (), generator=gen)), dtype=torch.float64)
    lr = torch.tensor(1e-3, dtype=torch.float64) * (1 + torch.rand((), generator=gen, dtype=torch.float64))
    hypers = [torch.rand((), generator=gen, dtype=torch.float64) * 0.5 + 0.4 for _ in hyper_ph]
    want = lowrank(param, x, *states, k, lr, *hypers)
    hoisted = split.scalars(k, lr, *hypers)
    got = split.body(param, x, *states, k, lr, *hypers, *hoisted)
    assert len(got) == len(want) and len(hoisted) == split.count
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        else:
            assert a == b


@pytest.mark.parametrize("name", sorted(BASES))
def test_body_computes_no_scalar_of_its_own(name):
    program = _program(name)
    n = len(program.state_names)
    split = split_scalars(program.lowrank, n)
    assert _scalar_names(split.body, n) == set()
    if _scalar_names(program.lowrank, n):  # something to hoist: it moved into the scalar graph
        assert split.count >= 1
        inputs = [p.name for p in split.scalars.graph.nodes if p.op == "placeholder"]
        assert inputs == [p.name for p in program.lowrank.graph.nodes if p.op == "placeholder"][2 + n :]
    assert split_scalars(program.lowrank, n) is split  # cached per graph module
