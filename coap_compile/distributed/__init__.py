"""Distributed COAP building blocks: row-sharded refresh linear algebra and counted collectives.

* :mod:`.linalg`: low-cost SVD / randomized range finder (CholeskyQR2 with a TSQR fallback), the
  side-choice analysis for FSDP2 ``Shard(0)`` parameters, :func:`align_signs`, :func:`align_rotation`,
  :func:`assert_replicated`.
* :mod:`.correlation`: the correlation step with hand-derived gradients (all-reduced ``N×r`` + scalars).
* :mod:`.agreement`: the settings that decide collectives checked equal across each shard group.
* :mod:`.basis`: an FSDP2 weight's ``P`` stored as its ``torch.chunk`` row slice, gathered per step.
* :mod:`.comm`: counted collectives (:class:`CommLog`) and the closed-form bytes per refresh.

The local test launcher (``run_distributed``: ``world_size`` gloo processes) is :mod:`coap_lab.launch`.
"""

from .comm import CommLog, CommRecord, naive_gather_bytes, refresh_bytes
from .correlation import correlation_loss_and_grad, correlation_step, normalized_correlation_step
from .linalg import align_rotation, align_signs, assert_replicated, cholesky_qr, draw_omega, orthogonal_basis

__all__ = [
    "CommLog",
    "CommRecord",
    "align_rotation",
    "align_signs",
    "assert_replicated",
    "cholesky_qr",
    "correlation_loss_and_grad",
    "correlation_step",
    "draw_omega",
    "naive_gather_bytes",
    "normalized_correlation_step",
    "orthogonal_basis",
    "refresh_bytes",
]
