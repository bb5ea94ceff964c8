"""COAP's settings, written once: :class:`CoapSettings` (per param group) and :class:`OptimizerOptions`.

Every COAP setting, its default and its validation live here. The same object serves

* the keyword arguments of :func:`coap_compile.optimize` / :class:`~.optimizer.CoapOptimizer` (their
  defaults read :data:`DEFAULTS`; the constructor builds ``CoapSettings(**kwargs)``, which validates);
* param groups (:meth:`CoapSettings.from_group`: a group's keys over the optimizer's defaults, the same
  rules and messages, suffixed with the group), at construction, on ``add_param_group`` and whenever a
  group's keys change (:func:`raw_key` detects a change without validating, once per group per step);
* checkpoint loading (:mod:`.checkpoint` validates a checkpoint's groups with ``from_group``);
* the Hugging Face ``optim_args`` parser (:mod:`coap_compile.integrations.transformers`).

Messages name the setting, the value and what is allowed: ``"rank must be a positive int, got -5"``
(``" (param group 1)"`` appended for a group). Validation is a pure function of the values: it reads no
cache and no process state, so the same values are accepted or refused everywhere, at any time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..projection import POLICIES, ProjectionPolicy, get_policy
from ..projection.coap import DEFAULT_BASIS, REPROJECT_FACTOR, UPDATE_INTERVAL
from ..projection.linalg import BASES
from ..storage.int8 import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCKS, check_block_size, check_blocks

__all__ = [
    "BACKENDS",
    "BASES",
    "CORRELATIONS",
    "DEFAULTS",
    "EMA_KEY",
    "INPUT_PRECISIONS",
    "PROJECTION_KEYS",
    "PROJECTION_PRECISIONS",
    "PROJECTION_SHARDINGS",
    "PROJECTION_SIDES",
    "STATE_PRECISIONS",
    "CoapSettings",
    "OptimizerOptions",
    "raw_key",
]

CORRELATIONS = ("paper", "normalized", "off")
BACKENDS = ("auto", "eager", "triton", "inductor")
#: ``"auto"``: torch's float32 matmul precision, read at each launch
#: (:func:`coap_compile.kernels.launch.resolve_input_precision`).
INPUT_PRECISIONS = ("auto", "ieee", "tf32x3", "tf32", "bf16")
STATE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
PROJECTION_PRECISIONS = ("auto", "fp32", "bf16")
#: ``"auto"``: the canonical side (``X = G`` tall, ``Gᵀ`` wide; FSDP2 weights ``X = G``);
#: ``"rows"``: ``X = G`` for every weight.
PROJECTION_SIDES = ("auto", "rows")
#: How an FSDP2 weight stores ``P``: ``"sharded"`` (its ``torch.chunk`` rows per rank, gathered for the
#: step) or ``"replicated"`` (in full on every rank); :mod:`coap_compile.distributed.basis`.
PROJECTION_SHARDINGS = ("sharded", "replicated")
#: The low-rank EMA of ``X̃`` kept for the correlation step by bases without a first moment.
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


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class CoapSettings:
    """The COAP keys of one param group (defaults: the paper's, as the official code uses them).

    Attributes:
        rank / rank_ratio: ``r = min(rank, min(m, n))``, or ``max(⌊min(m, n) / rank_ratio⌋, 1)``.
        projection: policy name (``"coap"``, ``"galore"``, ``"flora"``, ``"dct"``, ``"fixed"``).
        update_interval / reproject_factor: COAP's ``T_u`` and ``λ`` (correlation step every ``T_u``
            steps, low-cost SVD every ``T_u·λ``; the refresh period of the other policies).
        scale: multiplies the back-projected update only.
        restore_state: map the moments into the new basis when ``P`` changes.
        first_moment_beta: EMA rate of ``coap_exp_avg`` (bases without a first moment).
        correlation: ``"paper"``, ``"normalized"`` or ``"off"`` (:mod:`coap_compile.projection.correlation`).
        state_precision / projection_precision / quant_block_size / quant_blocks: storage
            (:mod:`.precision`; ``quant_blocks``: int8 block shape, ``"rows"`` or ``"tiles"``).
        conv_rank_ratio: Tucker-project large 4-D convolution weights (None: full rank).
        projection_side: ``"auto"`` or ``"rows"`` (:data:`PROJECTION_SIDES`).
        projection_sharding: ``"sharded"`` or ``"replicated"`` (:data:`PROJECTION_SHARDINGS`): ``P`` of an
            FSDP2 weight (no effect on plain tensors; the rule in :mod:`coap_compile.distributed.basis`).
        project: a group key only: ``True``/``False`` force the choice, ``None`` the size rule.
        basis: how a refreshed basis is oriented against the previous one, and whether null directions
            are dropped (``"signs"``, ``"rotation"``; ``"official"`` reproduces the official code exactly:
            LAPACK's signs, every direction kept). COAP and GaLore policies; measurement and rules in
            :mod:`coap_compile.projection.coap`.
    """

    rank: int | None = 256
    rank_ratio: float | None = None
    projection: str = "coap"
    update_interval: int = UPDATE_INTERVAL
    reproject_factor: int = REPROJECT_FACTOR
    scale: float = 1.0
    restore_state: bool = False
    first_moment_beta: float = 0.9
    correlation: str = "paper"
    state_precision: str = "auto"
    projection_precision: str = "auto"
    quant_block_size: int = DEFAULT_BLOCK_SIZE
    quant_blocks: str = DEFAULT_BLOCKS
    conv_rank_ratio: float | None = None
    projection_side: str = "auto"
    projection_sharding: str = "sharded"
    project: bool | None = None
    basis: str = DEFAULT_BASIS

    def __post_init__(self) -> None:
        _positive_int("rank", self.rank, allow_none=True)
        if self.rank_ratio is not None:
            if isinstance(self.rank_ratio, bool) or not isinstance(self.rank_ratio, (int, float)):
                raise TypeError(f"rank_ratio must be a positive number, got {self.rank_ratio!r}")
            if not self.rank_ratio > 0:
                raise ValueError(f"rank_ratio must be a positive number, got {self.rank_ratio!r}")
        if self.rank is None and self.rank_ratio is None:
            raise ValueError("one of rank or rank_ratio must be given, got rank=None and rank_ratio=None")
        _positive_int("update_interval", self.update_interval)
        _positive_int("reproject_factor", self.reproject_factor)
        if not isinstance(self.projection, str):
            raise TypeError(
                f"projection must be a policy name or a ProjectionPolicy, got {self.projection!r}"
            )
        if self.projection not in POLICIES:
            raise ValueError(f"unknown projection {self.projection!r}; expected one of {sorted(POLICIES)}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if not 0.0 <= _number("first_moment_beta", self.first_moment_beta) < 1.0:
            raise ValueError(f"first_moment_beta must be in [0, 1), got {self.first_moment_beta!r}")
        if not isinstance(self.restore_state, bool):
            raise TypeError(f"restore_state must be a bool, got {self.restore_state!r}")
        _one_of("correlation", self.correlation, CORRELATIONS)
        _one_of("state_precision", self.state_precision, STATE_PRECISIONS)
        _one_of("projection_precision", self.projection_precision, PROJECTION_PRECISIONS)
        check_block_size(self.quant_block_size)  # "quant_block_size must be a power of two in [16, 4096] …"
        check_blocks(self.quant_blocks)  # "quant_blocks must be one of ('rows', 'tiles'), got …"
        ratio = self.conv_rank_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0
        ):
            raise ValueError(f"conv_rank_ratio must be None or a positive number, got {ratio!r}")
        _one_of("projection_side", self.projection_side, PROJECTION_SIDES)
        _one_of("projection_sharding", self.projection_sharding, PROJECTION_SHARDINGS)
        _one_of("basis", self.basis, BASES)
        if not (self.project is None or isinstance(self.project, bool)):
            raise ValueError(f"project must be None, True or False, got {self.project!r}")

    # -- param groups ----------------------------------------------------------------------------------
    @classmethod
    def from_group(
        cls, group: dict, index: int, policy_instance: ProjectionPolicy | None = None
    ) -> CoapSettings:
        """The settings of param group ``index`` (keys it lacks take the defaults), validated with the
        keyword arguments' messages followed by ``(param group i)``. A group names its projection by
        string; with a policy instance given to the optimizer it must name that policy."""
        try:
            projection = group.get("projection", "coap")
            if policy_instance is not None and projection != policy_instance.name:
                raise ValueError(
                    f"projection of a group must be the optimizer's policy {policy_instance.name!r} when a "
                    f"ProjectionPolicy instance is given, got {projection!r}"
                )
            if not isinstance(projection, str):
                raise TypeError(f"projection in a param group must be a policy name, got {projection!r}")
            return cls(**{k: group[k] for k in PROJECTION_KEYS if k in group})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (param group {index})") from None

    def group_defaults(self) -> dict[str, Any]:
        """The entries this object adds to the optimizer's ``defaults`` (every key but ``project``)."""
        out = asdict(self)
        del out["project"]
        out["scale"] = float(self.scale)
        out["first_moment_beta"] = float(self.first_moment_beta)
        return out

    # -- what the settings build -----------------------------------------------------------------------
    def policy(self, instance: ProjectionPolicy | None = None) -> ProjectionPolicy:
        """The group's projection policy: the user's instance, or one built by name from the settings."""
        if instance is not None:
            return instance
        kwargs: dict[str, Any] = {}
        if self.projection == "coap":
            kwargs = {
                "update_interval": self.update_interval,
                "reproject_factor": self.reproject_factor,
                "restore_state": self.restore_state,
                "correlation": self.correlation,
                "basis": self.basis,
            }
        elif self.projection == "dct":
            kwargs = {"update_interval": self.update_interval, "restore_state": self.restore_state}
        elif self.projection == "galore":
            kwargs = {"update_gap": self.update_interval, "basis": self.basis}
        elif self.projection == "flora":
            kwargs = {"resample_every": self.update_interval}
        return get_policy(self.projection, **kwargs)

    def tucker_policy(self, instance: Any = None):
        """The group's Tucker (4-D) policy: the user's instance, or one with the group's COAP schedule."""
        from ..projection.tucker import TuckerPolicy

        if instance is not None:
            return instance
        return TuckerPolicy(
            update_interval=self.update_interval,
            reproject_factor=self.reproject_factor,
            restore_state=self.restore_state,
        )


#: The defaults, for signatures (``rank: int | None = DEFAULTS.rank``) and parsers.
DEFAULTS = CoapSettings()
#: Param-group keys owned by COAP (everything else belongs to the base optimizer).
PROJECTION_KEYS = tuple(f.name for f in fields(CoapSettings))


def raw_key(group: dict) -> tuple:
    """What a group's plans are derived from, compared without validating (one call per group and step):
    the COAP keys by ``repr`` (``1`` and ``True`` differ) and the identities of the group's parameters."""
    return (*(repr(group.get(k)) for k in PROJECTION_KEYS), tuple(map(id, group["params"])))


@dataclass(frozen=True)
class OptimizerOptions:
    """Settings of the whole optimizer (not of a group).

    Attributes:
        backend: ``"auto"`` (Triton kernels for CUDA tensors when available, the eager lowering on CPU),
            ``"eager"``, ``"triton"`` or ``"inductor"`` (CPU parameters: the fused Inductor lowering of
            the elementwise update with its state load/store, :mod:`coap_compile.lowering.inductor`, which
            says why ``"auto"`` does not pick it on CPU; for matrix groups and for full-rank parameters
            with bf16/int8 states, :mod:`.fullgroup`; CUDA parameters as with ``"auto"``).
        check_finite: refuse (raise) a step whose gradients contain inf/NaN, before modifying anything.
        grouped: update projected matrices with equal low-rank state shapes together (:mod:`.grouped`).
        input_precision: ``tl.dot`` precision of the kernels' matmuls: ``"auto"`` (torch's global float32
            matmul precision, read at each launch: ``"highest"`` → ``"ieee"``, ``"high"`` → ``"tf32"``,
            ``"medium"`` → ``"bf16"``; bf16 weights → ``"bf16"``), ``"ieee"``, ``"tf32x3"``, ``"tf32"``,
            ``"bf16"`` (:mod:`coap_compile.kernels.launch`).
    """

    backend: str = "auto"
    check_finite: bool = True
    grouped: bool = True
    input_precision: str = "auto"

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)
        _one_of("input_precision", self.input_precision, INPUT_PRECISIONS)
        if not isinstance(self.grouped, bool):
            raise TypeError(f"grouped must be a bool, got {self.grouped!r} ({type(self.grouped).__name__})")
        if not isinstance(self.check_finite, bool):
            raise TypeError(
                f"check_finite must be a bool, got {self.check_finite!r} ({type(self.check_finite).__name__})"
            )
