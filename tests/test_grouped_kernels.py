"""Kernel groups (:mod:`coap_compile.runtime.grouped_kernels`): on the kernel path, matrices with equal
``M×r`` states step in one grouped K1 and one grouped K2 launch, bit-identical to the per-matrix kernel
path (``grouped=False``, same backend) on weights and every state tensor, across refreshes.

``backend="triton"`` runs the kernels under the Triton interpreter on CPU (``tests/conftest.py``); on a
CUDA machine (no interpreter) those tests skip, and the ``cuda``-marked one runs the compiled kernels
(``backend="auto"``: CUDA tensors), part of ``make gpu-check``.
"""

from __future__ import annotations

import contextlib
import os
import unittest.mock

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings
from hypothesis import strategies as st

import coap_compile
from coap_compile.kernels import launch
from coap_compile.runtime import precision as precision_mod

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="backend='triton' on CPU: TRITON_INTERPRET=1")

#: four share M = 24 (two 24×16, a transposed 16×24, one of width 12), one (30×16) is alone.
SHAPES = [(24, 16), (16, 24), (24, 12), (24, 16), (30, 16)]
BASES = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    "adam-l2": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),  # prologue X = G + λW
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
}


CASES = [("adamw", "fp32"), ("adam-l2", "fp32"), ("sgd", "fp32"), ("adamw", "bf16"), ("adamw", "int8"),
         ("sgd", "int8")]  # fmt: skip


@contextlib.contextmanager
def _quantized_small_states():
    """int8 storage quantizes the 24×5 states while the optimizers are built (the layouts keep their
    storages); the storage cache is cleared on both sides so no other test sees this one."""
    precision_mod._storage.cache_clear()
    try:
        with unittest.mock.patch.object(precision_mod, "INT8_MIN_NUMEL", 0):
            yield
    finally:
        precision_mod._storage.cache_clear()


def _build(seed, grouped, base="adamw", device="cpu", **kw):
    params = [randn(seed + i, *s, scale=0.3).to(device).requires_grad_() for i, s in enumerate(SHAPES)]
    cls, base_kw = BASES[base]
    opt = coap_compile.optimize(
        [{"params": params, "project": True}], cls, rank=5, grouped=grouped,
        backend="triton" if device == "cpu" else "auto",
        **{"update_interval": 2, "reproject_factor": 2, **base_kw, **kw},
    )  # fmt: skip
    return params, opt


def _grads(params, seed, step, skip=()):
    for i, p in enumerate(params):
        g = randn(seed * 1000 + 17 * step + i, *p.shape, scale=1e-2).to(p.device)
        p.grad = None if i in skip else g


def _assert_same(pa, oa, pb, ob, where):
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a.detach(), b.detach()), f"{where}: weight {i}"
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{where}: weight {i} state {k}"


@needs_interpreter
@settings(deadline=None, max_examples=4)
@given(
    seed=seeds,
    case=st.sampled_from(CASES),
)
def test_kernel_groups_bit_identical_to_per_matrix_kernels(seed, case):
    """6 steps (init, correlation steps at k = 2, 4, SVDs at 4 …), member 2 without a gradient at step 3
    (its run breaks, it steps alone and its count falls behind): weights, states (values, codes, scales,
    rng counters, steps) equal the per-matrix kernels' bit for bit; the group ran as grouped launches."""
    base, precision = case
    kw = {} if precision == "fp32" else {"state_precision": precision}
    with _quantized_small_states():
        pa, oa = _build(seed, True, base, **kw)
        pb, ob = _build(seed, False, base, **kw)
    assert [len(g.members) for g in oa.plan.matrix_groups] == [4] and ob.plan.matrix_groups == ()
    for step in range(6):
        skip = (2,) if step == 3 else ()
        _grads(pa, seed, step, skip)
        _grads(pb, seed, step, skip)
        oa.step()
        ob.step()
        _assert_same(pa, oa, pb, ob, f"{base}/{precision} step {step}")
    assert oa.grouped_runs and oa.grouped_runs[0][0].kernels == ("triton", "auto")
    keys = set(oa.state[pa[0]])
    suffix = {"fp32": "step", "bf16": ".rng", "int8": ".q8"}[precision]  # stochastic bf16, quantized int8
    assert any(k.endswith(suffix) for k in keys), keys


