"""COAP settings: the param-group keys COAP owns, their validation, and the policy they build."""

from __future__ import annotations

import math
from typing import Any

from ..projection import POLICIES, ProjectionPolicy, get_policy

__all__ = [
    "BACKENDS",
    "CORRELATIONS",
    "EMA_KEY",
    "PRECISIONS",
    "PROJECTION_KEYS",
    "check_conv_rank_ratio",
    "check_projection_side",
    "make_policy",
    "make_tucker_policy",
    "settings_key",
    "validate_group",
    "validate_projection_args",
]

#: param-group keys owned by COAP (everything else belongs to the base optimizer).
PROJECTION_KEYS = (
    "rank",
    "rank_ratio",
    "projection",
    "update_interval",
    "reproject_factor",
    "scale",
    "restore_state",
    "first_moment_beta",
    "correlation",
    "state_precision",
    "projection_precision",
    "quant_block_size",
    "conv_rank_ratio",
    "projection_side",
    "project",
)
CORRELATIONS = ("paper", "normalized", "off")
BACKENDS = ("auto", "eager", "triton")
PRECISIONS = ("ieee", "tf32x3", "tf32")
EMA_KEY = "coap_exp_avg"


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def validate_projection_args(
    rank, rank_ratio, projection, update_interval, reproject_factor, scale, first_moment_beta, backend=None
) -> None:
    """Raise a ValueError/TypeError naming the argument and its value for bad COAP settings."""
    _positive_int("rank", rank, allow_none=True)
    if rank_ratio is not None:
        if isinstance(rank_ratio, bool) or not isinstance(rank_ratio, (int, float)):
            raise TypeError(f"rank_ratio must be a positive number, got {rank_ratio!r}")
        if not rank_ratio > 0:
            raise ValueError(f"rank_ratio must be a positive number, got {rank_ratio!r}")
    if rank is None and rank_ratio is None:
        raise ValueError("one of rank or rank_ratio must be given, got rank=None and rank_ratio=None")
    _positive_int("update_interval", update_interval)
    _positive_int("reproject_factor", reproject_factor)
    if not isinstance(projection, (str, ProjectionPolicy)):
        raise TypeError(f"projection must be a policy name or a ProjectionPolicy, got {projection!r}")
    if isinstance(projection, str) and projection not in POLICIES:
        raise ValueError(f"unknown projection {projection!r}; expected one of {sorted(POLICIES)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not 0.0 <= _number("first_moment_beta", first_moment_beta) < 1.0:
        raise ValueError(f"first_moment_beta must be in [0, 1), got {first_moment_beta!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def validate_group(group: dict, index: int, policy_instance: ProjectionPolicy | None = None) -> None:
    """Validate the COAP keys of one param group with the keyword arguments' rules and messages.

    The message is the keyword argument's, followed by the group it came from; ``project`` must be
    ``None``, ``True`` or ``False`` and ``restore_state`` a bool. A group may name a projection only
    by string (a policy instance is given once, to the optimizer).
    """
    try:
        projection = group["projection"]
        if policy_instance is not None and projection != policy_instance.name:
            raise ValueError(
                f"projection of a group must be the optimizer's policy {policy_instance.name!r} when a "
                f"ProjectionPolicy instance is given, got {projection!r}"
            )
        if not isinstance(projection, str):
            raise TypeError(f"projection in a param group must be a policy name, got {projection!r}")
        validate_projection_args(
            group["rank"], group["rank_ratio"], projection, group["update_interval"],
            group["reproject_factor"], group["scale"], group["first_moment_beta"],
        )  # fmt: skip
        if group.get("correlation", "paper") not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, got {group.get('correlation')!r}")
        from .precision import validate_precision

        validate_precision(
            group.get("state_precision", "auto"), group.get("projection_precision", "auto"),
            group.get("quant_block_size", 256),
        )  # fmt: skip
        if not isinstance(group["restore_state"], bool):
            raise TypeError(f"restore_state must be a bool, got {group['restore_state']!r}")
        check_conv_rank_ratio(group.get("conv_rank_ratio"))
        check_projection_side(group.get("projection_side", "auto"))
        project = group.get("project")
        if not (project is None or isinstance(project, bool)):
            raise ValueError(f"project must be None, True or False, got {project!r}")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} (param group {index})") from None


def check_conv_rank_ratio(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
        raise ValueError(f"conv_rank_ratio must be None or a positive number, got {value!r}")


def check_projection_side(value: Any) -> None:
    from ..distributed.fsdp import PROJECTION_SIDES

    if not isinstance(value, str) or value not in PROJECTION_SIDES:
        raise ValueError(f"projection_side must be one of {PROJECTION_SIDES}, got {value!r}")


def make_tucker_policy(group: dict, instance: Any = None):
    """The Tucker (4-D) policy of a group: the user's instance, or one with the group's COAP schedule."""
    from ..projection.tucker import TuckerPolicy

    if instance is not None:
        return instance
    return TuckerPolicy(
        update_interval=group["update_interval"],
        reproject_factor=group["reproject_factor"],
        restore_state=group["restore_state"],
    )


def settings_key(group: dict) -> tuple:
    """What plans and policies are derived from: the COAP keys and the group's parameters."""
    return (*(repr(group.get(k)) for k in PROJECTION_KEYS), tuple(map(id, group["params"])))


def make_policy(group: dict, instance: ProjectionPolicy | None) -> ProjectionPolicy:
    """The policy for a group: the user's instance, or one built by name from the group settings."""
    if instance is not None:
        return instance
    name = group["projection"]
    kwargs: dict[str, Any] = {}
    if name == "coap":
        kwargs = {
            "update_interval": group["update_interval"],
            "reproject_factor": group["reproject_factor"],
            "restore_state": group["restore_state"],
            "correlation": group.get("correlation", "paper"),
        }
    elif name == "dct":
        kwargs = {"update_interval": group["update_interval"], "restore_state": group["restore_state"]}
    elif name == "galore":
        kwargs = {"update_gap": group["update_interval"]}
    elif name == "flora":
        kwargs = {"resample_every": group["update_interval"]}
    return get_policy(name, **kwargs)
