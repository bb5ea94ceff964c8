"""Launch-side support of the storage variants of K1 (:mod:`.variants`): argument checks, the per-state
kernel arguments, the rng counter advance after a launch, and the eager twin's load → epilogue → store.

**Tiles own whole quantization blocks.** K1's tile is ``BLOCK_M × BLOCK_R`` with ``BLOCK_R =
min(max(next_pow2(r), 16), 128)`` (as for fp32) and, for int8 states, ``BLOCK_M = max(block_m, bh)``
over their block layouts (:func:`coap_compile.storage.kernel_block_m`). A layout has ``bw =
min(16, next_pow2(r))`` and ``bh = B/bw``, both powers of two, so ``bw | 16 | BLOCK_R`` and ``bh | BLOCK_M``
for every ``r`` (r = 1: 1×B column blocks, r = 5: 32×8 at B = 256, r = 20 or 33: 16×16 with a partial last
block column, r > 128: several r-tiles, each starting at a multiple of 128, i.e. of ``bw``); tiles start at
multiples of ``BLOCK_M``/``BLOCK_R`` and hence at block boundaries, and the masked part of an edge tile
counts as 0 in its blocks' absmax, exactly as the eager quantizer's zero padding. Every program reads and
writes only its own blocks: no synchronisation. (Checked for r = 1…300 and every block size in
``tests/test_kernels_storage.py``.)

**rng.** A stochastic state's ``[seed, counter]`` is read by K1 (``rng_ptr``) and its counter incremented
once after the launch (:func:`advance_rng_`, a device-side ``add_``), exactly as one eager ``store_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from coap_compile.ir import evaluate_epilogue

from .variants import KernelVariant

__all__ = ["advance_rng_", "check_states", "eager_lowrank_", "state_args"]


def check_states(
    variant: KernelVariant, states: Sequence[Tensor], m: int, r: int
) -> list[tuple[Tensor, ...]]:
    """The per-state tensor groups of the op's flat list, validated for M×r states (clear errors)."""
    groups = variant.split(states)
    for name, mode, grp in zip(variant.epilogue.state_names, variant.modes, groups):
        mode.check(grp, (m, r), f"state {name!r}")
    mains = [grp[0] for grp in groups]
    for name, t in zip(variant.epilogue.state_names, mains):
        if t.stride() != mains[0].stride():
            raise ValueError(
                f"all states must share strides, {name!r} has {t.stride()} != {mains[0].stride()}"
            )
    return groups


def state_args(
    variant: KernelVariant, groups: Sequence[tuple[Tensor, ...]], device: torch.device
) -> tuple[list[Any], tuple[int, int]]:
    """K1's state arguments in the order of ``codegen._state_params``, and the largest int8 block height
    and width (``BLOCK_M`` and ``BLOCK_R`` must be multiples of them; 1 without int8 states). Row blocks
    are up to 128 wide, so a ``BLOCK_R`` chosen below the block width is raised to it."""
    args: list[Any] = []
    bh = bw = 1
    for mode, grp, tabs in zip(variant.modes, groups, variant.tables(device)):
        if mode.precision != "int8":
            args.extend(grp)  # values (+ rng)
            continue
        lay = mode.layout(grp)
        nr, nc = lay.grid
        assert tabs is not None
        args.extend([*grp, *tabs, nr, nc, lay.bh, lay.bw])  # codes, absmax (+ rng), tab, values, …
        bh, bw = max(bh, lay.bh), max(bw, lay.bw)
    return args, (bh, bw)


def advance_rng_(variant: KernelVariant, groups: Sequence[tuple[Tensor, ...]]) -> None:
    """``counter += 1`` for every stochastically rounded state (what each eager ``store_`` does)."""
    for mode, grp in zip(variant.modes, groups):
        if mode.stochastic:
            grp[-1][1].add_(1)


def eager_lowrank_(
    x: Tensor, p: Tensor, groups: Sequence[tuple[Tensor, ...]], c: Tensor, variant: KernelVariant
) -> Tensor:
    """Eager twin of a storage-variant K1: ``g = X.float() @ P``, load every state (float32), the
    epilogue (:func:`~coap_compile.ir.evaluate_epilogue`), store every new state (round/quantize; rng
    advanced); returns ``D`` (M×r float32)."""
    m, r = x.shape[0], p.shape[1]
    g = torch.mm(x.float(), p)
    values = [mode.load(grp) for mode, grp in zip(variant.modes, groups)]
    new, d = evaluate_epilogue(variant.epilogue, g, values, c)
    outs = [
        torch.broadcast_to(torch.as_tensor(v, dtype=torch.float32, device=g.device), (m, r))
        for v in (*new, d)
    ]
    # fp32 states load as themselves: an output aliasing one is materialized before any store.
    outs = [v.clone() if any(v.data_ptr() == s.data_ptr() for s in values) else v for v in outs]
    for mode, grp, v in zip(variant.modes, groups, outs):
        mode.store_(grp, v.contiguous())
    return outs[-1].contiguous()
