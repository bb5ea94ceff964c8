"""Programs and per-parameter views of :class:`~.optimizer.CoapOptimizer` (a mixin).

Every method here is derived from ``param_groups`` and the plans (:mod:`.selection`), and cached by what
it depends on:

* ``_compiled(group, dtype, ndim)``: the compiled base program of a group's current *structural*
  signature (boolean flags, which hyperparameters are exactly zero). Lookups are memoized on a frozen
  snapshot of the hyperparameters (:func:`.stepping.hyper_key`); a new signature re-compiles once, is
  listed by ``explain()`` and re-derives the storage of the affected states and the matrix groups;
* ``_full_program``: a full-rank parameter's update (the derived program at its own shape, else the
  captured graph);
* ``_kernel_plan``: the registered kernel epilogue per (epilogue, scale);
* ``_io`` / ``_local``: the load/store view of a parameter's states (:mod:`.precision`; FSDP2 shards
  through :class:`~coap_compile.distributed.fsdp.ShardedState`) and an FSDP2 weight's local rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capture import CapturedUpdate, capture
from ..compiler import CompiledBase, compile_base
from ..distributed import fsdp
from ..errors import UnsupportedOptimizerError
from ..lowering.kernels import KernelPlan, kernel_plan
from .grouped import build_groups
from .precision import StateIO, resolve_precision
from .stepping import hyper_key

__all__ = ["ProgramsMixin"]


class ProgramsMixin:
    """Program lookup and state views; the attributes it reads are set by ``CoapOptimizer._derive``."""

    def _full_program(self, group: dict, dtype: torch.dtype, ndim: int) -> CompiledBase | CapturedUpdate:
        """A full-rank parameter's update: the derived program at its own shape, else its captured graph
        (a base the compiler cannot rewrite, e.g. one whose state reads the weight)."""
        hyper = self._base_hyperparams(group)
        try:
            return compile_base(self._base_cls, hyper, dtype, ndim)
        except UnsupportedOptimizerError:
            return capture(self._base_cls, hyper, dtype=dtype, ndim=ndim)

    def _proj_dtype(self, p: Tensor) -> torch.dtype:
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return resolve_precision(group, p).proj_dtype

    def _io(self, p: Tensor) -> StateIO:
        storages, kinds, seed, shapes = self._io_specs[p]
        state = self.state[p]
        if p in self._shards:  # local tensors in, DTensors stored (distributed.fsdp.ShardedState)
            state = fsdp.ShardedState(state, self._shards[p], tuple(storages))
        return StateIO(state, storages, kinds, seed, shapes)

    def _local(self, p: Tensor) -> Tensor:
        """``p``, or an FSDP2 weight's local rows with their gradient (made in ``_prepare``)."""
        return self._locals.get(p, p)

    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _compiled(self, group_index: int, dtype: torch.dtype, ndim: int = 2) -> CompiledBase:
        """The program for a group's current structural signature (compiled once per signature); ``ndim``
        is 2 for matrices (``M×r`` states), 4 for Tucker cores."""
        key = (group_index, dtype, ndim)
        hyper = self._base_hyperparams(self.param_groups[group_index])
        memo_key = hyper_key(hyper)
        memo = self._program_memo.get(key)
        old = self._programs.get(key)
        if memo is not None and memo[0] == memo_key and memo[1] is old:
            return old  # the hyperparameters are the ones this program was looked up for
        new = compile_base(self._base_cls, hyper, dtype, ndim)
        self._program_memo[key] = (memo_key, new)
        if old is not new:
            if old is not None:
                before, after = dict(old.captured.hyperparams), dict(new.captured.hyperparams)
                diff = ", ".join(
                    f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in after if before.get(k) != after[k]
                )
                self._events.append(f"group {group_index} ({dtype}) re-compiled: {diff}")
            self._programs[key] = new
            if old is not None:  # the states may differ (amsgrad's max_exp_avg_sq): re-derive their storage
                seeds = {id(q): j for j, q in enumerate(q for g in self.param_groups for q in g["params"])}
                for q in self.param_groups[group_index]["params"]:
                    if self._program_key(q, group_index) == key:  # (list.index would compare tensors)
                        self._derive_storage(q, self.param_groups[group_index], group_index, seeds[id(q)])
                build_groups(self)  # the packed state names may have changed
                self._checked.clear()  # and the layouts plan_refresh accepted
        return new

    def _program_key(self, p: Tensor, group_index: int) -> tuple[int, torch.dtype, int] | None:
        plan = self._plans[p]
        if not plan.projected:
            return None
        return (group_index, self._state_dtype(p), 4 if plan.tucker else 2)

    def _kernel_plan(self, compiled: CompiledBase, scale: float) -> KernelPlan | None:
        """The registered kernel epilogue (built outside any compiled region), per epilogue and scale."""
        ep = compiled.program.epilogue
        if ep is None:
            return None
        key = (ep.key(), float(scale))
        if key not in self._kernel_plans:
            self._kernel_plans[key] = kernel_plan(ep, scale)
        return self._kernel_plans[key]

    def _use_kernels(self, p: Tensor) -> bool:
        if p.dtype not in (torch.float32, torch.bfloat16) or self._backend == "eager":
            return False
        return self._backend == "triton" or p.is_cuda

    def _fp32_states(self, p: Tensor) -> bool:
        """Whether every state of ``p`` is stored fp32 (what the fused K1 kernel reads)."""
        return all(stg.name == "fp32" for stg in self._io_specs[p][0].values())
