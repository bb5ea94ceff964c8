"""In-backward updates under ``DistributedDataParallel``: step each bucket right after its all-reduce.

``handle = coap_compile.step_in_backward(ddp, opt)`` (or :func:`register_step_hook`) registers a DDP
communication hook (``ddp.register_comm_hook``). For every gradient bucket DDP hands it, the hook

1. averages the bucket across ranks exactly as DDP's default does (torch's ``allreduce_hook``: divide
   by the world size, then an asynchronous sum all-reduce of the flat bucket buffer), and
2. when that all-reduce's future completes, points each of the bucket's parameters' ``.grad`` at its
   view of the reduced buffer and runs the optimizer's step restricted to those parameters
   (``CoapOptimizer.step_subset``: the same checks, refreshes, compiled update and full-rank base
   optimizer as ``opt.step()``).

At the end of the backward pass (an autograd-engine callback that runs after DDP's own finalisation) the
stepped parameters' gradients are set to ``None``, so the ``optimizer.step()`` that the training loop
still calls finds nothing left to do; the reduced values remain in DDP's buckets until the next backward.

**Replicas stay bit-identical**: every rank steps every parameter with the same reduced gradient bits
from the same state, and each parameter's update is independent of the others, so the order in which
buckets complete (it may differ across ranks) does not matter. The result also equals the normal DDP
path (``loss.backward(); opt.step()``) bit for bit on CPU with a power-of-two world size (the hook's
``÷ world_size`` and DDP's ``× 1/world_size`` are then the same exact scaling);
``tests/test_ddp_in_backward.py`` checks both with 2 gloo ranks, with ``gradient_as_bucket_view`` on and
off, across P refreshes.

**What it buys.** Overlap: a bucket's update runs while autograd computes the earlier layers' gradients
and the other buckets are in flight. Not memory: DDP's buckets hold every gradient for the whole
backward pass anyway (with ``gradient_as_bucket_view=True`` the gradients *are* the buckets), so the
full-size gradients of all layers coexist under DDP whatever the optimizer does. For gradient memory
use the single-process hooks (:mod:`coap_compile.runtime.inbackward`) or FSDP2.

**Gradient accumulation**: supported through DDP's own mechanism: run the first ``N − 1`` micro-batches
under ``with ddp.no_sync():`` (no all-reduce, no hook: the full gradients accumulate locally) and the
``N``-th outside it; its all-reduce carries the summed gradient and the hook steps once. Accumulating
``X P`` instead would change what is communicated (an all-reduce of ``M×r`` terms, a different
algorithm), so ``step_in_backward(ddp, opt, accumulation_steps=N > 1)`` is refused.

**Threads and order.** With gloo the future's callbacks run in the process group's worker threads,
concurrently with autograd, and buckets may complete in a different order on each rank; a lock
serialises the optimizer calls and buckets step in bucket-index order (a reduced bucket waits for the
lower indices; DDP's bucket assignment is the same on every rank). A non-finite gradient raises
``NonFiniteGradientError`` inside the callback; the hook keeps it (the future still completes: a failed
future would reach the user as DDP's ``RuntimeError`` wrapping the message) and raises it from the
end-of-backward callback, so ``backward()`` raises the ``NonFiniteGradientError`` itself. The reduced
gradient is the same on every rank, so every rank stops at the same bucket: the buckets below it stay
stepped (they cannot be undone, see :mod:`coap_compile.runtime.inbackward`), that bucket and the later
ones do not step, and the replicas stay bit-identical (measured without the index order: rank 1 had
stepped the embedding's bucket, rank 0 had not). Call ``optimizer.zero_grad()`` and continue.
Not supported: other comm hooks at the same time
(DDP accepts one), ``static_graph`` and ``find_unused_parameters`` are untested. DDP cannot unregister
a comm hook: ``handle.remove()`` turns it into the plain averaging all-reduce (the default behaviour),
and ``opt.step()`` steps again.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DdpStepHook", "register_step_hook"]


def _queue(fn) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class DdpStepHook:
    """State and handle of the communication hook (module docstring).

    Attributes:
        buckets_stepped: buckets whose update ran (cumulative), for tests and logs.
    """

    def __init__(self, ddp: DistributedDataParallel, optimizer: Any) -> None:
        # No reference to ``ddp`` itself: DDP's reducer holds this state, and a cycle would keep the
        # reducer alive past ``destroy_process_group`` until a garbage collection (one in 4 launches of
        # the demo test aborted at exit: "terminate called without an active exception").
        self.optimizer = optimizer
        self.process_group = ddp.process_group
        self.active = True
        self.buckets_stepped = 0
        self._lock = threading.Lock()
        self._stepped: list[Tensor] = []
        self._task: int | None = None  # the graph task whose end-of-backward callback is queued
        self._generation = 0  # backward passes seen; a callback of an earlier one does nothing
        self._failed = False  # a bucket of this backward pass raised: later buckets do not step
        self._error: BaseException | None = None  # what it raised, re-raised at the end of the backward
        self._pending: dict[int, list[tuple[Tensor, Tensor]]] = {}  # reduced, waiting for lower indices
        self._next = 0  # the bucket index that steps next

    def remove(self) -> None:
        """Stop stepping in the hook (DDP keeps the hook: it then only averages, DDP's default)."""
        self.active = False

    def __enter__(self) -> DdpStepHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- called by DDP -------------------------------------------------------------------------------
    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        fut = allreduce_hook(self.process_group, bucket)
        if not self.active:
            return fut
        task = torch._C._current_graph_task_id()
        if task != self._task:  # once per backward pass, queued after DDP's own finalisation callback
            with self._lock:
                self._task = task
                self._generation += 1
                self._failed, self._pending, self._next, self._stepped = False, {}, 0, []
                self._error = None
            _queue(self._after_ddp_finalize)
        generation, index = self._generation, bucket.index()

        def step(reduced: torch.futures.Future[Tensor]) -> Tensor:
            buffer = reduced.value()
            mine = self._owned()
            owned = [(p, g) for p, g in zip(bucket.parameters(), bucket.gradients()) if p in mine]
            with self._lock:
                if generation == self._generation and not self._failed:
                    self._pending[index] = owned
                    self._drain()
            return buffer

        return fut.then(step)

    def _drain(self) -> None:
        """Step the reduced buckets in index order (under the lock). Buckets are the same on every rank,
        so a bucket that raises (a non-finite reduced gradient: the same bits everywhere) stops every
        rank at the same bucket, whatever order their all-reduces completed in."""
        while self._next in self._pending:
            owned = self._pending.pop(self._next)
            self._next += 1
            for p, g in owned:
                p.grad = g  # this parameter's view of the reduced bucket (its local grad is done)
            try:
                self.optimizer.step_subset([p for p, _ in owned])
            except Exception as exc:  # kept for the end of the backward (module docstring)
                self._failed, self._pending, self._error = True, {}, exc
                return
            self._stepped.extend(p for p, _ in owned)
            self.buckets_stepped += 1

    def _owned(self) -> set[Tensor]:
        return {p for g in self.optimizer.param_groups for p in g["params"]}

    def _after_ddp_finalize(self) -> None:
        # DDP queues its finalisation (which writes the reduced buckets into ``.grad``) when the last bucket
        # is ready, i.e. after this callback was queued; a callback queued from a callback runs after all
        # those already queued, so the gradients are cleared after DDP has written them.
        _queue(self._clear_grads)

    def _clear_grads(self) -> None:
        self._task = None
        with self._lock:
            if self._pending and not self._failed:  # not expected: every bucket has completed by now
                raise RuntimeError(
                    f"DDP step hook: buckets {sorted(self._pending)} completed but bucket {self._next} "
                    "did not; their parameters were not stepped"
                )
            for p in self._stepped:
                p.grad = None
            self._stepped = []
            error, self._error = self._error, None
        if error is not None:
            raise error


def _hook(state: DdpStepHook, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    return state(bucket)


# DDP checks the hook's annotations as objects; ``from __future__ import annotations`` made them strings.
_hook.__annotations__ = {
    "state": DdpStepHook,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[Tensor],
}


def register_step_hook(ddp: DistributedDataParallel, optimizer: Any) -> DdpStepHook:
    """Register the step-after-all-reduce communication hook on ``ddp`` for ``optimizer`` (a
    :class:`~coap_compile.CoapOptimizer` over ``ddp.module``'s parameters); returns its handle."""
    from ..runtime.optimizer import CoapOptimizer

    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"ddp must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    if not isinstance(optimizer, CoapOptimizer):
        raise TypeError(
            f"optimizer must be a coap_compile.CoapOptimizer (from coap_compile.optimize), got "
            f"{type(optimizer).__name__}"
        )
    owned = {p for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in ddp.module.named_parameters() if p.requires_grad and p not in owned]
    if missing:
        raise ValueError(
            f"parameters {missing[:3]} of the DDP module require grad but are not in the optimizer's "
            "param_groups; the hook steps every parameter DDP reduces (build the optimizer over "
            "ddp.module)"
        )
    state = DdpStepHook(ddp, optimizer)
    ddp.register_comm_hook(state, _hook)
    return state
