"""Projection policies: which low-rank subspace a matrix's optimizer state lives in, and when it changes."""

from .base import ProjectionPolicy, RefreshKind, canonical, resolve_rank
from .coap import CoapPolicy, correlation_step, restore_moments
from .fixed import FixedProjection
from .flora import FloraPolicy
from .galore import GaLorePolicy
from .linalg import gaussian_basis, orthogonal_basis, top_right_singular_vectors
from .registry import POLICIES, get_policy

__all__ = [
    "POLICIES",
    "CoapPolicy",
    "FixedProjection",
    "FloraPolicy",
    "GaLorePolicy",
    "ProjectionPolicy",
    "RefreshKind",
    "canonical",
    "correlation_step",
    "gaussian_basis",
    "get_policy",
    "orthogonal_basis",
    "resolve_rank",
    "restore_moments",
    "top_right_singular_vectors",
]
