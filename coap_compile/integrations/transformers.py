"""COAP from Hugging Face ``Trainer`` / ``TrainingArguments`` in one line.

Usage::

    from coap_compile.integrations.transformers import coap_optimizer_cls_and_kwargs

    args = TrainingArguments(..., optim_target_modules=[r".*\\.(q|k|v|o|gate|up|down)_proj"],
                             optim_args="rank=256,update_interval=32,scale=0.25")
    trainer = Trainer(model, args, train_dataset=ds,
                      optimizer_cls_and_kwargs=coap_optimizer_cls_and_kwargs(args))

What is read from ``TrainingArguments`` (the fields transformers' GaLore/APOLLO route reads):

* ``optim`` chooses the base, built exactly as ``Trainer`` builds it: ``"adamw_torch"`` and
  ``"adamw_torch_fused"`` (the default) → ``torch.optim.AdamW(lr=learning_rate, betas=(adam_beta1,
  adam_beta2), eps=adam_epsilon)``; ``"adafactor"`` → ``transformers.optimization.Adafactor(lr=learning_rate,
  scale_parameter=False, relative_step=False)``. ``fused`` is not passed on: the projected update is
  COAP's own, and the full-rank parameters run the unfused torch step (eagerly bit-identical to
  ``torch.optim.AdamW``). Any other ``optim`` is refused naming it; ``base_optim=``/``base_kwargs=``
  choose any base the compiler supports.
* ``weight_decay``: applied as ``Trainer`` does, i.e. not to the parameters its
  ``get_decay_parameter_names`` excludes (biases, norms).
* ``optim_target_modules`` (transformers' matching rules): ``None`` → the same selection as
  ``coap_compile.optimize(model)`` (``nn.Linear`` weights with ``min(m, n) > r``; embeddings and heads
  tied to them stay full-rank); ``"all-linear"`` → the same (every ``nn.Linear`` under the size rule: a
  matrix with ``min(m, n) ≤ r`` would keep a rank-``min(m, n)`` state plus ``P``, more than the base's);
  a string → a regular expression ``re.fullmatch``-ed against module names; a list → each entry an exact
  name, a substring of the name, or a fullmatch regex (``transformers.trainer_utils.
  check_target_module_exists``). Matched ``nn.Linear`` modules are projected (rank clamped to
  ``min(m, n)``), other matched modules are ignored as GaLore does. Projecting nothing of what was
  selected (no match, or only a tied head) raises ``ValueError`` (transformers' GaLore route refuses a
  target that matches nothing); projecting fewer than selected warns. Both say why with the message of
  :func:`coap_compile.runtime.selection.shortfall`, the check ``optimize()`` warns with.
* ``optim_args``: ``"key=value,..."`` with the keys of :data:`OPTIM_ARGS` (``rank``, ``rank_ratio``,
  ``update_interval``, ``reproject_factor``, ``scale``, ``projection``, ``state_precision``,
  ``projection_precision``, ``quant_block_size``, ``quant_blocks``), parsed strictly: an unknown
  or repeated key, an entry without ``=`` or a bad value raises ``ValueError`` naming it (GaLore's
  ``update_proj_gap`` is refused with the COAP name to use). Defaults are :func:`coap_compile.optimize`'s.

**Mechanism, and why** (transformers 5.24's ``Trainer.create_optimizer`` read for this decision).
``optimizer_cls_and_kwargs=(factory, kwargs)`` where ``factory`` is not an ``Optimizer`` subclass:
``Trainer`` then calls ``factory()(model, **kwargs)`` with the model itself. The alternatives:

* ``optim="coap_adamw"``: ``TrainingArguments.__post_init__`` converts ``optim`` to the closed
  ``OptimizerNames`` enum and ``Trainer`` dispatches through the private ``_OPTIMIZER_HANDLERS`` dict;
  adding a name means patching transformers' internals at import time (for everyone who imports
  ``coap_compile``) and breaks when those private names move.
* ``optimizer_cls_and_kwargs=(CoapOptimizer, kwargs)``: ``Trainer`` passes its two weight-decay groups,
  so module types and names are lost, and embeddings / tied heads get projected (issue 12).
* a ``Trainer`` subclass: does not compose with the subclasses people already use (TRL's
  ``SFTTrainer`` and friends accept and forward ``optimizer_cls_and_kwargs``).
* ``optimizers=(create_coap_optimizer(model, args), None)``: works (also offered, for custom loops), but
  needs the model before the Trainer exists.

Checkpoints: ``Trainer`` saves ``optimizer.state_dict()`` (tensors only) and loads it with
``torch.load(weights_only=True)``; the LR scheduler (``LambdaLR``) and RNG states are its own. Resuming
from ``checkpoint-k`` is bit-identical to the uninterrupted run (tests/test_integration_transformers.py).

**Layer-wise (in-backward) variant**: ``optim_args="...,layerwise=true"`` steps every parameter inside
the backward pass as soon as its gradient is ready and frees it
(:func:`coap_compile.step_in_backward`), so the full-size gradients of all layers never coexist. The
optimizer ``Trainer`` gets is the same ``CoapOptimizer`` (its ``step()`` then has nothing left to do):
the LR scheduler, ``state_dict`` checkpoints and resume work as on the normal path, and the run is
bit-identical to the same Trainer run without ``layerwise`` (tests/test_integration_transformers.py;
transformers' own layer-wise GaLore instead builds one optimizer per parameter behind a dummy whose
state dict is empty). Refused, each with a message naming the setting: ``max_grad_norm > 0`` (global
clipping needs every gradient before any step: set ``max_grad_norm=0``), ``gradient_accumulation_steps
> 1`` (the Trainer's last window of an epoch can be shorter than the others, and the hooks would count
it wrong), ``fp16`` (GradScaler unscales between backward and step; use ``bf16``) and more than one
process (the parameter hooks run before DDP's all-reduce; :mod:`coap_compile.distributed.backward`
steps after it, in a custom loop).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import UnsupportedOptimizerError
from ..runtime.optimizer import CoapOptimizer
from ..runtime.selection import TargetModules, select, shortfall
from ..runtime.settings import CoapSettings

if TYPE_CHECKING:  # transformers stays optional: imported only inside the functions that need it
    from transformers import TrainingArguments

__all__ = [
    "OPTIM_ARGS",
    "CoapOptimizerFactory",
    "base_optimizer_from_args",
    "coap_optimizer_cls_and_kwargs",
    "create_coap_optimizer",
    "parse_optim_args",
    "target_modules_from_args",
]

#: ``optim_args`` keys and their types (``layerwise``, the in-backward variant, is handled apart).
OPTIM_ARGS: dict[str, type] = {
    "rank": int,
    "rank_ratio": float,
    "update_interval": int,
    "reproject_factor": int,
    "scale": float,
    "projection": str,
    "state_precision": str,
    "projection_precision": str,
    "quant_block_size": int,
    "quant_blocks": str,
}
_RESERVED = {"layerwise": bool}
_GALORE_NAMES = {"update_proj_gap": "update_interval", "proj_type": None, "scale_type": None, "proj": None}
#: keyword settings that may be given in Python (``overrides``) besides the optim_args keys.
_SETTINGS = ("restore_state", "first_moment_beta", "backend", "check_finite", "input_precision")
_ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")
_ADAFACTOR_NAMES = ("adafactor",)


def _convert(key: str, text: str, kind: type) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        value = kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")
        raise ValueError(f"optim_args: {key} must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"optim_args: {key} must be a finite number, got {text!r}")
    return value


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """Parse ``"rank=8, scale=0.25, projection=coap"`` into typed values (strictly; see the module doc).

    >>> parse_optim_args("rank=8, scale=0.25")
    {'rank': 8, 'scale': 0.25}
    """
    if text is None or not text.strip():
        return {}
    if not isinstance(text, str):
        raise TypeError(f"optim_args must be a string 'key=value,...', got {text!r}")
    allowed = {**OPTIM_ARGS, **_RESERVED}
    out: dict[str, Any] = {}
    for entry in text.split(","):
        key, eq, value = (s.strip() for s in entry.partition("="))
        if not eq or not key or not value:
            raise ValueError(
                f"optim_args entry {entry.strip()!r} in {text!r} is not key=value; allowed keys: "
                f"{', '.join(OPTIM_ARGS)}"
            )
        if key in _GALORE_NAMES:
            use = _GALORE_NAMES[key]
            hint = f"use {use}={value}" if use else "COAP has no such setting"
            raise ValueError(f"optim_args: {key!r} is a GaLore/APOLLO argument ({hint})")
        if key not in allowed:
            raise ValueError(
                f"optim_args: unknown key {key!r} in {text!r}; allowed keys: {', '.join(OPTIM_ARGS)}"
            )
        if key in out:
            raise ValueError(f"optim_args: key {key!r} given twice in {text!r}")
        out[key] = _convert(key, value, allowed[key])
    try:
        CoapSettings(**{k: v for k, v in out.items() if k in OPTIM_ARGS})  # the defaults and rules
    except (TypeError, ValueError) as exc:
        raise ValueError(f"optim_args {text!r}: {exc}") from None
    return out


def target_modules_from_args(optim_target_modules: str | list[str] | None) -> TargetModules:
    """``TrainingArguments.optim_target_modules`` as :func:`coap_compile.optimize`'s ``target_modules``."""
    if optim_target_modules is None:
        return None
    if isinstance(optim_target_modules, str):
        if optim_target_modules.replace("_", "-") == "all-linear":
            return None  # every nn.Linear under the size rule: the default selection (module docstring)
    elif not isinstance(optim_target_modules, list | tuple) or not all(
        isinstance(t, str) for t in optim_target_modules
    ):
        raise TypeError(
            "optim_target_modules must be a list of strings, a regex string or 'all-linear', got "
            f"{optim_target_modules!r}"
        )
    from transformers.trainer_utils import check_target_module_exists

    spec = optim_target_modules if isinstance(optim_target_modules, str) else list(optim_target_modules)

    def match(name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and bool(check_target_module_exists(spec, name))

    match.spec = spec  # type: ignore[attr-defined]  (for the "matched nothing" message)
    return match


def base_optimizer_from_args(args: TrainingArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The base class and keyword arguments ``Trainer`` would build for ``args.optim`` (module docstring)."""
    optim = getattr(args.optim, "value", args.optim)
    if optim in _ADAMW_NAMES:
        kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return torch.optim.AdamW, {**kwargs, "weight_decay": args.weight_decay}
    if optim in _ADAFACTOR_NAMES:
        from transformers.optimization import Adafactor

        kwargs = dict(lr=args.learning_rate, scale_parameter=False, relative_step=False)
        return Adafactor, {**kwargs, "weight_decay": args.weight_decay}
    raise ValueError(
        f"TrainingArguments.optim={optim!r} has no COAP form here; supported: "
        f"{', '.join(_ADAMW_NAMES + _ADAFACTOR_NAMES)} (or pass base_optim= and base_kwargs= to "
        "coap_optimizer_cls_and_kwargs for any base coap_compile can compile)"
    )


def _decay_names(model: nn.Module) -> set[str]:
    """The parameter names ``Trainer`` applies weight decay to (its own rule, from the installed version)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # the method does not use self


class CoapOptimizerFactory:
    """``Trainer``'s optimizer factory: ``CoapOptimizerFactory()(model, **kwargs) -> CoapOptimizer``.

    ``kwargs`` come from :func:`coap_optimizer_cls_and_kwargs`: ``base_optim``, ``base_kwargs``,
    ``coap`` (COAP settings), ``target_modules``, ``weight_decay``, ``layerwise``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # a transformers without factories calls optimizer_cls(params, **kwargs)
            raise TypeError(
                "this transformers version does not support optimizer factories in "
                "optimizer_cls_and_kwargs (transformers >= 5 does); use "
                "Trainer(optimizers=(create_coap_optimizer(model, args), None)) instead"
            )

    def __call__(
        self,
        model: nn.Module,
        *,
        base_optim: type[torch.optim.Optimizer],
        base_kwargs: dict[str, Any],
        coap: dict[str, Any],
        target_modules: TargetModules,
        weight_decay: float,
        layerwise: bool = False,
    ) -> CoapOptimizer:
        selection = select(model, target_modules)
        groups, names = selection.groups, selection.names
        decay = _decay_names(model)
        by_id = {id(p): n for n, p in model.named_parameters()}
        split = []
        for g in groups:
            settings = {k: v for k, v in g.items() if k != "params"}
            for wd, keep in ((weight_decay, True), (0.0, False)):
                params = [p for p in g["params"] if (by_id[id(p)] in decay) == keep]
                if params:
                    split.append({**settings, "params": params, "weight_decay": wd})
        try:
            opt = CoapOptimizer(split, base_optim, param_names=names, **coap, **base_kwargs)
        except UnsupportedOptimizerError as exc:
            if base_optim.__module__.startswith("transformers"):
                raise UnsupportedOptimizerError(
                    f"{exc}. TrainingArguments.optim='adafactor' maps to transformers' Adafactor as Trainer "
                    "builds it; pass base_optim=torch.optim.Adafactor to coap_optimizer_cls_and_kwargs for "
                    "torch's Adafactor instead (a different algorithm: relative step min(lr, 1/sqrt(t)) "
                    "scaled by RMS(W))"
                ) from exc
            raise
        message = shortfall(opt, selection)  # the check optimize() warns with
        if message is not None:
            if target_modules is not None and not opt.projected_parameters():
                raise ValueError(message)  # as transformers' GaLore route refuses a target matching nothing
            warnings.warn(message, UserWarning, stacklevel=2)
        return _layerwise(opt, model) if layerwise else opt


def coap_optimizer_cls_and_kwargs(
    args: TrainingArguments,
    *,
    base_optim: type[torch.optim.Optimizer] | None = None,
    base_kwargs: dict[str, Any] | None = None,
    target_modules: TargetModules = None,
    **settings: Any,
) -> tuple[type[CoapOptimizerFactory], dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from ``args`` (module docstring).

    Args:
        args: the ``TrainingArguments`` (``optim``, ``learning_rate``, ``adam_*``, ``weight_decay``,
            ``optim_target_modules``, ``optim_args`` are read now).
        base_optim, base_kwargs: override the base chosen from ``args.optim``; ``base_kwargs`` are merged
            over the ones derived from ``args`` (with ``base_optim`` given, only ``lr`` and ``weight_decay``
            are derived).
        target_modules: :func:`coap_compile.optimize`'s ``target_modules`` (regexes searched in module
            names, or a callable), instead of ``args.optim_target_modules``.
        **settings: COAP settings in Python (the :data:`OPTIM_ARGS` keys, ``restore_state``,
            ``first_moment_beta``, ``backend``, ``check_finite``, ``input_precision``); a key also in
            ``args.optim_args`` is an error.
    """
    parsed = parse_optim_args(args.optim_args)
    layerwise = bool(parsed.pop("layerwise", False))
    if layerwise:
        _check_layerwise(args)
    for key in settings:
        if key not in OPTIM_ARGS and key not in _SETTINGS:
            raise TypeError(
                f"coap_optimizer_cls_and_kwargs got an unknown setting {key!r}; allowed: "
                f"{', '.join((*OPTIM_ARGS, *_SETTINGS))}, base_optim, base_kwargs, target_modules"
            )
        if key in parsed:
            raise ValueError(f"{key!r} is given both in args.optim_args and as a keyword argument")
    if base_optim is None:
        base_optim, derived = base_optimizer_from_args(args)
    else:
        derived = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if target_modules is not None and args.optim_target_modules is not None:
        raise ValueError("target_modules is given both in args.optim_target_modules and as a keyword")
    kwargs = {
        "base_optim": base_optim,
        "base_kwargs": {**derived, **(base_kwargs or {})},
        "coap": {**parsed, **settings},
        "target_modules": target_modules
        if target_modules is not None
        else target_modules_from_args(args.optim_target_modules),
        "weight_decay": float({**derived, **(base_kwargs or {})}.get("weight_decay", args.weight_decay)),
        "layerwise": layerwise,
    }
    return CoapOptimizerFactory, kwargs


def create_coap_optimizer(model: nn.Module, args: TrainingArguments, **overrides: Any) -> CoapOptimizer:
    """The optimizer ``Trainer`` would build via :func:`coap_optimizer_cls_and_kwargs` (same arguments),
    for ``Trainer(optimizers=(opt, None))`` or a custom training loop."""
    factory, kwargs = coap_optimizer_cls_and_kwargs(args, **overrides)
    return factory()(model, **kwargs)


# -- layer-wise (in-backward) variant -------------------------------------------------------------------
def _check_layerwise(args: TrainingArguments) -> None:
    """The ``TrainingArguments`` that ``layerwise=true`` cannot honour (module docstring)."""
    why = "optim_args layerwise=true steps each parameter inside the backward pass"
    if args.max_grad_norm:
        raise ValueError(
            f"{why}, so TrainingArguments.max_grad_norm={args.max_grad_norm} cannot clip by the global norm "
            "(it needs every gradient before any step): set max_grad_norm=0"
        )
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"{why}: TrainingArguments.gradient_accumulation_steps={args.gradient_accumulation_steps} is not "
            "supported (Trainer's last window of an epoch may be shorter); use 1, or "
            "coap_compile.step_in_backward(model, opt, accumulation_steps=N) in your own loop"
        )
    if args.fp16:
        raise ValueError(
            f"{why}: TrainingArguments.fp16=True needs a GradScaler between backward and step; use bf16"
        )
    if args.world_size != 1:
        raise ValueError(
            f"{why}: TrainingArguments.world_size={args.world_size}: its hooks would run before DDP's "
            "all-reduce; use one process, or coap_compile.step_in_backward(ddp_model, opt) in your own loop"
        )


def _layerwise(opt: CoapOptimizer, model: nn.Module) -> CoapOptimizer:
    """``opt`` stepping inside the backward pass of ``model`` (the hooks keep the handle alive; the
    optimizer itself is unchanged, so ``Trainer``'s scheduler, checkpoints and resume see the usual one)."""
    from ..runtime.inbackward import step_in_backward

    step_in_backward(model, opt)
    return opt
