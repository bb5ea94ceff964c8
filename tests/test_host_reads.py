"""A sync-free steady step: host reads of tensor values counted during ``opt.step()``.

What is counted on CPU, where every tensor is on the host: every read of a tensor's value by the host
(``aten._local_scalar_dense``, which ``item()``, ``float()``, ``int()`` and ``bool()`` reach, through a
``TorchDispatchMode``; ``tolist()``/``numpy()``, which bypass the dispatcher, through a
``TorchFunctionMode``). Reads of 0-d float64 tensors are reported apart: they are the live scalars
(``lr``, hyperparameters, the decay derived from them; :mod:`coap_compile.runtime.scalars`), which are
CPU tensors on every device, so reading them never waits for the accelerator. Every other read would
be a device sync on a GPU: the step counters (``state["step"]``), the states, the gradients' finiteness
verdict and ``found_inf``. The models here have only projected matrices (no full-rank parameter: torch's
own optimizer reads its CPU ``step`` tensors, its business).

Before issue 22 a steady step read every projected parameter's ``state["step"]`` (``.item()`` in the
schedule) and each matrix group's counters (``tolist()``): 7 + 1 reads here instead of 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import coap_compile
from tests.helpers import randn

SHAPES = [(24, 16), (24, 16), (16, 24), (24, 16), (30, 16), (24, 12), (30, 16)]


class HostReads(TorchDispatchMode):
    """Records ``(dtype, shape, owned)`` of every host read; ``owned``: the tensor shares storage with one
    of ``owned`` (the optimizer's state tensors)."""

    def __init__(self, owned=()):
        super().__init__()
        self.owned = {t.untyped_storage().data_ptr() for t in owned}
        self.reads: list[tuple[torch.dtype, tuple, bool]] = []
        self._fn = _FunctionReads(self)

    def note(self, t: torch.Tensor) -> None:
        self.reads.append((t.dtype, tuple(t.shape), t.untyped_storage().data_ptr() in self.owned))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.note(args[0])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._fn.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._fn.__exit__(*exc)

    @property
    def device_reads(self) -> list:
        """The reads that would sync an accelerator (module docstring)."""
        return [r for r in self.reads if not (r[0] == torch.float64 and r[1] == ())]


class _FunctionReads(TorchFunctionMode):
    def __init__(self, sink: HostReads):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.sink.note(args[0])
        return func(*args, **(kwargs or {}))


def _owned(opt) -> list[torch.Tensor]:
    return [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


def _setup(grouped: bool, check_finite: bool = True, update_interval: int = 1000, seed: int = 0):
    params = [randn(seed + i, *s, scale=0.3).requires_grad_() for i, s in enumerate(SHAPES)]
    opt = coap_compile.optimize(
        [{"params": params, "project": True}], torch.optim.AdamW, rank=4, lr=1e-2,
        update_interval=update_interval, reproject_factor=2, grouped=grouped, check_finite=check_finite,
    )  # fmt: skip
    return params, opt


def _grads(params, step: int) -> None:
    for i, p in enumerate(params):
        p.grad = randn(1000 * step + i, *p.shape, scale=1e-2)


def _steady_reads(params, opt, steps=range(2, 5), **step_kw) -> list[HostReads]:
    _grads(params, 0)
    opt.step()  # init (reads: new tensors)
    _grads(params, 1)
    opt.step()  # the groups pack their states (new step views)
    out = []
    for k in steps:
        _grads(params, k)
        with HostReads(_owned(opt)) as reads:
            opt.step(**step_kw)
        out.append(reads)
    return out


@pytest.mark.parametrize("grouped", [True, False])
def test_steady_step_reads_only_the_finite_check(grouped):
    params, opt = _setup(grouped)
    for reads in _steady_reads(params, opt):
        assert [r for r in reads.reads if r[2]] == []  # no step counter or state read
        assert reads.device_reads == [(torch.bool, (), False)], reads.device_reads  # the finite verdict
    if grouped:
        assert opt.grouped_runs, "the grouped path was not taken"


@pytest.mark.parametrize("grouped", [True, False])
def test_no_device_read_without_the_finite_check(grouped):
    params, opt = _setup(grouped, check_finite=False)
    for reads in _steady_reads(params, opt):
        assert reads.device_reads == [], reads.device_reads


def test_found_inf_is_the_one_read():
    """``found_inf`` replaces the finite check: read once, the gradients are not checked again."""
    params, opt = _setup(True)
    for reads in _steady_reads(params, opt, found_inf=torch.zeros(())):
        # found_inf.any() (one bool), and no second read for the finite check (2 reads before)
        assert reads.device_reads == [(torch.bool, (), False)], reads.device_reads
    ref_params, ref = _setup(True)
    _steady_reads(ref_params, ref)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)  # same trajectory as without found_inf
    _grads(params, 9)
    before = [p.detach().clone() for p in params]
    with HostReads() as reads:
        opt.step(found_inf=torch.ones(()))  # skipped: nothing written, counters unchanged
    assert len(reads.device_reads) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(opt.step_count(p) == int(opt.state[p]["step"]) == 5 for p in params)


def _run(params, opt, steps):
    for k in steps:
        _grads(params, k)
        opt.step()


@pytest.mark.parametrize("grouped", [True, False])
def test_counters_follow_the_tensors(grouped):
    """The host counts agree with ``state["step"]`` through refreshes (update_interval 3), a checkpoint
    round trip, a deepcopy and a user's in-place edit; the trajectory with the round trip is the
    uninterrupted one, bit for bit (refreshes at the same steps)."""
    ref_params, ref = _setup(grouped, update_interval=3)
    _run(ref_params, ref, range(10))
    params, opt = _setup(grouped, update_interval=3)
    _run(params, opt, range(4))
    params2, opt2 = _setup(grouped, update_interval=3, seed=50)  # other weights, then the checkpoint
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    opt2.load_state_dict(opt.state_dict())
    _run(params2, opt2, range(4, 7))
    opt3 = copy.deepcopy(opt2)
    params3 = opt3.param_groups[0]["params"]
    for p in params3:
        assert opt3.step_count(p) == int(opt3.state[p]["step"]) == 7
    _run(params3, opt3, range(7, 10))
    for a, b in zip(params3, ref_params):
        assert torch.equal(a, b)
    p0 = params3[0]
    opt3.state[p0]["step"].fill_(2.0)  # a user's in-place edit: the version moved, the tensor is read
    assert opt3.step_count(p0) == 2
    assert all(opt3.step_count(p) == int(opt3.state[p]["step"]) for p in params3)


def test_in_backward_scoped_steps_keep_counts():
    params, opt = _setup(True, update_interval=3)
    _run(params, opt, range(3))
    _grads(params, 3)
    opt.step_subset(params[:2])
    assert [opt.step_count(p) for p in params] == [4, 4, 3, 3, 3, 3, 3]
    assert all(opt.step_count(p) == int(opt.state[p]["step"]) for p in params)
    for p in params[:2]:
        p.grad = None
    opt.step()  # the rest catch up (a run of the group with equal counts)
    assert all(opt.step_count(p) == int(opt.state[p]["step"]) == 4 for p in params)
