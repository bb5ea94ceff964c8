"""Run a function on ``world_size`` local processes with an initialised ``torch.distributed`` group.

For tests and examples only. Communication is ``torch.distributed`` (gloo by default) and process
management is :mod:`torch.multiprocessing`; nothing here is a communication layer of its own::

    results = run_distributed(fn, 2, x, timeout=30.0)    # [fn(x) on rank 0, fn(x) on rank 1]

Design (each point is a failure mode it removes):

* **Free port, no race.** The parent creates the rendezvous ``TCPStore`` on ``127.0.0.1`` with port 0
  (the kernel picks a free port, and the parent keeps it bound for the whole run); the workers join it
  as clients. Probing a free port and passing its number on would let another process take it first.
* **Loopback gloo.** ``GLOO_SOCKET_IFNAME`` is set to the loopback interface in the workers when it is
  unset, so gloo never depends on the host name resolving.
* **Bounded time.** One deadline covers start-up, the function and the exit. The process group gets the
  same timeout (a collective whose peer died errors instead of hanging). At the deadline, or shortly
  after any rank fails, the remaining workers are terminated, then killed, and every join has a
  timeout.
* **Errors carry the rank's stack.** A worker that raises sends its formatted traceback; the parent
  raises :class:`DistributedRunError` listing every failed rank's traceback, the ranks that timed out
  and the ranks that died without reporting (with their exit codes).
* **Results by value.** A worker's return value is pickled with the standard pickler (tensors are
  copied into the bytes, not shared through file descriptors that die with the worker) and sent over a
  queue that the parent drains before joining.
* **Oversubscription.** Each worker runs with ``num_threads`` intra-op threads (default 1): 4 ranks on
  a 2-core machine must not spawn 4×cores OpenMP threads.

Start method, decided by measurement (2-core VM, ``import coap_compile`` ≈ 3 s per interpreter, run of
a trivial all-reduce, median of 3): ``"spawn"`` 2 ranks 5.0 s, 4 ranks 9.8 s; ``"forkserver"`` with
``torch`` and ``coap_compile`` preloaded 0.5 s / 0.7 s after the first run of a session (the server
imports once: first run 3.6 s). The default is ``"forkserver"`` where the platform has it, else
``"spawn"``. Workers are forked from the server, a fresh single-threaded process that has only imported
modules, so the usual fork hazards (held locks, running OpenMP pools) do not apply.

Forked workers inherit the environment of the forkserver, i.e. the parent's at the session's first
run, not later changes of ``os.environ``: pass variables with ``env=``.

The function and its arguments must be picklable (a module-level function; ``functools.partial`` of
one is fine); it runs as ``fn(*args, **kwargs)`` with the group already initialised, and reads its rank
with ``torch.distributed.get_rank()``.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as _std_mp
import os
import pickle
import queue as _queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "default_start_method", "run_distributed"]

#: Modules the forkserver imports once, so forked workers start without re-importing them.
FORKSERVER_PRELOAD = ("torch", "coap_compile")
#: Seconds the parent waits for the other ranks' reports after the first failure, before killing.
FAILURE_GRACE_S = 3.0
_BACKENDS = ("gloo", "nccl", "mpi")


class DistributedRunError(RuntimeError):
    """Raised by :func:`run_distributed` when a rank failed, died or did not finish in time.

    Attributes:
        failures: rank → the formatted traceback that rank raised (or a line saying how it ended).
        timed_out: ranks still running at the deadline (then terminated).
    """

    def __init__(self, message: str, failures: dict[int, str], timed_out: Sequence[int]) -> None:
        super().__init__(message)
        self.failures = dict(failures)
        self.timed_out = list(timed_out)


def default_start_method() -> str:
    """``"forkserver"`` where available (fast, see the module docstring), else ``"spawn"``."""
    return "forkserver" if "forkserver" in _std_mp.get_all_start_methods() else "spawn"


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    num_threads: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    env: dict[str, str],
    results: Any,
) -> None:
    status, payload = "error", ""
    try:
        os.environ.update(env)
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            lo = _loopback_interface()
            if lo is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = lo
        torch.set_num_threads(num_threads)
        td = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=td)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
        value = fn(*args, **kwargs)
        status, payload = "ok", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # report everything, KeyboardInterrupt included, with the stack
        payload = traceback.format_exc()
    finally:
        if dist.is_initialized():
            # the group of a failed run may be unusable; the report matters more
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    results.put((rank, status, payload))


def _stop(procs: list, grace: float = 2.0) -> None:
    """Terminate, then kill, every live worker; each join is bounded."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(grace)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    start_method: str | None = None,
    num_threads: int = 1,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` processes; return the per-rank results in rank order.

    Args:
        fn: a picklable callable (module-level function); it runs after ``init_process_group``.
        world_size: number of processes (ranks ``0 … world_size-1``), an int ≥ 1.
        timeout: seconds for the whole run (start-up included); also the process group's timeout.
        backend: ``"gloo"`` (CPU), ``"nccl"`` or ``"mpi"``.
        start_method: ``"forkserver"``, ``"spawn"`` (or ``"fork"``); default :func:`default_start_method`.
        num_threads: ``torch.set_num_threads`` in each worker.
        env: environment variables set in each worker before the group is initialised.

    Raises:
        DistributedRunError: a rank raised (its traceback is in the message and in ``failures``), died
            without reporting, or the deadline passed.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got world_size={world_size!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got timeout={timeout!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got backend={backend!r}")
    env = {str(k): str(v) for k, v in (env or {}).items()}
    method = start_method or default_start_method()
    if method not in _std_mp.get_all_start_methods():
        raise ValueError(
            f"start_method must be one of {_std_mp.get_all_start_methods()}, got start_method={method!r}"
        )
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    deadline = time.monotonic() + timeout
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)  # holds the free port
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                rank,
                world_size,
                store.port,
                backend,
                timeout,
                num_threads,
                fn,
                args,
                kwargs,
                env,
                results,
            ),
            name=f"coap-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    reports: dict[int, tuple[str, Any]] = {}
    first_failure: float | None = None
    try:
        while len(reports) < world_size:
            now = time.monotonic()
            limit = deadline if first_failure is None else min(deadline, first_failure + FAILURE_GRACE_S)
            if now >= limit:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.2, limit - now))
                reports[rank] = (status, payload)
                if status != "ok" and first_failure is None:
                    first_failure = time.monotonic()
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reports and not p.is_alive()]
                if dead and first_failure is None:
                    first_failure = time.monotonic()
                if dead and len(reports) + len(dead) == world_size:
                    # a last look: a report may still be in the queue's pipe
                    try:
                        while True:
                            rank, status, payload = results.get(timeout=0.5)
                            reports[rank] = (status, payload)
                    except _queue.Empty:
                        break
    finally:
        if len(reports) == world_size:  # all reported: let them exit on their own
            for p in procs:
                p.join(max(0.5, deadline - time.monotonic()))
        alive = [p.is_alive() for p in procs]
        _stop(procs)
        results.close()
        results.join_thread()
        del store

    failures: dict[int, str] = {}
    timed_out: list[int] = []
    for rank, p in enumerate(procs):
        if rank in reports:
            if reports[rank][0] != "ok":
                failures[rank] = reports[rank][1]
        elif not alive[rank]:
            failures[rank] = f"exited with code {p.exitcode} without reporting"
        elif first_failure is None:
            timed_out.append(rank)
            failures[rank] = f"still running after the {timeout:g} s deadline; terminated"
        else:
            failures[rank] = (
                "terminated after another rank failed (it was still running, e.g. in a collective)"
            )
    if failures:
        parts = [f"rank {r}:\n{text.rstrip()}" for r, text in sorted(failures.items())]
        raise DistributedRunError(
            f"run_distributed({getattr(fn, '__name__', fn)!r}, world_size={world_size}) failed on "
            f"rank(s) {sorted(failures)}"
            + (f" (timed out: {timed_out})" if timed_out else "")
            + "\n\n"
            + "\n\n".join(parts),
            failures,
            timed_out,
        )
    return [pickle.loads(reports[r][1]) for r in range(world_size)]
