"""Initial values of the low-rank states (matrices: ``M×r``; Tucker cores), ``coap_exp_avg`` included.

Used where states are created (:mod:`.refresh`, :mod:`.tucker`) and, on the meta device, where their
shapes are planned (:mod:`.layout`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compiler import CompiledBase
from .settings import EMA_KEY

__all__ = ["lowrank_inits", "tucker_inits"]


def lowrank_inits(compiled: CompiledBase, policy, rows: int, rank: int, dtype, device) -> dict[str, Tensor]:
    """Initial values (float32/64) of the low-rank states, ``coap_exp_avg`` included when needed."""
    states = compiled.init_lowrank_states(rows, rank, dtype, device)
    if compiled.program.first_moment is None and policy.needs_first_moment:
        states[EMA_KEY] = torch.zeros((rows, rank), dtype=dtype, device=device)
    return states


def tucker_inits(compiled: CompiledBase, policy, core, dtype, device) -> dict[str, Tensor]:
    """Initial values of the core-shaped states (``coap_exp_avg`` too when the base has no first moment)."""
    states = compiled.init_core_states(core, dtype, device)
    if compiled.program.first_moment is None and policy.needs_first_moment:
        states[EMA_KEY] = torch.zeros(core, dtype=dtype, device=device)
    return states
