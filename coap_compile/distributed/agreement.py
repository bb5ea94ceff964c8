"""Settings that decide collectives agree across the ranks of every FSDP2 shard group.

Every rank of a shard group must issue the same collectives in the same order (:mod:`.fsdp`,
"Refreshes"): the schedule is a function of the replicated step counter *and of the settings*. Ranks
built with different settings would not agree on it: a different ``update_interval`` makes one rank
enter a correlation all-reduce that the other never joins (both block until the process-group timeout,
30 minutes by default), and a different state precision trains silently with a different ``P`` per rank.

So before the first step of a plan (the step runner is rebuilt with every plan,
:mod:`coap_compile.runtime.plan`) every rank checks its **collective settings** against the others':
per DTensor parameter (COAP's and those left to torch's own optimizer), in plan order,

    (name, kind, rank r, side, update_interval, reproject_factor, projection, correlation,
     state precision, projection precision, quant_block_size, global rows)

(:meth:`~coap_compile.runtime.layout.ParamLayout.collective_settings`) are hashed into one 64-bit digest
per shard group (SHA-256 of their ``repr``, first 8 bytes), and the digests are all-gathered over that
group: **one 8-byte all-gather per shard group** per plan (label ``"settings_digest"``), nothing on later
steps. Only when the digests differ are the settings themselves all-gathered (``all_gather_object``) to
name the first setting that differs and every rank's value; then every rank raises the same
:class:`ValueError` before anything is modified (the check runs before the gradients are validated, the
schedule is read or any refresh is computed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .comm import CommLog, all_gather

__all__ = ["SettingsEntry", "check_settings_agree", "settings_digest"]

#: ``(parameter name, ((setting, value), ...), shard group)`` of one sharded parameter.
SettingsEntry = tuple[str, tuple[tuple[str, Any], ...], Any]


def settings_digest(entries: Sequence[tuple[str, tuple[tuple[str, Any], ...]]]) -> int:
    """A signed 64-bit digest of ``(name, settings)`` pairs (SHA-256 of their ``repr``)."""
    raw = hashlib.sha256(repr(tuple(entries)).encode()).digest()[:8]
    return int.from_bytes(raw, "little", signed=True)


def _by_group(entries: Sequence[SettingsEntry]) -> list[tuple[Any, list[tuple[str, tuple]]]]:
    """The entries per shard group, groups in order of first appearance (the same order on every rank)."""
    out: list[tuple[Any, list[tuple[str, tuple]]]] = []
    for name, settings, group in entries:
        for grp, items in out:
            if grp == group:
                items.append((name, settings))
                break
        else:
            out.append((group, [(name, settings)]))
    return out


def _global_ranks(group: Any) -> list[int]:
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def _mismatch(per_rank: list[list[tuple[str, tuple]]], ranks: list[int]) -> str:
    """The first setting that differs across ranks, with every rank's value."""
    names = [[n for n, _ in items] for items in per_rank]
    if any(n != names[0] for n in names):
        listed = "; ".join(f"rank {r}: {n}" for r, n in zip(ranks, names))
        return f"the ranks update different sharded parameters with COAP (in plan order): {listed}"
    for i, (name, first) in enumerate(per_rank[0]):
        for key, _ in first:
            values = [dict(items[i][1]).get(key) for items in per_rank]
            if any(v != values[0] for v in values):
                listed = ", ".join(f"rank {r}: {v!r}" for r, v in zip(ranks, values))
                return f"setting {key!r} of parameter {name!r} differs across ranks ({listed})"
    return "the settings digests differ although the gathered settings are equal (unhashable values?)"


def check_settings_agree(
    entries: Sequence[SettingsEntry], log: CommLog | None = None, device: torch.device | str = "cpu"
) -> None:
    """Raise ValueError on every rank when the collective settings of the sharded parameters differ
    across the ranks of their shard group (module docstring). ``entries`` in plan order; ``device``: where
    the digest lives (the parameters' device: CPU for gloo, the GPU for NCCL)."""
    if not entries or not dist.is_available() or not dist.is_initialized():
        return
    for group, items in _by_group(entries):
        mine = torch.tensor([settings_digest(items)], dtype=torch.int64, device=device)
        gathered = all_gather(mine, group, log, "settings_digest")
        if bool((gathered == gathered[0]).all()):
            continue
        per_rank: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, items, group=group)
        raise ValueError(
            f"FSDP2: {_mismatch(per_rank, _global_ranks(group))}. Settings that decide the refresh "
            "collectives (rank, update_interval, reproject_factor, projection, correlation, state and "
            "projection precision, side) must be equal on every rank of a shard group; nothing was stepped"
        )
