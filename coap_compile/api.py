"""Public entry points: :func:`optimize` and :func:`explain`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .runtime.optimizer import CoapOptimizer
from .runtime.selection import TargetModules, select, shortfall
from .runtime.settings import DEFAULTS

__all__ = ["explain", "optimize"]


def optimize(
    model_or_params: nn.Module | Iterable,
    base_optim: type[torch.optim.Optimizer] = torch.optim.AdamW,
    rank: int | None = DEFAULTS.rank,
    *,
    target_modules: TargetModules = None,
    **kwargs: Any,
) -> CoapOptimizer:
    """Compile ``base_optim`` into its COAP form for ``model_or_params``.

    The base optimizer's per-parameter update is captured as an FX graph, analysed and rewritten so
    that, for each projected weight ``W`` (``m×n``), its states live in a rank-``r`` space:
    ``X̃ = X P`` (``X = G`` or ``Gᵀ`` so that ``X`` is tall, ``P``: ``N×r``), the base update runs on
    ``X̃``, and ``W ← decay·W + scale·D Pᵀ``. Other parameters run the unmodified base optimizer.

    Args:
        model_or_params: an ``nn.Module`` (its ``nn.Linear`` weights with ``min(m, n) > rank`` are
            projected; tied embedding weights are not), or parameters / parameter groups.
        base_optim: ``torch.optim.AdamW``, ``Adam``, ``Adafactor``, ``RMSprop``, ``SGD`` (momentum), or
            any optimizer whose update the compiler can rewrite (else ``UnsupportedOptimizerError``).
        rank: the projection rank (see :class:`~coap_compile.runtime.settings.CoapSettings`).
        target_modules: regular expressions (searched in module and parameter names) or
            ``callable(name, module)`` selecting the modules whose 2-D parameters are projected, or the
            parameters themselves (model input only; :mod:`coap_compile.runtime.selection`).

        **kwargs: COAP's settings (``rank_ratio``, ``projection``, ``update_interval``,
            ``reproject_factor``, ``scale``, ``restore_state``, ``first_moment_beta``, ``correlation``,
            ``state_precision``, ``projection_precision``, ``quant_block_size``, ``quant_blocks``,
            ``conv_rank_ratio``, ``projection_side``, ``projection_sharding``, ``basis``; defaults and rules
            in :class:`~coap_compile.runtime.settings.CoapSettings`),
            the options ``backend``, ``check_finite``, ``grouped``, ``input_precision``, ``conv_policy``
            (:class:`~coap_compile.CoapOptimizer`), and the base optimizer's own arguments (``lr``,
            ``betas``, ``weight_decay`` …).

    Warns (one ``UserWarning`` naming each reason and its fix) when fewer parameters are projected than
    asked: ``target_modules`` matched nothing or a tied head, the rank is not below ``min(m, n)`` of any
    candidate, or the base keeps no per-parameter state (:func:`~coap_compile.runtime.selection.shortfall`).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> opt = optimize(model, torch.optim.AdamW, rank=16, lr=1e-3)
        >>> len(opt.projected_parameters())
        1
    """
    names: dict[int, str] = {}
    selection = None  # what the model's selection asked for (model input only)
    if isinstance(model_or_params, nn.Module):
        selection = select(model_or_params, target_modules)
        groups, names = selection.groups, selection.names
        if not groups:
            raise ValueError("the model has no trainable parameters")
    elif target_modules is not None:
        raise TypeError(
            "target_modules selects modules of a model; pass an nn.Module, or use param groups "
            "with 'project': True/False"
        )
    else:
        groups = model_or_params
    opt = CoapOptimizer(groups, base_optim, rank=rank, param_names=names, **kwargs)
    message = shortfall(opt, selection)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    return opt


def explain(optimizer: CoapOptimizer, *, file=None) -> str:
    """Print (to ``file``, default stdout) and return the report of :meth:`CoapOptimizer.explain`."""
    if not isinstance(optimizer, CoapOptimizer):
        raise TypeError(
            f"explain expects an optimizer built by coap_compile.optimize, got {type(optimizer).__name__}"
        )
    text = optimizer.explain()
    print(text, file=file)
    return text
