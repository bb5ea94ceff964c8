"""Live scalars: every group's ``lr`` and float hyperparameters as one persistent float64 vector.

The compiled programs take ``(k, lr, h)`` as 0-d float64 tensors. Each group keeps one vector
``[lr, h₁, h₂, …]`` that :meth:`LiveScalars.fill` overwrites in place before every step, so a traced
(``torch.compile``) update that reads it sees new values without recompiling, and a scheduler that edits
``param_groups`` (``OneCycleLR`` cycling ``betas[0]``) takes effect on the next step.

Eager fast paths (measured on the demo model, issue 14): unchanged hyperparameters skip the
``live_inputs`` derivation and the copy (compared as Python floats); the vector's 0-d views are made
once per vector. :func:`hyper_key` is the frozen snapshot both use, and the plan's check for a new
compiled signature (:mod:`.plan`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..capture import live_inputs
from .settings import PROJECTION_KEYS

__all__ = ["LiveScalars", "base_hyperparams", "hyper_key"]


def base_hyperparams(group: dict) -> dict:
    """A group's base-optimizer hyperparameters (every key but ``params`` and COAP's own)."""
    return {k: v for k, v in group.items() if k != "params" and k not in PROJECTION_KEYS}


def hyper_key(hyper: dict) -> tuple:
    """A hashable snapshot of a group's base hyperparameters: equal keys give the same program and live
    inputs. ``lr`` is a live input of every program and is left out (a tensor lr changes in place);
    other tensors count by value (a tensor weight decay turning 0 changes the structure)."""

    def freeze(v: Any) -> Any:
        if isinstance(v, Tensor):
            return ("tensor", v.dtype, float(v)) if v.numel() == 1 else ("tensor", id(v))
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, *map(freeze, v))
        return v if isinstance(v, (int, float, str, bool, type(None))) else ("obj", repr(v))

    return tuple((k, freeze(v)) for k, v in sorted(hyper.items()) if k != "lr")


class LiveScalars:
    """The per-group scalar vectors of one optimizer (module docstring)."""

    def __init__(self, base: type, n_groups: int) -> None:
        self.base = base
        self.vectors: list[Tensor] = [torch.zeros(0, dtype=torch.float64) for _ in range(n_groups)]
        self._floats: dict[int, list[float]] = {}  # group -> the values now in vectors[group]
        self._memo: dict[int, tuple] = {}  # group -> (hyperparameter key, live inputs)
        self._views: list[tuple[Tensor, list[Tensor]] | None] = [None] * n_groups

    def fill(self, param_groups: list[dict], keys: list[tuple]) -> None:
        """Copy every group's lr and live hyperparameters into its vector (``keys``: their
        :func:`hyper_key`); TypeError naming the group for a value that is not a number."""
        for i, group in enumerate(param_groups):
            memo = self._memo.get(i)
            if memo is None or memo[0] != keys[i]:
                memo = (keys[i], live_inputs(self.base, base_hyperparams(group)))
                self._memo[i] = memo
            hypers = memo[1]
            lr = group["lr"]
            # lr=None: a base with its own relative step size (transformers' Adafactor, relative_step=True)
            values = [0.0 if lr is None else lr, *(h.read(group) for h in hypers)]
            floats = []
            for name, v in zip(("lr", *(h.where for h in hypers)), values):
                if isinstance(v, bool) or not isinstance(v, int | float | Tensor):
                    raise TypeError(f"{name} of param group {i} must be a number, got {v!r}")
                floats.append(float(v))
            if self.vectors[i].numel() != len(floats):
                self.vectors[i] = torch.zeros(len(floats), dtype=torch.float64)
                self._floats.pop(i, None)
            if self._floats.get(i) != floats:  # unchanged values: no tensor work at all
                self.vectors[i].copy_(torch.tensor(floats, dtype=torch.float64))
                self._floats[i] = floats

    def group_inputs(self, group_index: int) -> tuple[Tensor, list[Tensor]]:
        """``(lr, hyperparameters)``: 0-d views of the group's vector (made once per vector eagerly; a
        traced step indexes in the graph)."""
        v = self.vectors[group_index]
        if torch.compiler.is_dynamo_compiling():  # this thread is traced (not any thread: issue 21)
            return v[0], [v[j] for j in range(1, v.numel())]
        cached = self._views[group_index]
        if cached is None or cached[0] is not v:
            cached = (v, list(v.unbind(0)))
            self._views[group_index] = cached
        return cached[1][0], cached[1][1:]

    def inputs(self, group_index: int, state: dict) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(k, lr, hyperparameters)`` for a parameter of the group with ``state``."""
        k = state["step"].to(torch.float64) if "step" in state else torch.zeros((), dtype=torch.float64)
        return (k, *self.group_inputs(group_index))
