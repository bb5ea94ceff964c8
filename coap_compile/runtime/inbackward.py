"""In-backward updates: each parameter steps as soon as its gradient is ready, then the gradient is freed.

``handle = coap_compile.step_in_backward(model, opt)`` registers a ``register_post_accumulate_grad_hook``
on every parameter of ``model`` that ``opt`` (a :class:`~.optimizer.CoapOptimizer`) owns. When autograd
has accumulated ``p.grad`` the hook runs the optimizer's own step restricted to ``p``
(``CoapOptimizer.step_subset``: the same checks, refresh schedule, compiled update, inner base
optimizer for full-rank parameters) and sets ``p.grad = None``, so the full-size gradients of all layers
never coexist: the live gradient bytes peak at the largest single gradient instead of their sum.

**One optimizer object.** There is no per-parameter optimizer: ``state_dict``/``load_state_dict``,
LR schedulers (they edit ``param_groups``, which every hook reads), ``zero_grad`` and checkpoint resume
work exactly as on the normal path, and the result is *bit-identical* to it on CPU
(``tests/test_in_backward.py``): each parameter's update is independent of the others (its own step
counter ``k``, its own refresh schedule, its own stochastic-rounding stream), so the order in which the
hooks fire does not matter. ``optimizer.step()`` in the loop then has nothing left to do (every
gradient it would read was stepped and freed; it costs one pass over ``param_groups``), and the LR
scheduler's "step() before lr_scheduler.step()" check is satisfied by the hooks' calls.

**Cost** (demo model, batch 4×64, 1 thread, median of 50 steps, backward + step): 98.2 ms normal vs
127.5 ms in-backward. Each hook runs the scoped step's checks and refresh planning (≈0.55 ms per
parameter) and the per-matrix update: a scoped step cannot use the grouped update (:mod:`.grouped`),
whose members are all ready only at the end of the backward pass.

**Why a function and not an ``optimize()`` option.** Hooks belong to the model and the training loop:
the same optimizer (built by ``optimize``, restored from a checkpoint, wrapped by Hugging Face) can be
switched to in-backward updates and back (``handle.remove()``), and a ``DistributedDataParallel``
module needs a communication hook instead (``step_in_backward(ddp, opt)`` registers
:mod:`coap_compile.distributed.backward`'s hook).

**Gradient accumulation** (``accumulation_steps=N``): backward passes are counted (an autograd-engine
callback at the end of each backward that reached a hooked parameter); the ``N``-th one steps. Between
refreshes the projection is linear, so a projected weight accumulates ``A = Σᵢ Xᵢ P`` (``M×r``) and
frees each full gradient; at the boundary the step uses ``X̃ = X_N P + A = (Σᵢ Xᵢ) P``, equal to the
normal path on the summed gradient up to float32 rounding (the sums are taken in another order). A
weight accumulates its full gradient instead (autograd's own ``+=``, exactly the normal path) when the
step at the boundary needs the full ``X``:

* its state does not exist yet (``k = 0``: the randomized range finder reads ``X``);
* a refresh is due at ``k`` (COAP's correlation step and low-cost SVD, GaLore's SVD, DCT's column
  choice read the *summed* ``X`` of the boundary step; Flora's resampling would not, but it is treated
  alike) or a re-base (rank, policy or storage precision changed);
* it is Tucker-projected (4-D), or full-rank (biases, norms, embeddings: their base optimizer needs
  ``G``);
* its base's prologue is not ``X = G + c(W)`` (checked numerically once per program: Adam's L2 decay
  ``G + λW`` qualifies, since ``W`` does not change within the window and ``c(W)`` enters once through the
  boundary's gradient).

So on a refresh step the projected weights hold full gradients across the window, as the normal path
does; on the other steps (``update_interval − 1`` of every ``update_interval``) they hold ``M×r``.
The decision is made at a weight's first micro-batch of each window. Checkpoint at boundaries: the
accumulators ``A`` are not part of ``state_dict`` (the normal path does not save gradients either).

**Windows** (issue 21; before, each of these drifted silently):

* *Closed early.* ``optimizer.step()`` before the ``N``-th backward (an epoch's end after 3 of 4
  micro-batches) closes the window and **steps on what it has** (an optimizer step pre-hook: every weight
  of the window steps on its partial sum, as the normal path's ``step()`` would), and the next window
  starts at micro-batch 0. Chosen over raising because it is what the same loop does without the hooks,
  so a loop written for the normal path keeps its meaning (before, the count carried over and every
  later iteration stepped twice: counters 1, 2, 3, 5, 7, 9).
* *Counted once per user backward.* A backward is counted at the end of its autograd graph task. A
  re-entrant backward (``torch.utils.checkpoint(..., use_reentrant=True)``: the checkpoint's backward
  calls ``torch.autograd.backward`` inside the user's) runs a nested graph task that ends first, and the
  user's task id is not reachable from it, so it cannot be attributed to the user's backward: a hook
  that fires in a nested task is **refused** (RuntimeError naming the parameter and ``use_reentrant``;
  detected from the stack: an engine entry above an autograd Function's ``backward``). The
  non-re-entrant mode runs in the user's graph task and is exact; with ``accumulation_steps=1`` nothing
  is counted and re-entrant checkpointing works.
* ``remove()`` *inside a window* raises, naming it (step or ``reset()`` first), instead of dropping the
  accumulators; leaving the context manager on an exception resets and removes.
* *A backward that raised* (a non-finite gradient, an error in a step) breaks the window: the next hook
  and ``optimizer.step()`` refuse (RuntimeError naming the failure) until ``reset()``, so nothing of the
  broken window is carried into the next one.

**Finiteness** (``check_finite=True``): every micro-batch's gradient is checked before it is
accumulated or stepped; a non-finite one raises :class:`~coap_compile.NonFiniteGradientError` from
``backward()`` and that parameter, its state and its accumulator are left unchanged. **Parameters
already stepped in the same backward pass stay stepped: they cannot be undone** (that would need a copy
of every weight, which in-backward updates exist to avoid). After such an error call
``optimizer.zero_grad()`` and ``handle.reset()`` (drops the window's accumulators and restarts the
count) before continuing; with ``accumulation_steps > 1`` the hooks refuse to run until then. A
deferred check of every gradient before any step would need all gradients
alive at once, i.e. the normal path: use that when all-or-nothing steps matter.

**Data parallel**: pass the ``DistributedDataParallel`` module itself (its communication hook steps
after the all-reduce). Hooks on the bare module's parameters would run before DDP has reduced the
gradient, stepping each replica with its local gradient.

**Not available in-backward**: global gradient-norm clipping (``clip_grad_norm_`` needs every gradient
before any step; after the backward it finds no gradients and does nothing) and ``GradScaler`` (its
``unscale_``/inf check run between backward and step). Use bf16 autocast, which needs no scaler.
``optimizer.step()`` inside a window closes it (above).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import NonFiniteGradientError
from .layout import Kind
from .optimizer import CoapOptimizer
from .schedule import Need, due
from .validate import all_finite, check_gradients

__all__ = ["InBackward", "accumulation_needs_full_gradient", "step_in_backward"]


def _engine_callback(fn) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class InBackward:
    """Handle of :func:`step_in_backward` (per-parameter hooks); see the module docstring.

    Attributes:
        accumulation_steps: backward passes per optimizer step.
        micro_batch: index (``0 … N−1``) of the next backward pass within the accumulation window.
    """

    def __init__(self, optimizer: CoapOptimizer, params: list[Tensor], accumulation_steps: int) -> None:
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.micro_batch = 0
        self.params = params
        self._acc: dict[Tensor, Tensor] = {}  # projected weight -> Σ Xᵢ P of this window (M×r)
        self._lowrank: dict[Tensor, bool] = {}  # weight -> accumulates X P (True) or G (False), per window
        self._task: int | None = None  # graph task of the backward being counted
        self._additive: dict[int, bool] = {}  # id(program) -> its prologue is G + c(W)
        self._failed: str | None = None  # why the window broke (a raising backward); cleared by reset()
        self._own_step = False  # inside this handle's own step_subset calls
        self._handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._hook) for p in params
        ]
        if accumulation_steps > 1:
            self._handles.append(optimizer.register_step_pre_hook(self._before_user_step))

    # -- public ----------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks (the optimizer then steps in ``optimizer.step()`` again). Inside an accumulation
        window (micro-batches counted or accumulators held) it raises instead, naming the window: call it at
        a boundary, after ``optimizer.step()`` (which steps what the window holds) or after ``reset()``."""
        if self._pending():
            raise RuntimeError(
                f"remove() inside an accumulation window ({self._window()}) would drop its accumulated "
                "gradients: call optimizer.step() first (it steps what the window holds), or reset() to "
                "drop them, then remove()"
            )
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()

    def reset(self) -> None:
        """Drop the accumulators of the current window and restart the micro-batch count (after an error
        inside a backward pass: required then, the next backward refuses to run the hooks until it is
        called). Full gradients accumulated by autograd are cleared by ``zero_grad``."""
        self._acc.clear()
        self._lowrank.clear()
        self.micro_batch = 0
        self._task = None
        self._failed = None

    def accumulator_bytes(self) -> int:
        """Bytes of the live low-rank accumulators ``Σ Xᵢ P``."""
        return sum(a.numel() * a.element_size() for a in self._acc.values())

    def __enter__(self) -> InBackward:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:  # leaving on an error: the window is dropped, not reported again
            self.reset()
        self.remove()

    def _pending(self) -> bool:
        return bool(self.micro_batch or self._acc or self._lowrank)

    def _window(self) -> str:
        return f"micro-batch {self.micro_batch + 1} of {self.accumulation_steps}"

    def _before_user_step(self, _opt: object, *_: object) -> None:
        """``optimizer.step()`` called by the training loop inside a window (an epoch's end after fewer
        than ``N`` micro-batches): the window closes here and steps on what it has (module docstring)."""
        if self._own_step or not self._pending():
            return
        if self._failed is not None:
            raise RuntimeError(
                f"the accumulation window broke ({self._failed}); call optimizer.zero_grad() and "
                "handle.reset() before stepping"
            )
        self._flush()

    # -- hooks -----------------------------------------------------------------------------------------
    def _hook(self, p: Tensor) -> None:
        if self.accumulation_steps == 1:
            self._step_subset([p])
            p.grad = None
            return
        if self._failed is not None:
            raise RuntimeError(
                f"the accumulation window broke ({self._failed}); call optimizer.zero_grad() and "
                "handle.reset() before the next backward pass"
            )
        try:
            self._count(p)
            self._accumulate_or_step(p)
        except BaseException as exc:
            if self._failed is None:
                self._failed = f"{type(exc).__name__} in {self._window()}"
            raise

    def _count(self, p: Tensor) -> None:
        """Count each user backward once: an engine callback at the end of its graph task. A hook that fires
        in a nested graph task (a re-entrant backward, ``torch.utils.checkpoint(..., use_reentrant=True)``)
        is refused: its task ends before the user's, so it would be counted as a backward of its own."""
        task = torch._C._current_graph_task_id()
        if task == self._task:
            return
        if _reentrant():
            raise RuntimeError(
                f"parameter {self.optimizer.param_name(p)!r}'s gradient comes from a re-entrant backward "
                "(torch.utils.checkpoint(..., use_reentrant=True)) inside an in-backward accumulation "
                "window: it cannot be counted once per backward pass. Use use_reentrant=False (same memory) "
                "or accumulation_steps=1"
            )
        if self._task is not None:  # the previous backward never reached its end (it raised)
            raise RuntimeError(
                f"the previous backward pass of the accumulation window did not finish ({self._window()})"
            )
        self._task = task
        _engine_callback(self._end_of_backward)

    def _accumulate_or_step(self, p: Tensor) -> None:
        if self.micro_batch < self.accumulation_steps - 1:
            lowrank = self._lowrank.get(p)
            if lowrank is None:
                lowrank = self._lowrank[p] = not accumulation_needs_full_gradient(
                    self.optimizer, p, self._additive
                )
            if lowrank:
                self._accumulate(p)
            return  # otherwise autograd keeps accumulating p.grad, as on the normal path
        self._step(p)

    def _accumulate(self, p: Tensor) -> None:
        """``A ← A + X P`` for this micro-batch (the gradient checked first), then free the gradient."""
        opt = self.optimizer
        check_gradients([{"params": [p]}], opt.param_name, opt.config.options.check_finite)
        layout = opt.layout(p)
        proj = layout.policy.basis(opt.state[p])
        if proj.dtype != layout.work_dtype:
            proj = proj.to(layout.work_dtype)
        x = p.grad.t() if layout.transposed else p.grad  # the orientation the update uses
        x = x.to(proj.dtype)  # no copy for float32 gradients
        acc = self._acc.get(p)
        if acc is None:
            self._acc[p] = x @ proj
        else:
            acc.addmm_(x, proj)  # in place: no M×r temporary next to the accumulators
        p.grad = None

    def _step(self, p: Tensor) -> None:
        """The boundary step of ``p``: its last gradient plus its accumulator, then free both."""
        opt = self.optimizer
        extra = self._acc.get(p)
        if extra is not None:
            if opt.config.options.check_finite and not all_finite([extra]):  # finite terms can overflow
                raise NonFiniteGradientError(
                    f"the accumulated projected gradient of parameter {opt.param_name(p)!r} (shape "
                    f"{tuple(p.shape)}) overflowed to inf/NaN; nothing was modified"
                )
            if p.grad is None:  # unused in the boundary micro-batch: X = 0 (+ c(W) through the prologue)
                p.grad = torch.zeros_like(p)
            self._step_subset([p], {p: extra})
        elif p.grad is not None:
            self._step_subset([p])
        p.grad = None
        self._acc.pop(p, None)
        self._lowrank.pop(p, None)

    def _step_subset(self, params: list[Tensor], lowrank: dict[Tensor, Tensor] | None = None) -> None:
        self._own_step = True
        try:
            self.optimizer.step_subset(params, lowrank)
        finally:
            self._own_step = False

    def _end_of_backward(self) -> None:
        self._task = None
        if self.micro_batch < self.accumulation_steps - 1:
            self.micro_batch += 1
            return
        self._flush()

    def _flush(self) -> None:
        """Close the window: every weight that took part in it and every parameter holding a gradient
        steps now, as the normal path steps every parameter that holds a gradient at the boundary."""
        try:
            for p in [q for q in self.params if q in self._lowrank or q in self._acc]:
                self._step(p)
            for p in self.params:
                if p.grad is not None:
                    self._step(p)
        except BaseException as exc:
            self._failed = f"{type(exc).__name__} at the end of {self._window()}"
            raise
        self.micro_batch = 0
        self._lowrank.clear()


