"""Optimizers in several threads (issue 21 item 5): no process-global state decides a thread's step.

Reference: the same optimizers run one after the other in one thread. While another thread captures a
base optimizer (cold caches: ``make_fx`` tracing with the capturable path forced), a stepping optimizer
must take the eager path exactly as when it runs alone: its weights and states (keys, dtypes, values)
equal the sequential run's bit for bit.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

import coap_compile
from coap_compile import compiler
from coap_compile.capture import trace

STEPS = 8
RUNS = {  # name -> (base, kwargs): full-rank biases run torch's own optimizer, SGD keeps no step counter
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
}
#: signatures captured by the other thread, cold each time (not the ones the stepping threads use)
OTHERS = [
    (torch.optim.Adam, {"amsgrad": True}),
    (torch.optim.RMSprop, {"centered": True}),
    (torch.optim.SGD, {"momentum": 0.5, "nesterov": True}),
    (torch.optim.Adamax, {}),
    (torch.optim.Adagrad, {}),
]


def _cold() -> None:
    trace.clear_capture_cache()
    compiler._CACHE.clear()


def _train(name: str, start: threading.Barrier | None = None) -> tuple[list[torch.Tensor], dict]:
    base, kw = RUNS[name]
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(STEPS, 6, 24, generator=gen)
    if start is not None:
        start.wait()
    opt = coap_compile.optimize(model, base, rank=4, update_interval=2, reproject_factor=2, **kw)
    for i in range(STEPS):
        opt.zero_grad()
        model(x[i]).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()["state"]


def _capture_while(done: threading.Event, start: threading.Barrier) -> None:
    start.wait()
    i = 0
    while not done.is_set():
        base, kw = OTHERS[i % len(OTHERS)]
        trace.clear_capture_cache()
        trace.capture(base, kw, dtype=torch.float32, ndim=2)
        i += 1


def _run(name: str, start: threading.Barrier, results: dict, errors: list) -> None:
    try:
        results[name] = _train(name, start)
    except BaseException as exc:  # reported in the main thread
        errors.append(exc)


def _assert_same(a, b, what: str) -> None:
    weights_a, state_a = a
    weights_b, state_b = b
    for i, (x, y) in enumerate(zip(weights_a, weights_b)):
        assert torch.equal(x, y), f"{what}: parameter {i} differs from the sequential run"
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert sorted(state_a[i]) == sorted(state_b[i]), f"{what}: state {i} keys {sorted(state_a[i])}"
        for k in state_a[i]:
            x, y = state_a[i][k], state_b[i][k]
            assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: state {i}[{k!r}] differs"


def test_concurrent_optimizers_equal_sequential_runs_with_cold_caches():
    _cold()
    sequential = {name: _train(name) for name in RUNS}
    for attempt in range(3):  # three concurrent rounds, each from cold caches
        _cold()
        start = threading.Barrier(len(RUNS) + 1)
        done = threading.Event()
        results: dict[str, tuple] = {}
        errors: list[BaseException] = []

        threads = [threading.Thread(target=_run, args=(n, start, results, errors)) for n in RUNS]
        hammer = threading.Thread(target=_capture_while, args=(done, start))
        for t in [*threads, hammer]:
            t.start()
        for t in threads:
            t.join()
        done.set()
        hammer.join()
        assert not errors, errors
        for name in RUNS:
            _assert_same(results[name], sequential[name], f"{name} (concurrent round {attempt})")
