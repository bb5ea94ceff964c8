"""The runtime's side of FSDP2: what :class:`~.optimizer.CoapOptimizer` asks of a DTensor parameter.

Everything distributed lives in :mod:`coap_compile.distributed.fsdp` (the design, the placements, the
refresh collectives, the basis convention); this module holds the few decisions the optimizer makes
per parameter when it derives its plans, so that ``optimizer.py`` only calls in:

* :func:`derive_projected`: a projected DTensor weight (always on the rows side, ``X = G``; see
  :func:`~.selection.plan_param`) is checked for what cannot run row-sharded (Tucker, GaLore/DCT,
  int8, a base whose low-rank update has reductions) and gets its :class:`~..distributed.fsdp.ShardSpec`.
* :func:`derive_full_rank`: a full-rank DTensor parameter that COAP updates itself (an explicit
  ``state_precision``) must have an elementwise update (it runs on the local shard); torch's own
  optimizer (the default for full-rank parameters) handles DTensors itself and needs nothing here.
* :func:`check_side`: ``projection_side`` may not change the side of a weight that has low-rank state
  (``P`` would change shape): a clear error instead of a silent re-base.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..compiler import CompiledBase
from ..distributed import fsdp
from .selection import ParamPlan

__all__ = ["check_side", "derive_full_rank", "derive_projected", "shard_local"]


def shard_local(program: Any) -> bool:
    """Whether a derived program's update is elementwise (no reductions, no weight statistics), so that
    it gives the same result on a row shard as on the whole weight (the grouped update's criterion)."""
    return program is not None and program.epilogue is not None and not program.decomposition.param_stats


def derive_projected(opt, p: Tensor, index: int, plan: ParamPlan, states: str, where: str) -> None:
    """A projected FSDP2 weight: refuse what cannot run sharded, else record its :class:`ShardSpec`."""
    program = None if plan.tucker else opt._compiled(index, opt._state_dtype(p)).program
    fsdp.check_sharded(
        where, policy=opt._policies[index], tucker=plan.tucker, states=states,
        shard_local=shard_local(program), base=opt._base_cls.__name__,
    )  # fmt: skip
    opt._shards[p] = fsdp.shard_spec(p, where)


def derive_full_rank(opt, p: Tensor, program: Any, states: str, where: str) -> None:
    """A full-rank FSDP2 parameter updated by its captured program on the local shard."""
    prog = program.program if isinstance(program, CompiledBase) else None
    fsdp.check_sharded(
        where, policy=None, tucker=False, states=states, shard_local=shard_local(prog),
        base=opt._base_cls.__name__,
    )  # fmt: skip
    opt._shards[p] = fsdp.shard_spec(p, where, matrix=False)


def check_side(opt, p: Tensor, index: int, old: ParamPlan, new: ParamPlan) -> None:
    """ValueError if a settings change would move ``p``'s existing low-rank state to the other side."""
    if new.projected and old.projected and not new.tucker and new.transposed != old.transposed:
        side = opt.param_groups[index].get("projection_side")
        raise ValueError(
            f"parameter {opt._name(p)!r} (param group {index}) already has low-rank state on the "
            f"{'columns' if old.transposed else 'rows'} side; projection_side={side!r} would change its P's "
            "shape. Choose projection_side before the parameter's first step"
        )