def _reentrant() -> bool:
    """Whether this hook runs in a backward started from inside another backward's node (a custom
    Function's backward calling ``torch.autograd.backward``: re-entrant checkpointing): the Python stack
    holds an engine entry (``_engine_run_backward``) above a ``BackwardCFunction.apply`` frame."""
    frame, engine = sys._getframe(1), False
    while frame is not None:
        name = frame.f_code.co_name
        if name == "_engine_run_backward":
            engine = True
        elif engine and name == "apply" and frame.f_code.co_filename.endswith(_FUNCTION_FILE):
            return True
        frame = frame.f_back
    return False


_FUNCTION_FILE = "/".join(("torch", "autograd", "function.py"))


def _prologue_is_additive(compiled, inputs: tuple, dtype: torch.dtype) -> bool:
    """Whether ``prologue(W, G) = G + c(W)``: checked at random probes (two gradients, one weight)."""
    gen = torch.Generator().manual_seed(0)
    w, g1, g2 = (torch.randn(3, 2, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    pro = compiled.program.prologue
    with torch.no_grad():
        c1 = pro(w, g1, *inputs[:2], *inputs[2]) - g1
        c2 = pro(w, g2, *inputs[:2], *inputs[2]) - g2
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # float32: (g + c) − g rounds c by ≤ ulp(g)
    return bool(torch.allclose(c1.double(), c2.double(), rtol=0.0, atol=tol))


def accumulation_needs_full_gradient(
    opt: CoapOptimizer, p: Tensor, memo: dict[int, bool] | None = None
) -> bool:
    """Whether ``p``'s next step needs the full summed ``X`` (module docstring's list), i.e. whether it
    must accumulate its full gradient: :func:`.schedule.due` (the same answer the step acts on) says
    ``FULL``, or ``p`` is not a projected matrix, or its prologue is not ``G + c(W)``."""
    opt.sync_plan()
    layout = opt.plan.layouts.get(p)
    if layout is None or layout.kind is not Kind.MATRIX:
        return True
    state = opt.state.get(p)
    if not state or "step" not in state:
        return True
    if due(layout, state, opt.state_io(p), opt.step_count(p)).need is Need.FULL:
        return True
    compiled = layout.program
    if compiled.program.prologue is None:
        return False
    memo = {} if memo is None else memo
    if id(compiled) not in memo:  # the live inputs (a freshly loaded optimizer has not filled them yet)
        memo[id(compiled)] = _prologue_is_additive(compiled, opt.live_inputs(p), layout.work_dtype)
    return not memo[id(compiled)]


def step_in_backward(
    model_or_params: nn.Module | Iterable[Tensor], optimizer: CoapOptimizer, *, accumulation_steps: int = 1
):
    """Step every parameter of ``model_or_params`` inside the backward pass (module docstring).

    Args:
        model_or_params: a module (its parameters that require grad), an iterable of parameters, or a
            ``DistributedDataParallel`` module (then a communication hook steps each bucket after its
            all-reduce: :func:`coap_compile.distributed.backward.register_step_hook`).
        optimizer: the :class:`~coap_compile.CoapOptimizer` owning those parameters.
        accumulation_steps: backward passes per step (``N ≥ 1``); the ``N``-th steps. Under DDP use
            ``ddp.no_sync()`` for the first ``N − 1`` instead (this must then be 1).

    Returns:
        :class:`InBackward` (or the DDP hook's handle): ``remove()``, ``reset()``, a context manager.
    """
    if not isinstance(optimizer, CoapOptimizer):
        raise TypeError(
            f"optimizer must be a coap_compile.CoapOptimizer (from coap_compile.optimize), got "
            f"{type(optimizer).__name__}"
        )
    if (
        isinstance(accumulation_steps, bool)
        or not isinstance(accumulation_steps, int)
        or accumulation_steps < 1
    ):
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    if isinstance(model_or_params, nn.parallel.DistributedDataParallel):
        if accumulation_steps != 1:
            raise ValueError(
                f"accumulation_steps={accumulation_steps} with DistributedDataParallel: run the first "
                "N - 1 micro-batches under ddp.no_sync() (DDP then all-reduces the summed gradient and the "
                "hook steps once); low-rank accumulation would need all-reducing X P instead of G"
            )
        from ..distributed.backward import register_step_hook

        return register_step_hook(model_or_params, optimizer)
    params = _owned_params(model_or_params, optimizer)
    return InBackward(optimizer, params, accumulation_steps)


def _owned_params(model_or_params: nn.Module | Iterable[Tensor], optimizer: CoapOptimizer) -> list[Tensor]:
    """The parameters to hook: those of ``model_or_params`` that require grad, each owned by
    ``optimizer`` and not FSDP2-sharded (ValueError/TypeError naming the first that is not)."""
    if isinstance(model_or_params, Tensor):
        raise TypeError("model_or_params must be a module or an iterable of parameters, got a single tensor")
    raw = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    owned = {p for g in optimizer.param_groups for p in g["params"]}
    params, seen = [], set()
    for p in raw:
        if not isinstance(p, Tensor):
            raise TypeError(f"model_or_params must yield tensors, got {type(p).__name__}")
        if p in seen or not p.requires_grad:
            continue
        if p not in owned:
            raise ValueError(
                f"parameter {optimizer.param_name(p)!r} (shape {tuple(p.shape)}) requires grad but is not in "
                "the optimizer's param_groups: pass the optimizer that owns it, or only its parameters"
            )
        seen.add(p)
        params.append(p)
    if not params:
        raise ValueError("model_or_params has no parameter that requires grad")
    sharded = [optimizer.param_name(p) for p in params if optimizer.layout(p).shard is not None]
    if sharded:
        raise ValueError(
            f"parameters {sharded[:3]} are FSDP2-sharded (DTensor): in-backward updates support plain and "
            "DistributedDataParallel parameters only (FSDP2 reduce-scatters after the hooks would run)"
        )
    return params
