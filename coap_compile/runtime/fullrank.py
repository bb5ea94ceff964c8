"""Full-rank parameters inside a compiled training step: the captured base update itself.

Eagerly, full-rank parameters run the *unmodified* torch optimizer (an inner instance sharing this
optimizer's ``state``), so they match ``torch.optim`` bit for bit. Inside ``torch.compile`` that inner
step would read Python floats from its ``param_groups`` (Dynamo guards on each, so a scheduler that
cycles β₁ recompiles every step) and torch's optimizers insert a graph break of their own. There the
full-rank update runs the base's *derived* update instead, the compiled program of the projected path
at the parameter's own shape (no projection)::

    X = prologue(W, G)  (G, or G + λW);   (decay, D, s', k') = lowrank(W, X, s, k, lr, h);   W ← decay·W + D

with the live scalars of the group, as for projected ones. The derived form (not torch's capturable
arithmetic, which divides by ``lr``) is what runs, so a warm-up from ``lr = 0`` stays finite. A base
that cannot be rewritten falls back to its captured graph.

with the states in torch's layout and names, so eager and compiled steps can alternate and checkpoints
are interchangeable. The one addition: a base that keeps no step counter (SGD) gets a ``step`` entry,
which its captured update needs for the first-step blend (torch's SGD ignores the extra entry).

With an explicit ``state_precision`` (``bf16``, ``int8``, or ``fp32`` for low-precision weights) a
full-rank parameter always runs this captured update, in float32 (float64 for float64 weights), on its
states loaded through a :class:`~coap_compile.runtime.precision.StateIO` and stored back, one parameter
at a time (an 8-bit AdamW does the same).

**Changing ``state_precision`` mid-training** moves a full-rank parameter between the two layouts (TORCH:
torch's names, plain tensors in the weight's dtype; DERIVED: the storage's keys) or between storages.
:func:`restored_full_state` gives its states in the new layout, as checkpoint loading converts them
(:func:`coap_compile.storage.convert_state`: to fp32 or torch's layout exactly, to bf16/int8 one
rounding/quantization, as one step's store); the step computes every conversion after validating its
input and commits them with the refreshes (:mod:`.step`), so an edit is applied atomically to every kind
of parameter in the group (before issue 21 the projected states were re-based and the full-rank ones
left in the old layout: every later step raised).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import CapturedUpdate, init_states, run_captured
from ..compiler import CompiledBase
from ..storage import convert_state, load_any, logical_layout, logical_name
from .precision import StateIO

__all__ = ["ensure_full_state", "full_update_", "restored_full_state", "scalar_dtype_for_step"]


def scalar_dtype_for_step() -> torch.dtype:
    """torch's dtype for a per-parameter ``step`` tensor (float64 only under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def ensure_full_state(
    state: dict, program: CompiledBase | CapturedUpdate, p: Tensor, io: StateIO | None = None
) -> None:
    """Create what torch would create on its first step (and ``step``), before the update."""
    captured = program.captured if isinstance(program, CompiledBase) else program
    missing = [n for n in captured.state_names if not (io.keys_of(n) if io is not None else n in state)]
    if missing:
        fresh = init_states(captured, p.detach().to(captured.dtype))
        for n in missing:
            if io is None:
                state[n] = fresh[n]
            else:
                state.update(io.fresh(n, fresh[n]))
    if "step" not in state:  # a base without a counter: 1 once its buffers exist (only min(k, 1) matters)
        started = bool(captured.state_names) and not missing
        state["step"] = torch.tensor(1.0 if started else 0.0, dtype=scalar_dtype_for_step())


def full_update_(
    p: Tensor, state: dict, program: CompiledBase | CapturedUpdate, inputs, io: StateIO | None = None
) -> None:
    """One step of the derived (or captured) update for a full-rank parameter, written back in place
    (through ``io`` when the states have a storage precision)."""
    k_t, lr_t, hypers = inputs
    captured = program.captured if isinstance(program, CompiledBase) else program
    work = captured.dtype
    load = (lambda n: state[n]) if io is None else io.load
    pw = p if p.dtype == work else p.to(work)
    gw = p.grad if p.grad.dtype == work else p.grad.to(work)
    states = [load(n) for n in captured.state_names]
    if isinstance(program, CompiledBase):
        prog = program.program
        x = gw if prog.prologue is None else prog.prologue(pw, gw, k_t, lr_t, *hypers)
        decay, delta, *rest = prog.lowrank(pw, x, *states, k_t, lr_t, *hypers)
        new_states, new_step = rest[:-1], rest[-1]
        new_p = pw * decay + delta
    else:
        new_p, new_states, new_step = run_captured(captured, pw, gw, states, k_t, lr_t, hypers)
    p.copy_(new_p)
    for n, v in zip(captured.state_names, new_states):
        if io is None:
            state[n].copy_(v)
        else:
            io.store_(n, v)
    state["step"].copy_(new_step)


def restored_full_state(state: dict, p: Tensor, io: StateIO | None) -> dict | None:
    """``state`` of a full-rank ``p`` in its layout's form (module docstring): torch's (``io`` None: each
    state one tensor of ``p``'s dtype) or ``io``'s storages; None when it already is (or is empty). New
    tensors; ``state`` is not modified."""
    if not state:
        return None
    if io is None:
        names = [n for n in logical_layout(state) if n != "step"]
        bad = [
            n for n in names
            if [k for k in state if logical_name(k) == n] != [n]
            or (state[n].is_floating_point() and state[n].dtype != p.dtype)
        ]  # fmt: skip
        if not bad:
            return None
        out = {k: v for k, v in state.items() if logical_name(k) not in bad}
        out.update({n: load_any(state, n).to(p.dtype, copy=True) for n in bad})
        return out
    bad = [n for n in io.storages if io.keys_of(n) and not io.matches(n)]
    if not bad:
        return None
    out = {k: v for k, v in state.items() if logical_name(k) not in bad}
    for n in bad:
        out.update(convert_state(state, n, io.storages[n], io.kinds.get(n, "other"), seed=io.seed))
    return out