@needs_interpreter
def test_two_launches_per_group_and_explain():
    """A steady step of the group: one grouped K1 and one grouped K2 (grid axis 1 = 4 members), plus the
    lone matrix's two; explain() names the kernel group and why the other matrix runs alone."""
    pa, oa = _build(0, True, update_interval=100)
    for step in range(2):
        _grads(pa, 0, step)
        oa.step()
    grids = []
    real = launch._launch
    launch._launch = lambda *a, **k: (real(*a, **k), grids.append(a[1]))
    try:
        _grads(pa, 0, 2)
        oa.step()
    finally:
        launch._launch = real
    assert sorted(g[1] if len(g) > 1 else 1 for g in grids) == [1, 1, 4, 4]
    text = oa.explain()
    assert "kernel path (backend='triton'" in text and "one grouped K1 + one grouped K2" in text
    assert "no other matrix with its state shape" in text


@needs_interpreter
def test_kernel_path_reasons():
    """Kernel-path matrices whose update K1 cannot take stay per matrix, with the reason in explain()."""
    params = [randn(i, 24, 16).requires_grad_() for i in range(3)]
    opt = coap_compile.optimize([{"params": params, "project": True}], torch.optim.RMSprop, rank=4,
                                backend="triton", lr=1e-3)  # fmt: skip
    assert opt.plan.matrix_groups == ()
    assert "kernel path keeping coap_exp_avg" in opt.explain()
    opt = coap_compile.optimize([{"params": params, "project": True}], torch.optim.Adafactor, rank=4,
                                backend="triton", lr=1e-2)  # fmt: skip
    assert opt.plan.matrix_groups == ()
    assert "kernel path with reductions" in opt.explain()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_cuda_kernel_groups_bit_identical_and_two_launches(precision):
    """The compiled kernels (CUDA, ``backend="auto"``): grouped launches equal the per-matrix kernels bit
    for bit over 6 steps with refreshes, and a steady step launches 2 kernels for the group + 2 alone."""
    from coap_compile.kernels import count_launches

    kw = {} if precision == "fp32" else {"state_precision": precision}
    with _quantized_small_states():
        pa, oa = _build(0, True, device="cuda", **kw)
        pb, ob = _build(0, False, device="cuda", **kw)
        pc, oc = _build(0, True, device="cuda", update_interval=100, **kw)  # nothing due at k = 2
    for step in range(6):
        _grads(pa, 0, step)
        _grads(pb, 0, step)
        oa.step()
        ob.step()
        _assert_same(pa, oa, pb, ob, f"cuda {precision} step {step}")
    for step in range(3):
        _grads(pc, 0, step)
        with count_launches() as counts:
            oc.step()
    assert sum(counts.values()) == 4 and sum(v for k, v in counts.items() if k.endswith("grouped")) == 2


@needs_interpreter
def test_compiled_training_step_groups_and_matches_per_matrix():
    """``torch.compile`` (aot_eager) of a whole training step on the kernel path: the grouped op traces
    without graph breaks, launches 2 kernels for TinyLM's group (up 40×24, down 24×40) per step, and the
    weights equal the compiled per-matrix kernel path's bit for bit."""
    from test_runtime import TinyLM

    from coap_compile.kernels import count_launches

    def make(grouped):
        torch.manual_seed(0)
        model = TinyLM()
        opt = coap_compile.optimize(model, torch.optim.AdamW, rank=8, update_interval=3, reproject_factor=2,
                                    lr=1e-2, backend="triton", grouped=grouped)  # fmt: skip

        def train_step(ids):
            logits = model(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()

        return model, opt, torch.compile(train_step, backend="aot_eager")

    torch._dynamo.reset()
    (ma, oa, sa), (mb, _, sb) = make(True), make(False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # init, steady, correlation step at k = 3 (refreshes run eagerly)
        ids = torch.randint(0, 50, (2, 9), generator=gen)
        with count_launches() as counts:
            sa(ids)
        sb(ids)
        assert sum(counts.values()) == 2 and [len(g.members) for g, _ in oa.grouped_runs] == [2], counts
    for (name, a), b in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(a, b), name
