"""Lowerings of a projected program: eager torch (CPU, and the oracle), generated Triton kernels, and the
fused CPU lowering compiled by Inductor (:mod:`.inductor`, over the stacked storage functions of
:mod:`.stacked`)."""

from .eager import apply_reprojection_, run_lowrank

__all__ = ["apply_reprojection_", "run_lowrank"]
