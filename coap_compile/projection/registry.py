"""Projection policies by name: the only place that maps a string to a policy class."""

from __future__ import annotations

from typing import Any

from .base import ProjectionPolicy
from .coap import CoapPolicy
from .dct import DctPolicy
from .fixed import FixedProjection
from .flora import FloraPolicy
from .galore import GaLorePolicy

__all__ = ["POLICIES", "get_policy"]

#: name → policy class.
POLICIES: dict[str, type[ProjectionPolicy]] = {
    cls.name: cls for cls in (CoapPolicy, GaLorePolicy, FloraPolicy, DctPolicy, FixedProjection)
}


def get_policy(name_or_instance: str | ProjectionPolicy, **kwargs: Any) -> ProjectionPolicy:
    """Return a policy: an instance is passed through (``kwargs`` must then be empty), a name is looked
    up in :data:`POLICIES` and constructed with ``kwargs``. Unknown names raise ValueError."""
    if isinstance(name_or_instance, ProjectionPolicy):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} given together with a policy instance")
        return name_or_instance
    if not isinstance(name_or_instance, str) or name_or_instance not in POLICIES:
        raise ValueError(f"unknown projection {name_or_instance!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name_or_instance](**kwargs)
