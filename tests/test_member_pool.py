"""The member pool of a small CPU step (issue 20, :func:`coap_compile.runtime.threads.run_members`).

A small step runs with one intra-op thread; its independent chunks (and member GEMMs) are spread over
the caller's former thread count. Checked here: every task runs exactly once, on the pool only inside a
lowered scope; the first error is re-raised and nothing starts after it; grad mode and torch modes are
respected; a busy pool runs a second caller's batch in that caller's thread; ordered batches (a task
starts after those it waits for, blocked tasks are passed, units opened before an error finish and
nothing else starts); and whole trajectories (fp32/bf16/int8 states, prologue and EMA bases, fused
loops split into their parts) are bit-identical with the pool and without it.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from helpers import randn, seeds
from hypothesis import given, settings
from torch.utils.flop_counter import FlopCounterMode

import coap_compile
from coap_compile.runtime import chunks as chunks_mod
from coap_compile.runtime import threads


def _names(n: int, *, sleep: float = 0.0, fail_at: int | None = None, meet: bool = False):
    """``n`` tasks recording (index, thread name); task ``fail_at`` raises. ``meet``: tasks 0 and 1 wait
    for each other (so two threads must run them, however late a worker wakes on a loaded machine)."""
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=20)

    def task(i: int) -> None:
        if meet and i < 2:
            barrier.wait()
        if sleep:
            time.sleep(sleep)
        with lock:
            seen.append((i, threading.current_thread().name))
        if i == fail_at:
            raise KeyError(f"task {i}")

    return [lambda i=i: task(i) for i in range(n)], seen


def test_tasks_run_once_on_the_pool_inside_a_lowered_scope(two_threads):
    tasks, seen = _names(12, sleep=0.002, meet=True)
    with threads.intra_op_threads(1):
        assert threads.member_threads() == 2
        threads.run_members(tasks)
    assert sorted(i for i, _ in seen) == list(range(12))
    names = {name for _, name in seen}
    assert threading.current_thread().name in names and any(n.startswith("coap-member-") for n in names)


def test_outside_a_lowered_scope_tasks_run_here_in_order(two_threads):
    tasks, seen = _names(6)
    threads.run_members(tasks)
    assert threads.member_threads() == 1
    assert seen == [(i, threading.current_thread().name) for i in range(6)]


def test_first_error_is_raised_after_started_tasks_and_nothing_starts_after_it(two_threads):
    tasks, seen = _names(40, sleep=0.001, fail_at=3)
    with threads.intra_op_threads(1), pytest.raises(KeyError, match="task 3"):
        threads.run_members(tasks)
    done = sorted(i for i, _ in seen)
    assert 3 in done and len(done) < 40  # stopped early: at most the tasks already handed out ran
    assert done == list(range(len(done)))  # handed out in order, none skipped
    time.sleep(0.05)
    assert len(seen) == len(done)  # no task of the failed batch runs afterwards


def test_workers_take_the_callers_grad_mode_and_one_thread(two_threads):
    ws = [torch.zeros(4, requires_grad=True) for _ in range(8)]
    found, barrier = [], threading.Barrier(2, timeout=20)

    def task(w: torch.Tensor) -> None:
        if w is ws[0] or w is ws[1]:
            barrier.wait()  # two threads (a worker among them), however late it wakes
        w.add_(1.0)  # in place on a leaf: raises unless grad mode is off in this thread
        found.append((torch.is_grad_enabled(), torch.get_num_threads(), threading.current_thread().name))

    with torch.no_grad(), threads.intra_op_threads(1):
        threads.run_members([lambda w=w: task(w) for w in ws])
    assert all(torch.equal(w.detach(), torch.ones(4)) for w in ws)
    assert len(found) == 8 and all(f[:2] == (False, 1) for f in found)
    assert any(f[2].startswith("coap-member-") for f in found)


def test_a_torch_mode_keeps_the_tasks_in_its_thread(two_threads):
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    with threads.intra_op_threads(1), FlopCounterMode(display=False) as counter:
        threads.run_members([lambda: torch.mm(a, b)] * 4)
    assert counter.get_total_flops() == 4 * 2 * 32**3  # the mode saw every product


def test_a_busy_pool_runs_another_callers_batch_in_its_own_thread(two_threads):
    started, release = threading.Event(), threading.Event()
    other: list[str] = []

    def hold() -> None:
        started.set()
        release.wait(5)

    def first_caller() -> None:
        with threads.intra_op_threads(1):
            threads.run_members([hold, hold])

    t = threading.Thread(target=first_caller)
    t.start()
    try:
        assert started.wait(5)
        with threads.intra_op_threads(1):
            threads.run_members([lambda: other.append(threading.current_thread().name)] * 3)
        assert other == [threading.current_thread().name] * 3
    finally:
        release.set()
        t.join(10)
    assert not t.is_alive()


# -- ordered batches (Task): dependencies and all-or-nothing units ----------------------------------


def test_a_task_starts_after_its_dependencies_and_later_tasks_pass_a_blocked_one(two_threads):
    """Task 1 waits for task 0, which waits for task 3: the pool must hand out 2 and 3 past the blocked
    task 1 (else task 0 times out), and task 1 must start only once task 0 has finished."""
    finished, third, log = threading.Event(), threading.Event(), []

    def first() -> None:
        log.append(("0 saw 3", third.wait(20)))
        finished.set()

    tasks = [
        threads.Task(first),
        threads.Task(lambda: log.append(("1 after 0", finished.is_set())), after=(0,)),
        threads.Task(lambda: log.append(("2", True))),
        threads.Task(lambda: (third.set(), log.append(("3", True)))),
    ]
    with threads.intra_op_threads(1):
        threads.run_members(tasks)
    assert sorted(log) == [("0 saw 3", True), ("1 after 0", True), ("2", True), ("3", True)]


def _units_batch(pool: bool):
    """Unit A opens before task F raises: A's other tasks still run, unit B (not opened) and a free task
    do not. On the pool A's opening task and F meet first (two threads), then A's waits for F's raise."""
    ran, meet, raised = [], threading.Barrier(2, timeout=20), threading.Event()

    def a_open() -> None:
        if pool:
            meet.wait()
            raised.wait(20)
            time.sleep(0.05)  # F's error is recorded before this task finishes
        ran.append("A open")

    def fail() -> None:
        if pool:
            meet.wait()
        raised.set()
        raise KeyError("F")

    batch = [
        threads.Task(a_open, unit="A", opens=True),
        threads.Task(fail),
        threads.Task(lambda: ran.append("A more"), unit="A", opens=True),
        threads.Task(lambda: ran.append("B open"), unit="B", opens=True),
        threads.Task(lambda: ran.append("free")),
        threads.Task(lambda: ran.append("A commit"), after=(0, 2), unit="A"),
    ]
    return batch, ran


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "in order"])
def test_after_an_error_opened_units_finish_and_nothing_else_starts(two_threads, pool):
    batch, ran = _units_batch(pool)
    scope = threads.intra_op_threads(1) if pool else contextlib.nullcontext()
    with scope, pytest.raises(KeyError, match="F"):
        threads.run_members(batch)
    assert sorted(ran) == ["A commit", "A more", "A open"]
    assert ran[-1] == "A commit"


