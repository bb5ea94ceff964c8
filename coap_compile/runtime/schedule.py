"""What is due for a projected parameter at its next step, and what that step needs.

One answer, used by the step (:mod:`.refresh` computes what is due) and by in-backward gradient
accumulation (:mod:`.inbackward` decides per window whether a weight may accumulate ``X P`` or must
keep its full gradient). With ``k`` the parameter's completed steps:

========================  ================================================================  =========
action                    when                                                              needs
========================  ================================================================  =========
``init``                  no state yet                                                      ``FULL``
``rebase``                the state no longer fits the layout: the policy's keys, the       ``FULL``
                          rank, ``P``'s dtype or a state's storage precision changed
``refresh``               ``policy.refresh_kind(k)`` is not empty (COAP's correlation step   ``FULL``
                          and low-cost SVD, GaLore's SVD, DCT's column choice, Flora's
                          resampling, Tucker's HOOI sweep)
``fixup``                 a change of the compiled signature added or removed a low-rank    ``NOTHING``
                          state (``amsgrad`` switched on): created or dropped at commit
(none)                    nothing due                                                       ``NOTHING``
========================  ================================================================  =========

``FULL`` means the refresh reads the whole summed gradient ``X`` of the step; ``NOTHING`` that the step
only needs ``X P`` (so an accumulator ``Σ Xᵢ P`` can stand in for the full gradients of a window).
Flora's resampling does not read ``X`` but is treated alike. Full-rank parameters always need their
gradient (``FULL``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .layout import Kind, ParamLayout

__all__ = ["Due", "Need", "due", "policy_keys", "step_count"]


class Need(enum.Enum):
    """What the next step of a parameter reads of its gradient."""

    NOTHING = "X P only"
    FULL = "the full gradient X"


@dataclass(frozen=True)
class Due:
    """The schedule's answer for one parameter: ``action`` (module docstring table), the policy's
    refresh ``kind`` for ``"refresh"``, and for a fixup the state names to create / drop."""

    action: str
    kind: str = ""
    extra: tuple[str, ...] = ()
    obsolete: tuple[str, ...] = ()

    @property
    def need(self) -> Need:
        return Need.FULL if self.action in ("init", "rebase", "refresh") else Need.NOTHING


NOTHING_DUE = Due("")


def policy_keys(policy) -> tuple[str, ...]:
    """The state entries a matrix policy owns (``proj``, Flora's ``seed``, DCT's ``dct_index`` …)."""
    return tuple(policy.state_layout(1, 1, torch.float32))


def factor_keys(n_modes: int) -> tuple[str, ...]:
    """The state entries of a Tucker policy (one factor per projected mode)."""
    return tuple(f"proj{i}" for i in range(n_modes))


def step_count(state: dict) -> int:
    """``k``: the parameter's completed steps (0 before its first)."""
    return int(state["step"].item()) if "step" in state else 0


def _stale(layout: ParamLayout, state: dict, io) -> bool:
    """Whether ``state`` no longer fits ``layout`` (the ``rebase`` condition)."""
    names = tuple(layout.states.storages)
    if any(io.keys_of(n) and not io.matches(n) for n in names):
        return True
    if layout.kind is Kind.TUCKER:
        keys = factor_keys(len(layout.ranks))
        return any(k not in state for k in keys) or tuple(state[k].shape[1] for k in keys) != layout.ranks
    policy, keys = layout.policy, policy_keys(layout.policy)
    if not set(keys) <= state.keys() or policy.state_shape(state)[1] != layout.rank:
        return True
    return "proj" in keys and state["proj"].dtype != layout.precision.proj_dtype


def due(layout: ParamLayout, state: dict, io, k: int | None = None) -> Due:
    """What the next step of a projected parameter must do before its update (module docstring).
    ``k``: its completed steps when the caller knows them (:class:`.counters.StepCounters`, no host
    read), else read from ``state["step"]``."""
    if not state:
        return Due("init")
    if _stale(layout, state, io):
        return Due("rebase")
    kind = layout.policy.refresh_kind(step_count(state) if k is None else k)
    if layout.kind is Kind.TUCKER:
        return Due("refresh", kind) if kind else NOTHING_DUE
    names = tuple(layout.states.storages)
    present = {n for n in names if io.keys_of(n)}
    owned = {"step", *policy_keys(layout.policy)} | {k for n in present for k in io.keys_of(n)}
    extra = tuple(n for n in names if n not in present)
    obsolete = tuple(k for k in state if k not in owned)
    if kind:
        return Due("refresh", kind, extra, obsolete)
    if extra or obsolete:
        return Due("fixup", "", extra, obsolete)
    return NOTHING_DUE
