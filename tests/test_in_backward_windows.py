"""In-backward accumulation windows (issue 21 item 1): a window closed early by ``optimizer.step()``,
re-entrant checkpointing, ``remove()`` inside a window and a failed backward.

Reference: the normal path (``loss.backward()`` per micro-batch, ``opt.step()`` per window) on the same
micro-batches, which the hooks match within float32 rounding of the projected sums (observed ≤ 3e-7 in
``tests/test_in_backward.py``), with exactly the same step counters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

import coap_compile
from coap_compile import NonFiniteGradientError
from coap_compile.runtime.inbackward import step_in_backward


def _make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 9))
    return model, coap_compile.optimize(model, torch.optim.AdamW, rank=3, update_interval=2, lr=1e-2)


def _xs(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 10, generator=gen) for _ in range(n)]


def _loss(model, x, reentrant: bool | None = None):
    if reentrant is None:
        h = model[0](x)
    else:
        h = checkpoint(model[0], x.requires_grad_(), use_reentrant=reentrant)
    return model[2](model[1](h)).square().mean()


def _assert_close(model, ref, opt, steps: int) -> None:
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert rel_err(b, a) < 5e-6, name  # float32 rounding of the projected sums (observed ≤ 3e-7)
        assert opt.state[b]["step"].item() == steps, name


def test_a_window_closed_by_step_steps_on_what_it_has_and_later_windows_stay_aligned():
    """Windows of 3 (closed by ``opt.step()``: an epoch's end), then 4, 4: step counters 1, 2, 3 as on the
    normal path (they went 1, 2, 3, 5, 7, 9 before), weights equal within rounding."""
    sizes = [3, 4, 4, 2, 4]
    xs = _xs(sum(sizes))
    ref, ref_opt = _make()
    model, opt = _make()
    step_in_backward(model, opt, accumulation_steps=4)
    i = 0
    for n, size in enumerate(sizes):
        for _ in range(size):
            _loss(ref, xs[i]).backward()
            _loss(model, xs[i]).backward()
            i += 1
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()  # the loop steps after every window; a full window has already stepped in the hooks
        assert all(p.grad is None for p in model.parameters())
        _assert_close(model, ref, opt, n + 1)


def test_reentrant_checkpointing_is_refused_and_non_reentrant_counts_once():
    xs = _xs(4)
    model, opt = _make()
    handle = step_in_backward(model, opt, accumulation_steps=2)
    with pytest.raises(RuntimeError, match=r"re-entrant backward .*use_reentrant=False"):
        _loss(model, xs[0], reentrant=True).backward()
    opt.zero_grad()
    handle.reset()
    ref, ref_opt = _make()
    for i in range(4):  # non-re-entrant checkpointing: one count per backward, exactly the normal path
        _loss(model, xs[i], reentrant=False).backward()
        _loss(ref, xs[i]).backward()
        if i % 2:
            ref_opt.step()
            ref_opt.zero_grad()
    _assert_close(model, ref, opt, 2)


def test_reentrant_checkpointing_without_accumulation_steps_each_parameter_once():
    xs = _xs(3)
    model, opt = _make()
    ref, ref_opt = _make()
    step_in_backward(model, opt)
    for x in xs:
        _loss(model, x, reentrant=True).backward()
        _loss(ref, x).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    _assert_close(model, ref, opt, 3)


def test_remove_inside_a_window_raises_naming_it_and_works_at_a_boundary():
    xs = _xs(2)
    model, opt = _make()
    handle = step_in_backward(model, opt, accumulation_steps=3)
    _loss(model, xs[0]).backward()
    with pytest.raises(RuntimeError, match=r"remove\(\) inside an accumulation window \(micro-batch 2 of 3"):
        handle.remove()
    opt.step()  # closes the window on what it has
    handle.remove()
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    _loss(model, xs[1]).backward()  # hooks gone: the normal path again
    assert all(p.grad is not None for p in model.parameters())


def test_a_failed_backward_refuses_the_next_window_until_reset():
    xs = _xs(6)
    model, opt = _make()
    handle = step_in_backward(model, opt, accumulation_steps=2)
    _loss(model, xs[0]).backward()
    hook = model[0].weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteGradientError):
        _loss(model, xs[1]).backward()
    hook.remove()
    with pytest.raises(RuntimeError, match=r"the accumulation window broke \(NonFiniteGradientError"):
        _loss(model, xs[2]).backward()  # no silent carry of the broken window's accumulators
    with pytest.raises(RuntimeError, match="window broke"):
        opt.step()
    opt.zero_grad()
    handle.reset()
    ref, ref_opt = _make()
    ref.load_state_dict(model.state_dict())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch shares the saved step tensors)
    for i in range(2, 6):  # after zero_grad + reset: windows again exactly as the normal path
        _loss(model, xs[i]).backward()
        _loss(ref, xs[i]).backward()
        if i % 2:
            ref_opt.step()
            ref_opt.zero_grad()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert rel_err(b, a) < 5e-6, name  # float32 rounding of the projected sums (observed ≤ 3e-7)
        assert opt.state[b]["step"].item() == ref_opt.state[a]["step"].item(), name
