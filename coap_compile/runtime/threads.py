"""Threads of an eager CPU step: small steps run single-threaded, their independent tasks on a member pool.

(Issue 20, contention and step time.)

A CPU step of a small model is hundreds of small torch ops (per-member ``X P`` and ``D Pᵀ`` GEMMs,
elementwise passes over ``M×r`` slices, the storage's load/store). With ``torch.get_num_threads() = T > 1``
every op large enough for ATen's grain size (32 768 elements) or MKL's threading is one OpenMP fork/join.
On idle cores that costs microseconds; when another process holds a core, the join waits until the
descheduled worker gets a time slice back, and *every* region pays it.

**Measured** (Intel Xeon, 2 cores, torch 2.13 CPU, MKL + OpenMP; the machine shared with five other
engineers, load 12-14; medians):

* one ``256×256 @ 256×64`` ``torch.mm``: 65 µs on 1 thread, 28 ms on 2 threads; an elementwise
  ``addcmul`` over ``8×256×64``: 41 µs vs 28 ms (one time slice per parallel region);
* the demo LM's whole ``opt.step()`` (29 projected matrices, :mod:`coap_lab.cli.overhead`, 8 interleaved
  rounds): COAP fp32 4134 ms on 2 threads vs 138 ms on 1; bf16 states 11006 vs 520 ms; torch AdamW
  4475 vs 62 ms.

So a step whose every GEMM is small runs with **one intra-op thread** (:func:`step_threads`). The trade: on
idle cores a second thread saves about a third of such a step (issue 20's quiet AMD figures for the demo
model's whole COAP step: 17.3 ms on 2 threads, 24.6 ms on 1; on the Xeon when it was idle, load 0.9-1.1,
the same optimizer's runner switched between 1 and 2 threads, 12 interleaved rounds of 20 steps: 27.4 ms on
1 thread, 17.7 ms on 2, torch AdamW 7.0 ms; two shorter runs gave 29.5/27.6 and 27.8/19.0 ms), while with a
core taken the single thread is 30× faster (above): a bounded loss (≤ 1.6×) against a collapse. A rule
that read the machine's load would pick per run, but the thread count changes MKL's summation order, so the
same run would give other bits on a busier machine; the rule stays a function of the model's shapes. The
threshold :data:`SMALL_GEMM_MACS` (``M·N·r`` of the largest projection GEMM, and the size of the largest
parameter for the full-rank ones) is 2^26 multiply-adds, about 1 ms of one core's GEMM (65 GMAC/s measured
above): beyond it a region's fork/join is a small part of the op. Larger models keep torch's setting. The
scope is restored on exit (exceptions included); traced steps (``torch.compile``) are left alone (Inductor's
generated code has its own parallel loops).

**The member pool: the second core back, without OpenMP's barrier.** Inside the lowered scope,
:func:`run_members` spreads *independent* tasks over the caller's thread and ``T − 1`` daemon workers
(``coap-member-<i>``, started on first use, one intra-op thread each). Tasks are handed out one at a time
in order (dynamic scheduling: each thread takes the first task whose :class:`Task` dependencies have
finished), so a thread that loses its core delays the batch by at most the task it holds, where an
OpenMP region's static split waits for the descheduled thread's whole share, in every region. The step
submits one batch: every group chunk of every matrix group, a fused run as its parts
(:mod:`.chunks`: disjoint members, weights, state slices and step counters; a chunk's writes form a
unit that an error does not cut); a chunk alone in its batch spreads its per-member ``X P`` and
``D Pᵀ`` GEMMs instead, and the finiteness
check its per-gradient reductions (a nested call, or one while the pool serves another caller's batch,
runs in its caller's thread). Each task runs on one thread with one intra-op thread, as
in the single-threaded step, so the results are the same bits (``tests/test_member_pool.py``:
trajectories with and without the pool, fp32/bf16/int8 states, prologue and EMA bases). Workers take
the caller's grad mode; a torch function or dispatch mode on the caller's stack (thread-local) keeps
every task in the caller's thread. On an error no further task starts but those of units already
writing, the started ones finish, and the first error is re-raised: each chunk is still updated
completely or not at all. Torch ops and the fused
loops (compiled with Inductor's C++ wrapper, :mod:`coap_compile.lowering.inductor`) run without the GIL, so
the threads overlap everywhere but in Python.

Measured, demo LM ``opt.step()`` (2-core Xeon, 2 threads, ``benchmarks/contention.py --rounds 8 --phases
2``, one process, ``benchmarks/results/member_pool/contention_cpu.csv``, commit e1153bd): quiet 20.8 ms with
the pool against 27.7 ms without it (``coap-serial``), torch AdamW 8.6 ms; with one competing busy process
29.4 against 26.4 ms, AdamW 60.5 ms (its OpenMP regions collapse), so COAP's contended/quiet ratio against
the single-threaded AdamW is 1.41 (0.95 without the pool). Two earlier runs of the pool gave 22.7 against
29.6 and 25.8 against 40.0 ms quiet, 31.2 against 30.1 and 38.7 against 35.2 ms contended: the pool gains
1.3-1.55× on idle cores and loses 4-11 % when a core is taken (the descheduled worker's last task).
A first attempt (before this design) submitted a future per GEMM and waited per group phase; it measured
slower than serial (36.6/41.0 against 26.7/27.8 ms): per-task futures and one wait per phase cost more
than the second core gave back.

**Tried and not kept: nested batches.** In the demo LM's int8 step one thread idles 9-14 ms while the other
finishes the 12×688×64 group's task (timelines of three steps). Opening a chunk's member GEMMs to threads
that had run out of tasks (a nested batch with helpers) was measured interleaved in one process, 12 rounds,
two runs: applied to every chunk, the eager fp32 step got 6 and 11 % slower (22.96 vs 20.60, 20.94 vs 19.68
ms) and int8 4-5 % faster (34.98 vs 36.48, 29.36 vs 30.76 ms); applied to fused runs only, int8 measured 10
and 4 % slower (31.55 vs 28.68, 31.21 vs 30.04 ms). Nothing above this VM's noise, for 90 more lines of
synchronization, so a task's inner calls run in its own thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MAX_MEMBER_THREADS",
    "SMALL_GEMM_MACS",
    "SMALL_PARAM_NUMEL",
    "Task",
    "intra_op_threads",
    "member_threads",
    "run_members",
    "step_threads",
]

#: Largest projection GEMM (``M·N·r`` multiply-adds) of a step that runs single-threaded on the CPU.
SMALL_GEMM_MACS = 1 << 26
#: Largest parameter (elements) of a step that runs single-threaded on the CPU (full-rank updates).
SMALL_PARAM_NUMEL = 1 << 22


def step_threads(layouts: Mapping[Any, Any]) -> int | None:
    """1 when every parameter of ``layouts`` (a plan's ``param → ParamLayout``) is on the CPU and small
    (module docstring), else None (keep torch's setting)."""
    if not layouts:
        return None
    for p, lay in layouts.items():
        if p.device.type != "cpu" or p.numel() > SMALL_PARAM_NUMEL:
            return None
        if lay.projected and p.numel() * max(1, int(lay.rank)) > SMALL_GEMM_MACS:
            return None
    return 1


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(min(n, current))`` (None, or already at most ``n``:
    unchanged); the previous count is restored on exit. While the count is lowered, :func:`run_members`
    on this thread spreads independent per-member work over the caller's former thread count."""
    before = torch.get_num_threads()
    if n is None or before <= n or torch.compiler.is_compiling():
        yield
        return
    torch.set_num_threads(n)
    width = getattr(_SCOPE, "width", 1)
    _SCOPE.width = before
    try:
        yield
    finally:
        _SCOPE.width = width
        torch.set_num_threads(before)


# -- the member pool ---------------------------------------------------------------------------------

#: Most threads (the caller's included) :func:`run_members` uses, whatever torch's thread count was.
MAX_MEMBER_THREADS = 8

_SCOPE = threading.local()  # .width: the caller's thread count while intra_op_threads lowered it
_POOLS: dict[int, _Pool] = {}  # one per process (os.getpid(): a forked child builds its own)
_POOLS_LOCK = threading.Lock()


def member_threads() -> int:
    """Threads :func:`run_members` would use on this thread now (1: it runs the tasks in order here)."""
    return max(1, min(getattr(_SCOPE, "width", 1), MAX_MEMBER_THREADS))


@dataclass(frozen=True)
class Task:
    """A task of an ordered batch for :func:`run_members`: ``run`` starts after every task whose index is
    in ``after`` (earlier in the batch) has finished. ``unit`` names the all-or-nothing unit it belongs to
    (a chunk: its weight and state writes) and ``opens``: starting it begins the unit's writes; after an
    error, only the tasks of units already opened still start, so each unit is written completely or not
    at all."""

    run: Callable[[], None]
    after: tuple[int, ...] = ()
    unit: Any = None
    opens: bool = False


def run_members(tasks: Sequence[Callable[[], None] | Task]) -> None:
    """Run every task once and return when all have finished; the first exception is re-raised after
    the tasks already started have finished (no further task starts once one has raised, except the
    remaining tasks of a :class:`Task` unit already writing).

    Inside :func:`intra_op_threads` that lowered the caller's count ``T`` to 1, the tasks are spread over
    this thread and ``T − 1`` daemon workers (each running torch with one intra-op thread), handed out
    one at a time, each thread taking the first task in order whose ``after`` tasks have finished
    (module docstring: a thread that loses its core delays the batch by at most the task it holds).
    Tasks without an order between them must be independent (disjoint outputs); each runs on one thread
    exactly as it would here, so results are bit-identical to running them in order. Anywhere else (no
    lowered scope, one task, a traced step, or the pool busy with another caller's batch) they run here,
    in order.
    """
    ordered = any(isinstance(t, Task) for t in tasks)  # plain callables: the lighter paths (no Task objects)
    if ordered:
        tasks = [t if isinstance(t, Task) else Task(t) for t in tasks]
        for i, t in enumerate(tasks):
            if any(not 0 <= j < i for j in t.after):
                raise ValueError(f"task {i} comes after {t.after}: only earlier tasks can be waited for")
    width = member_threads()
    if width <= 1 or len(tasks) <= 1 or torch.compiler.is_compiling() or _modes_active():
        _in_order(tasks, ordered)
        return
    pool = _pool(width - 1)
    if not pool.busy.acquire(blocking=False):  # another thread's step is using it: run here
        _in_order(tasks, ordered)
        return
    try:
        pool.run(tasks, width - 1, ordered)
    finally:
        pool.busy.release()


def _in_order(batch: Sequence, ordered: bool) -> None:
    """The tasks in this thread, in order: plain callables stop at the first error; ordered tasks go
    through :class:`_Batch` alone (the same rule after an error as on the pool: opened units finish)."""
    if not ordered:
        for task in batch:
            task()
        return
    alone = _Batch(batch, 0, True)
    alone.work()
    if alone.error is not None:
        raise alone.error


def _modes_active() -> bool:
    """A torch function or dispatch mode (a FLOP counter, a tracer) is on this thread's stack: such modes
    are thread-local, so the tasks run here where the mode sees them. (torch has no public query for
    the stacks; without these counters every batch runs here.)"""
    dispatch = getattr(torch._C, "_len_torch_dispatch_stack", None)
    function = getattr(torch._C, "_len_torch_function_stack", None)
    if dispatch is None or function is None:
        return True
    return bool(dispatch() or function())


def _pool(workers: int) -> _Pool:
    pid = os.getpid()
    with _POOLS_LOCK:
        pool = _POOLS.get(pid)
        if pool is None or pool.workers < workers:
            if pool is not None:
                pool.close()
            pool = _POOLS[pid] = _Pool(workers)
        return pool


class _Batch:
    """One call's tasks, handed out under a lock: plain callables in order, :class:`Task` s (``ordered``)
    as the first pending one whose ``after`` tasks have finished; ``running`` counts those started, not
    finished."""

    def __init__(self, tasks: Sequence, helpers: int, ordered: bool) -> None:
        self.tasks, self.ordered, self.next, self.running = tasks, ordered, 0, 0
        self.pending = list(range(len(tasks))) if ordered else []
        self.done, self.dropped, self.opened = [False] * len(tasks), set(), set()
        self.seats = helpers  # workers that may join (a pool built for a larger count keeps the rest idle)
        self.grad = torch.is_grad_enabled()  # thread-local: the workers take the caller's (no_grad in a step)
        self.error: BaseException | None = None
        self.stopped = False
        self.cond = threading.Condition()

    def _take(self) -> int | None:
        """The next task to start (under the lock). Ordered: the first pending task whose ``after`` tasks
        have finished; after an error (or a stop) the tasks that may no longer start are dropped first."""
        halted = self.error is not None or self.stopped
        if not self.ordered:
            if halted or self.next >= len(self.tasks):
                return None
            self.next += 1
            return self.next - 1
        if halted:
            keep = []
            for i in self.pending:  # in order: a dropped task's dependents are dropped after it
                t = self.tasks[i]
                if t.unit is None or t.unit not in self.opened or self.dropped.intersection(t.after):
                    self.dropped.add(i)
                else:
                    keep.append(i)
            self.pending = keep
        for j, i in enumerate(self.pending):
            t = self.tasks[i]
            if all(self.done[d] for d in t.after):
                del self.pending[j]
                if t.opens:
                    self.opened.add(t.unit)
                return i
        return None

    def work(self) -> None:
        while True:
            with self.cond:
                while (i := self._take()) is None:
                    if not self.pending:
                        return
                    if not self.running:  # unreachable: a pending task's earlier tasks ran or run
                        raise RuntimeError("member pool: no task can start and none is running")
                    self.cond.wait()  # a task the next one waits for is running elsewhere
                self.running += 1
            task = self.tasks[i]
            try:
                task.run() if self.ordered else task()
            except BaseException as e:  # re-raised in the caller's thread (run)
                with self.cond:
                    self.error = self.error or e
            finally:
                with self.cond:
                    self.running -= 1
                    self.done[i] = True
                    if self.ordered or not self.running:
                        self.cond.notify_all()

    def join(self) -> bool:
        with self.cond:
            if self.seats <= 0:
                return False
            self.seats -= 1
            return True

    def stop_and_wait(self) -> None:
        """No further task starts but those of opened units, which this thread finishes if need be (an
        interrupted caller included); returns when nothing runs."""
        with self.cond:
            self.stopped = True
        self.work()
        with self.cond:
            while self.running:
                self.cond.wait()


class _Pool:
    """``workers`` daemon threads that join the caller's current :class:`_Batch` when it is posted."""

    def __init__(self, workers: int) -> None:
        self.workers, self.busy = workers, threading.Lock()
        self.cond = threading.Condition()
        self.batch: _Batch | None = None
        self.generation, self.closed = 0, False
        ready = [threading.Event() for _ in range(workers)]
        for i, event in enumerate(ready):
            threading.Thread(target=self._serve, args=(event,), name=f"coap-member-{i}", daemon=True).start()
        for event in ready:  # set while the caller's scope holds torch's process-wide count at 1 too
            event.wait(10.0)

    def _serve(self, ready: threading.Event) -> None:
        # One intra-op thread here (OpenMP's and MKL's counts are per thread). torch also records the count
        # process-wide for threads it starts later; the constructor waits for this line, so that record
        # is written while the caller's lowered scope already holds it at 1 (and restores it on exit).
        torch.set_num_threads(1)
        ready.set()
        seen = 0
        while True:
            with self.cond:
                while self.generation == seen and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                seen, batch = self.generation, self.batch
            if batch is not None and batch.join():
                with torch.set_grad_enabled(batch.grad):
                    batch.work()

    def run(self, tasks: Sequence, helpers: int, ordered: bool) -> None:
        batch = _Batch(tasks, helpers, ordered)
        with self.cond:
            self.batch = batch
            self.generation += 1
            self.cond.notify_all()
        try:
            batch.work()
        finally:
            batch.stop_and_wait()
            with self.cond:
                self.batch = None
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
