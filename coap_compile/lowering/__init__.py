"""Lowerings of a projected program: eager torch (CPU, and the oracle) and generated Triton kernels."""

from .eager import apply_reprojection_, run_lowrank

__all__ = ["apply_reprojection_", "run_lowrank"]
