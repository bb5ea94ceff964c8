"""Counted collectives and the closed-form communication volume of each ``P`` refresh.

Every collective the distributed refreshes issue goes through :func:`all_reduce` / :func:`all_gather` /
:func:`broadcast` here, which call ``torch.distributed`` and, when a :class:`CommLog` is passed,
record what this rank hands to the collective: op, label, shape, dtype and ``nbytes = numel · itemsize``
of the rank's input tensor (the logical payload; a ring all-reduce moves ``2(W−1)/W`` of it over each
rank's link, a ring all-gather ``W−1`` times it). Without an initialised process group, or with
``group=None`` and no default group, the helpers are identities and record nothing: the same code then
runs on one process.

Closed forms (:func:`refresh_bytes`), per rank and per refresh of one parameter whose canonical
``M×N`` view is sharded by rows, rank ``r``, element size ``s`` (4 for float32):

======================  =====================================  ==================================
refresh                 collectives                            bytes per rank
======================  =====================================  ==================================
init / svd (CholQR2)    max [|X|, M_k], Gram r×r twice, B r×N  ``s·(2 + 2r² + rN)``
  TSQR after pass 1     max, Gram r×r, all-gather R r×r, B     ``s·(2 + 2r² + rN)``
  TSQR after pass 2     max, Gram r×r twice, all-gather R, B   ``s·(2 + 3r² + rN)``
  ``src`` given         + broadcast of P' N×r                  ``+ s·rN``
correlation, rows       max [|X|, |Mo|], [S_e, Σcos], ∇P N×r   ``s·(4 + rN)``
correlation, columns    max, [S_e, a, ‖M̂_j‖², ‖X_j‖²], ∇P      ``s·(3 + 3N + rN)``
naive port              all-gather of X (then local refresh)   ``s·M_local·N`` sent, ``s·M·N`` held
======================  =====================================  ==================================

The first collective of every refresh (the correlation *steps*; ``correlation_loss_and_grad`` alone
skips it), a 2-element all-reduce with ``MAX``, gives every rank the same
power-of-two rescaling of ``X`` (and ``Mo``) against overflow (issue 19,
:func:`~coap_compile.distributed.correlation.sharded_overflow_scales`).
The projected update between refreshes needs no communication in the row-sharded layout, except the
all-gather of a sharded ``P`` (label ``"p_gather"``, ``s·⌈N/W⌉·r`` per rank and weight:
:mod:`coap_compile.distributed.basis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CommLog",
    "CommRecord",
    "all_gather",
    "all_reduce",
    "broadcast",
    "group_rank",
    "group_size",
    "naive_gather_bytes",
    "refresh_bytes",
]

REFRESH_KINDS = ("init", "svd", "correlation")
FALLBACKS = (None, "tsqr-pass1", "tsqr-pass2")
#: Elements of the overflow-scale ``MAX`` all-reduce that opens every refresh.
SCALE_ELEMENTS = 2


@dataclass(frozen=True)
class CommRecord:
    """One collective as this rank issued it (``nbytes``: bytes of this rank's input tensor)."""

    op: str
    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class CommLog:
    """The collectives of one or more calls, in issue order; also notes which QR path was taken."""

    records: list[CommRecord] = field(default_factory=list)
    qr_paths: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(rec.nbytes for rec in self.records)

    def bytes_by_label(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.records:
            out[rec.label] = out.get(rec.label, 0) + rec.nbytes
        return out

    def clear(self) -> None:
        self.records.clear()
        self.qr_paths.clear()


def _active(group: dist.ProcessGroup | None) -> bool:
    return (
        dist.is_available()
        and dist.is_initialized()
        and (group is None or group != dist.GroupMember.NON_GROUP_MEMBER)
    )


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if _active(group) else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (0 without an initialised process group)."""
    return dist.get_rank(group) if _active(group) else 0


def _record(comm: CommLog | None, op: str, label: str, t: Tensor) -> None:
    if comm is not None:
        comm.records.append(CommRecord(op, label, tuple(t.shape), t.dtype, t.numel() * t.element_size()))


def all_reduce(
    t: Tensor, group: dist.ProcessGroup | None, comm: CommLog | None, label: str, *, op: str = "sum"
) -> Tensor:
    """Sum (``op="max"``: the elementwise maximum of) ``t`` over ``group`` in place (``t`` must be
    contiguous) and return it."""
    if not t.is_contiguous():
        raise ValueError(f"all_reduce needs a contiguous tensor, got strides {t.stride()} for {label!r}")
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got op={op!r}")
    if _active(group):
        _record(comm, "all_reduce" if op == "sum" else "all_reduce_max", label, t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def all_gather(t: Tensor, group: dist.ProcessGroup | None, comm: CommLog | None, label: str) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, in group-rank order."""
    world = group_size(group)
    if not _active(group):
        return t.clone()
    _record(comm, "all_gather", label, t)
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    dist.all_gather(list(out.chunk(world)), t.contiguous(), group=group)
    return out


def broadcast(
    t: Tensor, src: int, group: dist.ProcessGroup | None, comm: CommLog | None, label: str
) -> Tensor:
    """Overwrite ``t`` with group rank ``src``'s ``t`` (in place) and return it."""
    if not t.is_contiguous():
        raise ValueError(f"broadcast needs a contiguous tensor, got strides {t.stride()} for {label!r}")
    if _active(group):
        _record(comm, "broadcast", label, t)
        global_src = src if group is None else dist.get_global_rank(group, src)
        dist.broadcast(t, src=global_src, group=group)
    return t


def refresh_bytes(
    kind: str,
    n: int,
    rank: int,
    *,
    transposed: bool = False,
    fallback: str | None = None,
    broadcast_result: bool = False,
    itemsize: int = 4,
) -> int:
    """Bytes this rank passes to collectives in one refresh of an ``M×N`` row-sharded parameter.

    Args:
        kind: ``"init"`` (randomized range finder), ``"svd"`` (low-cost SVD) or ``"correlation"``.
        n: ``N``, the unsharded (contracted) dimension; ``rank``: ``r``.
        transposed: correlation step only: cosine along the sharded columns (see the table above).
        fallback: init/svd only: ``None`` (CholeskyQR2), ``"tsqr-pass1"`` or ``"tsqr-pass2"``
            (where CholeskyQR2 gave up; see :mod:`coap_compile.distributed.linalg`).
        broadcast_result: init/svd/correlation with ``src`` given: the result ``P`` is broadcast too.
        itemsize: bytes per element (4 for float32, 8 for float64).
    """
    if kind not in REFRESH_KINDS:
        raise ValueError(f"kind must be one of {REFRESH_KINDS}, got kind={kind!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got fallback={fallback!r}")
    extra = n * rank if broadcast_result else 0
    if kind == "correlation":
        if fallback is not None:
            raise ValueError(
                f"fallback applies to init/svd refreshes, got fallback={fallback!r} for correlation"
            )
        vectors = 1 + 3 * n if transposed else 2
        return itemsize * (SCALE_ELEMENTS + vectors + n * rank + extra)
    grams = {None: 2, "tsqr-pass1": 2, "tsqr-pass2": 3}[fallback]
    return itemsize * (SCALE_ELEMENTS + grams * rank * rank + rank * n + extra)


def naive_gather_bytes(m_local: int, m: int, n: int, *, itemsize: int = 4) -> tuple[int, int]:
    """The naive port's all-gather of ``X``: ``(bytes this rank sends, bytes of the gathered M×N copy)``."""
    return itemsize * m_local * n, itemsize * m * n
