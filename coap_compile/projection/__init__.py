"""Projection policies: which low-rank subspace a matrix's optimizer state lives in, and when it changes."""

from .base import LOCAL, ROWS, Comm, Layout, ProjectionPolicy, RefreshKind, canonical, resolve_rank
from .coap import CORRELATION_MODES, CoapPolicy, correlation_step, restore_moments
from .correlation import DEFAULT_ANGLE, correlation_grad, normalized_correlation_step
from .dct import DctPolicy, dct_basis, select_columns, shared_basis, shared_basis_builds
from .fixed import FixedProjection
from .flora import FloraPolicy
from .galore import GaLorePolicy
from .linalg import (
    gaussian_basis,
    largest_principal_angle,
    orthogonal_basis,
    principal_angles,
    top_right_singular_vectors,
)
from .registry import POLICIES, get_policy

__all__ = [
    "CORRELATION_MODES",
    "DEFAULT_ANGLE",
    "LOCAL",
    "POLICIES",
    "ROWS",
    "CoapPolicy",
    "Comm",
    "DctPolicy",
    "FixedProjection",
    "FloraPolicy",
    "GaLorePolicy",
    "Layout",
    "ProjectionPolicy",
    "RefreshKind",
    "canonical",
    "correlation_grad",
    "correlation_step",
    "dct_basis",
    "gaussian_basis",
    "get_policy",
    "largest_principal_angle",
    "normalized_correlation_step",
    "orthogonal_basis",
    "principal_angles",
    "resolve_rank",
    "restore_moments",
    "select_columns",
    "shared_basis",
    "shared_basis_builds",
    "top_right_singular_vectors",
]
