"""The optimizer's structure: every parameter's layout, the matrix groups, the programs, as one value.

:func:`build_plan` derives a :class:`RuntimePlan` from ``param_groups`` and the optimizer's fixed
configuration (:class:`OptimizerConfig`). The plan is immutable; :meth:`RuntimePlan.stale` says when
``param_groups`` no longer match it, which is when it is rebuilt:

* a group's COAP keys or its parameters changed (:func:`~.settings.raw_key`; the new settings are
  validated first, so a bad edit raises and the old plan stays);
* a group's base hyperparameters select another compiled program (a *structural* change: ``amsgrad``,
  ``nesterov``, a weight decay or momentum becoming zero or nonzero). Live values (``lr``, ``betas`` …)
  change no program and rebuild nothing; a new signature compiles once (``compile_base`` caches by
  signature) and is recorded as an event for ``explain()``.

Nothing else derives structure: the step, refreshes, checkpoints, the memory plan, ``explain()``, in-backward
accumulation and sharding read the plan's layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..capture import CapturedUpdate
from ..compiler import CompiledBase, compile_base
from ..projection import ProjectionPolicy
from .fullgroup import FullGroup, build_full_groups
from .grouped import MatrixGroup, build_groups, per_matrix_reason
from .hyper import check_base_hyperparams
from .layout import Kind, ParamLayout, build_layout, full_program
from .scalars import base_hyperparams, hyper_key
from .settings import CoapSettings, OptimizerOptions, raw_key

__all__ = ["OptimizerConfig", "RuntimePlan", "build_plan", "program_changes"]


@dataclass(frozen=True)
class OptimizerConfig:
    """What the optimizer was built with and never changes: the base class and its constructor
    arguments, the optional policy instances, the options, and parameter names (``id → name``)."""

    base: type[torch.optim.Optimizer]
    base_kwargs: Mapping[str, Any]
    policy_instance: ProjectionPolicy | None = None
    conv_policy: Any = None
    options: OptimizerOptions = field(default_factory=OptimizerOptions)
    names: Mapping[int, str] = field(default_factory=dict)

    def name_of(self, p: Tensor) -> str:
        return self.names.get(id(p), f"param[{tuple(p.shape)}]")


@dataclass(frozen=True, eq=False)
class RuntimePlan:
    """Layouts of every parameter (in ``param_groups`` order), the matrix groups and their membership,
    each group's settings, and the keys the plan was derived from."""

    layouts: Mapping[Tensor, ParamLayout]
    matrix_groups: tuple[MatrixGroup, ...]
    group_of: Mapping[Tensor, MatrixGroup]
    settings: tuple[CoapSettings, ...]
    keys: tuple[tuple, ...]
    hyper_keys: tuple[tuple, ...]
    full_groups: tuple[FullGroup, ...] = ()  # full-rank DERIVED parameters stepped together (.fullgroup)

    def stale(self, param_groups: list[dict]) -> list[int]:
        """Indices of the groups whose COAP keys or parameters changed since (all of them when the
        number of groups did)."""
        if len(param_groups) != len(self.keys):
            return list(range(len(param_groups)))
        return [i for i, g in enumerate(param_groups) if raw_key(g) != self.keys[i]]

    def programs(self) -> dict[tuple[int, torch.dtype, int], CompiledBase]:
        """The compiled base programs of the projected parameters, by (group, dtype, ndim)."""
        out = {}
        for lay in self.layouts.values():
            if lay.projected:
                out[(lay.group, lay.work_dtype, 4 if lay.kind is Kind.TUCKER else 2)] = lay.program
        return out

    def alone(self, grouped: bool) -> dict[str, int]:
        """Why the projected matrices outside any group run per matrix (reason → count)."""
        out: dict[str, int] = {}
        for p, lay in self.layouts.items():
            if lay.projected and p not in self.group_of:
                reason = per_matrix_reason(lay, grouped) or "no other matrix with its state shape"
                out[reason] = out.get(reason, 0) + 1
        return out


def build_plan(config: OptimizerConfig, param_groups: list[dict]) -> RuntimePlan:
    """The plan of ``param_groups`` (module docstring). Validates every group's settings first: COAP's
    keys (:class:`~.settings.CoapSettings`) and the base hyperparameters (:mod:`.hyper`)."""
    settings = tuple(
        CoapSettings.from_group(g, i, config.policy_instance) for i, g in enumerate(param_groups)
    )
    for i, g in enumerate(param_groups):
        check_base_hyperparams(config.base, g, i)
    layouts: dict[Tensor, ParamLayout] = {}
    seed = 0
    for i, (g, s) in enumerate(zip(param_groups, settings)):
        hyper = base_hyperparams(g)
        policy, tucker = s.policy(config.policy_instance), s.tucker_policy(config.conv_policy)
        for p in g["params"]:
            layouts[p] = build_layout(
                p, i, s, base=config.base, hyper=hyper, name=config.name_of(p), seed=seed, policy=policy,
                tucker_policy=tucker, backend=config.options.backend,
                input_precision=config.options.input_precision,
            )  # fmt: skip
            seed += 1
    groups = build_groups(layouts, config.options.grouped)
    group_of = {p: mg for mg in groups for p in mg.members}
    return RuntimePlan(
        layouts, groups, group_of, settings, tuple(raw_key(g) for g in param_groups),
        tuple(hyper_key(base_hyperparams(g)) for g in param_groups),
        build_full_groups(layouts, config.options.grouped),
    )  # fmt: skip


def program_changes(plan: RuntimePlan, config: OptimizerConfig, index: int, group: dict) -> list[str]:
    """What a new structural signature of group ``index`` changes: one line per program that differs
    (empty: every layout of the group keeps its program, only live values changed)."""
    hyper = base_hyperparams(group)
    seen: dict[tuple, CompiledBase | CapturedUpdate] = {}
    out = []
    for lay in plan.layouts.values():
        if lay.group != index or lay.program is None:
            continue
        derived = lay.kind is Kind.DERIVED
        dtype = _captured(lay.program).dtype if derived else lay.work_dtype
        key = (derived, dtype, lay.ndim)
        if key not in seen:
            make = full_program if derived else compile_base
            seen[key] = make(config.base, hyper, dtype, lay.ndim)
        if seen[key] is not lay.program:
            before, after = dict(_captured(lay.program).hyperparams), dict(_captured(seen[key]).hyperparams)
            diff = ", ".join(
                f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in after if before.get(k) != after[k]
            )
            line = f"group {index} ({dtype}) re-compiled: {diff}"
            if line not in out:
                out.append(line)
    return out


def _captured(program: CompiledBase | CapturedUpdate) -> CapturedUpdate:
    return program.captured if isinstance(program, CompiledBase) else program
