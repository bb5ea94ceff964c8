"""Grouped update of full-rank derived parameters (``Kind.DERIVED``): equal shapes stepped as one.

With a storage precision set (``state_precision="bf16"``/``"int8"``, or fp32 on low-precision weights)
a full-rank parameter runs the base's derived update on its states through a
:class:`~.precision.StateIO` (:mod:`.fullrank`), one parameter at a time: for the norms and biases of a
transformer that is dozens of tiny updates of a few hundred elements, each paying a fixed cost per op
(bf16 stochastic rounding is ~20 ops). A *full-rank group* is every such parameter of one param group
with the same shape, dtype, device, compiled program and state storages; for its ``K`` members one step is::

    W̃ = stack(W_k),  G̃ = stack(G_k)                              (K×shape; small: norms and biases)
    (decay, D, s', k') = lowrank(W̃, X̃, s, k, lr, h)              (X̃ = G̃ or the prologue's G̃ + λW̃)
    W_k ← (decay·W̃ + D)_k;  store(s') per member stream (:mod:`coap_compile.lowering.stacked`)

The states live in stacked buffers exactly as for matrix groups (:class:`.grouped.GroupBuffers`, the
same :func:`.grouped.pack_` / :func:`.grouped.ready`: views per member, runs of equal step counts).
**Bit-identity** with the per-parameter path (``tests/test_grouped_storage.py``): the program is
elementwise (groups require an epilogue and no weight statistics: a reduction over one weight, e.g.
Adafactor's factored second moment, would change meaning when stacked), so stacking changes no
operation on any element; the stacked storage functions reproduce each member's stream and blocks.
The weights are written before the states, as everywhere. FSDP2-sharded parameters, captured programs
(a base the compiler cannot rewrite) and restricted (in-backward) steps stay per parameter.

**Fused** (``backend="inductor"`` on the CPU, a bf16/int8 state, a program that does not read the weight):
the load → derived update → store runs as one Inductor-compiled loop
(:func:`coap_compile.lowering.inductor.elementwise`, the matrix groups' function with ``X̃`` the stacked
gradients), and such a group may have a single member: the demo LM's 256×256 int8 embedding was the one
full-rank parameter of that model, and its eager int8 store (a gather per code, a ``where`` chain)
cost about 20 of the 96 ms of a profiled int8 step (issue 20 follow-up, ``torch.profiler``, 2-core Xeon,
load ~2). Results equal the eager lowering within the bound of :mod:`coap_compile.lowering.inductor`
(``tests/test_inductor_lowering.py``). fp32-only groups stay eager (nothing to fuse but a compile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..compiler import CompiledBase
from ..lowering.inductor import elementwise, uses_param
from ..lowering.stacked import StackedSpec, load_stacked, stacked_spec, stored_stacked

__all__ = ["FullGroup", "build_full_groups", "full_group_update_"]


@dataclass(frozen=True, eq=False)
class FullGroup:
    """``K ≥ 2`` DERIVED parameters of param group ``index`` with equal shape and storages (docstring)."""

    index: int
    members: tuple[Tensor, ...]
    program: Any
    specs: tuple[StackedSpec, ...]
    key: tuple = ()
    fused: bool = False  # the Inductor-compiled load → update → store (module docstring)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for spec in self.specs for k in spec.keys)


def _eligible(lay, grouped: bool) -> bool:
    from .layout import Kind

    if not grouped or lay.kind is not Kind.DERIVED or lay.shard is not None:
        return False
    prog = lay.program
    return isinstance(prog, CompiledBase) and prog.program.epilogue is not None and (
        not prog.program.decomposition.param_stats)  # fmt: skip


def build_full_groups(layouts: dict[Tensor, Any], grouped: bool) -> tuple[FullGroup, ...]:
    """Full-rank groups (≥ 2 members, or 1 when fused; in parameter order) from the layouts."""
    by_key: dict[tuple, list[Tensor]] = {}
    for p, lay in layouts.items():
        if _eligible(lay, grouped):
            st = lay.states
            stores = tuple((n, repr(s), st.kinds.get(n, "other")) for n, s in st.storages.items())
            key = (lay.group, tuple(p.shape), p.dtype, p.device, id(lay.program), stores, lay.lowering)
            by_key.setdefault(key, []).append(p)
    out = []
    for key, members in by_key.items():
        lay = layouts[members[0]]
        st, names = lay.states, lay.program.captured.state_names
        specs = tuple(stacked_spec(n, st.storages[n], st.kinds.get(n, "other"), st.shapes[n], key[3])
                      for n in names)  # fmt: skip
        fused = lay.lowering == "inductor" and not uses_param(lay.program.program) and any(
            spec.precision != "fp32" for spec in specs)  # fmt: skip
        if len(members) < 2 and not fused:
            continue
        out.append(FullGroup(key[0], tuple(members), lay.program, specs, key, fused))
    return tuple(out)


def full_group_update_(
    fg: FullGroup,
    group,
    runs: Sequence[tuple[int, int]],
    grads: Sequence[Tensor | None],
    scalars: tuple[Tensor, list[Tensor]],
) -> None:
    """One step of the members in ``runs`` (:func:`.grouped.ready`), in place (module docstring);
    ``grads`` were read before the states."""
    lr_t, hypers = scalars
    prog, work = fg.program.program, fg.program.captured.dtype
    for s, e in runs:
        k_t = group.steps[s].to(torch.float64)
        pw = torch.stack([p.detach().to(work) for p in fg.members[s:e]])
        gw = torch.stack([g.to(work) for g in grads[s:e]])
        x = gw if prog.prologue is None else prog.prologue(pw, gw, k_t, lr_t, *hypers)
        parts = {key: group.buffers[key][s:e] for key in fg.keys}
        if fg.fused:
            decay, delta, new_step, new = elementwise(True, prog, fg.specs, None, None, x, parts,
                                                      (k_t, lr_t, hypers))  # fmt: skip
        else:
            olds = [load_stacked(spec, parts) for spec in fg.specs]
            decay, delta, *rest = prog.lowrank(pw, x, *olds, k_t, lr_t, *hypers)
            new_step, new = rest[-1], {}
            for spec, value in zip(fg.specs, rest[:-1]):
                new.update(stored_stacked(spec, parts, value))
        new_p = pw * decay + delta
        for p, v in zip(fg.members[s:e], new_p):  # the weights first, then the states
            p.detach().copy_(v)
        for key, value in new.items():
            parts[key].copy_(value)
        group.steps[s:e].copy_(new_step)