def test_a_task_cannot_wait_for_a_later_one():
    with pytest.raises(ValueError, match="only earlier tasks"):
        threads.run_members([threads.Task(lambda: None, after=(1,)), threads.Task(lambda: None)])


# -- whole steps: bit-identical with and without the pool -------------------------------------------

_CASES = {
    "adamw fp32": (torch.optim.AdamW, {}),
    "adamw bf16": (torch.optim.AdamW, {"state_precision": "bf16"}),
    "adamw int8": (torch.optim.AdamW, {"state_precision": "int8"}),
    "adam L2 (prologue)": (torch.optim.Adam, {"weight_decay": 0.1}),
    "rmsprop (coap_exp_avg)": (torch.optim.RMSprop, {}),
    # fused loops (cpp_wrapper: the GIL is released inside them) of two groups run at the same time
    "adamw fp32 inductor": (torch.optim.AdamW, {"backend": "inductor"}),
}


def _trajectory(seed: int, base, kw: dict, pool: bool) -> list[torch.Tensor]:
    shapes = [(40, 24)] * 5 + [(24, 40)] * 3 + [(56, 24)] * 2  # 40×r groups of 8, 56×r of 2; r ∤ 24
    ws = [randn(seed + i, *s, scale=0.3).requires_grad_() for i, s in enumerate(shapes)]
    opt = coap_compile.optimize(
        [{"params": ws, "project": True}], base, rank=7, update_interval=3, lr=1e-2, **kw
    )
    where: set[str] = set()
    real = chunks_mod.Chunk.middle  # every chunk's elementwise pass (fused loops: a stage of their own)

    barrier, calls = threading.Barrier(2, timeout=20), []

    def spy(*a, **k):
        where.add(threading.current_thread().name)
        calls.append(1)
        if pool and len(calls) <= 2:  # the first two chunks (one step's two groups) run side by side
            barrier.wait()
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threads, "MAX_MEMBER_THREADS", 8 if pool else 1)
        mp.setattr(chunks_mod.Chunk, "middle", spy)
        for k in range(7):
            for i, w in enumerate(ws):
                w.grad = randn(seed * 1000 + 31 * k + i, *w.shape, scale=1e-2)
            opt.step()
    on_workers = any(n.startswith("coap-member-") for n in where)
    assert on_workers == pool  # the pool really ran chunks (and the serial run did not)
    state = opt.state_dict()["state"]
    return [w.detach().clone() for w in ws] + [
        t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]


