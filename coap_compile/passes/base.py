"""Pass infrastructure: a compilation unit, the pass protocol and a verifying pass manager.

A :class:`CompilationUnit` carries the captured FX graph of one base-optimizer update through the
pipeline, plus the *facts* the passes establish about it (``unit.facts[name]``). A pass declares the
facts it ``requires`` and the facts it ``ensures``; :class:`PassManager` checks both, runs the IR
verifier after every pass and, when a pass fails, reports which passes ran before it.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx

__all__ = ["CompilationUnit", "Pass", "PassError", "PassManager", "PassResult"]


@dataclass
class CompilationUnit:
    """The graph being compiled and everything known about it.

    Attributes:
        optimizer: the base optimizer's qualified name (for error messages).
        graph_module: the functional aten graph
            ``(param, grad, *states, step, lr) -> (param', *states', step')``.
        state_names: base-optimizer state keys, in placeholder order.
        facts: analysis results keyed by fact name (see ``passes/README.md`` for each fact's meaning).
        log: ``(pass name, seconds, modified)`` for each pass that ran.
    """

    optimizer: str
    graph_module: torch.fx.GraphModule
    state_names: tuple[str, ...]
    facts: dict[str, Any] = field(default_factory=dict)
    log: list[tuple[str, float, bool]] = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph


@dataclass(frozen=True)
class PassResult:
    unit: CompilationUnit
    modified: bool


class PassError(RuntimeError):
    """A pass broke its contract (missing requirement, unmet guarantee or invalid IR afterwards)."""


class Pass(abc.ABC):
    """One step of the pipeline: ``requires`` → :meth:`run` → ``ensures``."""

    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def run(self, unit: CompilationUnit) -> PassResult: ...

    def __call__(self, unit: CompilationUnit) -> PassResult:
        missing = self.requires - unit.facts.keys()
        if missing:
            raise PassError(f"{self.name} requires facts {sorted(missing)} that no earlier pass established")
        result = self.run(unit)
        unmet = self.ensures - result.unit.facts.keys()
        if unmet:
            raise PassError(f"{self.name} did not establish the facts it ensures: {sorted(unmet)}")
        return result


class PassManager:
    """Runs passes in the given order, verifying the IR after each one.

    Args:
        passes: the ordered pipeline (the order is decided by the caller, see ``pipeline.py``).
        verify: ``verify(unit)`` raising on invalid IR; run after every pass.
    """

    def __init__(self, passes: Sequence[Pass], verify) -> None:
        self.passes = list(passes)
        self.verify = verify

    def run(self, unit: CompilationUnit) -> CompilationUnit:
        self.verify(unit)
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                result = p(unit)
                self.verify(result.unit)
            except PassError as exc:
                ran = ", ".join(name for name, _, _ in unit.log) or "none"
                raise PassError(f"{exc} (passes that ran before: {ran})") from exc
            unit = result.unit
            unit.log.append((p.name, time.perf_counter() - t0, result.modified))
        return unit
