"""Intra-op threads of an eager CPU step (issue 20, :mod:`coap_compile.runtime.threads`).

A small CPU step (every projection GEMM under ``SMALL_GEMM_MACS``) runs with one intra-op thread and gives
the caller's thread count back afterwards, also when the step raises; a step with a large matrix keeps
torch's setting. The single-threaded step equals the same step run with ``torch.set_num_threads(1)``
around it (the golden trajectories, recorded with one thread, check the arithmetic itself).
"""

from __future__ import annotations

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings

import coap_compile
from coap_compile import NonFiniteGradientError
from coap_compile.runtime import chunks as chunks_mod
from coap_compile.runtime import step as step_mod
from coap_compile.runtime import threads


def _params(seed: int, shapes=((24, 16), (24, 16), (16, 24), (30, 16))):
    ws = [randn(seed + i, *s, scale=0.3).requires_grad_() for i, s in enumerate(shapes)]
    return [*ws, randn(seed + 99, 24, scale=0.1).requires_grad_()]


def _opt(params, **kw):
    groups = [{"params": params[:-1], "project": True}, {"params": params[-1:]}]
    return coap_compile.optimize(groups, torch.optim.AdamW, rank=4, update_interval=3, lr=1e-2, **kw)


def _grads(params, seed: int, step: int):
    for i, p in enumerate(params):
        p.grad = randn(seed * 1000 + 17 * step + i, *p.shape, scale=1e-2)


def _record_threads(monkeypatch) -> list[int]:
    """Thread counts seen inside the grouped chunks (on whichever thread runs them) and the per-matrix
    updater."""
    seen: list[int] = []
    for mod, name in ((chunks_mod.Chunk, "middle"), (step_mod, "projected_update_")):
        real = getattr(mod, name)

        def spy(*a, _real=real, **k):
            seen.append(torch.get_num_threads())
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    return seen


@settings(max_examples=4, deadline=None)
@given(seed=seeds)
def test_small_step_single_threaded_and_restored(seed):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        params = _params(seed)
        opt = _opt(params)
        with pytest.MonkeyPatch.context() as mp:
            seen = _record_threads(mp)
            for k in range(4):
                _grads(params, seed, k)
                opt.step()
                assert torch.get_num_threads() == 2
        assert seen and set(seen) == {1}

        torch.set_num_threads(1)  # the same trajectory with one thread set by the caller: bit-identical
        ref = _params(seed)
        ref_opt = _opt(ref)
        for k in range(4):
            _grads(ref, seed, k)
            ref_opt.step()
        for a, b in zip(params, ref):
            assert torch.equal(a.detach(), b.detach())
    finally:
        torch.set_num_threads(before)


def test_large_step_keeps_torch_threads(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "SMALL_GEMM_MACS", 24 * 16 * 4 - 1)  # the 24×16 rank-4 GEMMs are "large"
    params = _params(0)
    opt = _opt(params)
    seen = _record_threads(monkeypatch)
    for k in range(2):
        _grads(params, 0, k)
        opt.step()
    assert seen and set(seen) == {2}


def test_raising_step_restores_threads(two_threads):
    params = _params(1)
    opt = _opt(params)
    _grads(params, 1, 0)
    opt.step()
    _grads(params, 1, 1)
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert torch.get_num_threads() == 2


def test_intra_op_threads_scope(two_threads):
    with threads.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads.intra_op_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with threads.intra_op_threads(None):
        assert torch.get_num_threads() == 2
    with threads.intra_op_threads(4):  # never raises the count
        assert torch.get_num_threads() == 2


def test_step_threads_rule():
    small = _opt(_params(2))
    assert threads.step_threads(small.plan.layouts) == 1
    big = torch.zeros(threads.SMALL_PARAM_NUMEL + 1, requires_grad=True)
    assert threads.step_threads({big: small.plan.layouts[next(iter(small.plan.layouts))]}) is None
    assert threads.step_threads({}) is None