@pytest.mark.parametrize("case", sorted(_CASES))
@settings(max_examples=2, deadline=None)
@given(seed=seeds)
def test_pool_steps_equal_serial_steps(case, seed):
    base, kw = _CASES[case]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with_pool = _trajectory(seed, base, kw, pool=True)
        serial = _trajectory(seed, base, kw, pool=False)
    finally:
        torch.set_num_threads(before)
    assert len(with_pool) == len(serial)
    for a, b in zip(with_pool, serial):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_failing_fused_loop_on_the_pool_leaves_each_run_all_or_nothing(two_threads):
    """Fused runs on the pool are split into parts (no whole-run task); the second loop of a step raises:
    each run is updated completely (weights and states) or not at all, and the failing one is not."""
    shapes = [(40, 24)] * 5 + [(24, 40)] * 3 + [(56, 24)] * 2  # the trajectory's groups: 8 and 2 members
    ws = [randn(5 + i, *s, scale=0.3).requires_grad_() for i, s in enumerate(shapes)]
    opt = coap_compile.optimize(
        [{"params": ws, "project": True}], torch.optim.AdamW, rank=7, update_interval=3, lr=1e-2,
        backend="inductor",
    )  # fmt: skip

    def grads(k: int) -> None:
        for i, w in enumerate(ws):
            w.grad = randn(100 * k + i, *w.shape, scale=1e-2)

    for k in range(2):  # the first step initializes per matrix, the second is grouped (compiles)
        grads(k)
        opt.step()
    grads(2)
    before = [w.detach().clone() for w in ws]
    states = [{n: v.clone() for n, v in opt.state[w].items()} for w in ws]
    real, calls, whole = chunks_mod.elementwise, [], []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunks_mod, "elementwise", flaky)
        mp.setattr(chunks_mod.Chunk, "run", lambda self: whole.append(self))
        with pytest.raises(RuntimeError, match="injected"):
            opt.step()
    assert not whole and len(calls) == 2  # both runs split into parts; their loops were called
    unchanged = 0
    for mg in opt.plan.matrix_groups:
        idx = [next(i for i, w in enumerate(ws) if w is p) for p in mg.members]
        weights = {not torch.equal(ws[i].detach(), before[i]) for i in idx}
        moved = {any(not torch.equal(v, states[i][n]) for n, v in opt.state[ws[i]].items()) for i in idx}
        assert len(weights) == 1 and weights == moved  # all or nothing, weights and states together
        unchanged += not weights.pop()
    assert len(opt.plan.matrix_groups) == 2 and unchanged >= 1


def test_threads_started_after_a_pooled_step_get_the_callers_count(two_threads):
    """The workers set one intra-op thread for themselves; torch's process-wide record of the count (what a
    thread started later begins with) is the caller's again after the step."""
    params = [randn(7 + i, 40, 24, scale=0.3).requires_grad_() for i in range(6)]
    opt = coap_compile.optimize([{"params": params, "project": True}], torch.optim.AdamW, rank=5, lr=1e-2)
    for k in range(3):
        for i, p in enumerate(params):
            p.grad = randn(100 * k + i, *p.shape, scale=1e-2)
        opt.step()
    assert any(t.name.startswith("coap-member-") for t in threading.enumerate())
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join(10)
    assert seen == [2] and torch.get_num_threads() == 2


def test_a_pool_built_for_more_threads_uses_only_the_callers_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        with threads.intra_op_threads(1):
            threads.run_members(_names(8, sleep=0.002)[0])  # builds (or keeps) a pool of ≥ 3 workers
        torch.set_num_threads(2)
        tasks, seen = _names(24, sleep=0.002, meet=True)
        with threads.intra_op_threads(1):
            threads.run_members(tasks)
        assert sorted(i for i, _ in seen) == list(range(24))
        assert len({name for _, name in seen}) == 2  # the caller and one worker, not the whole pool
    finally:
        torch.set_num_threads(before)
