"""Which parameters are projected.

Given a model, the default projects the weights of ``nn.Linear`` modules whose smaller dimension
exceeds the rank (with ``rank_ratio``: whose resolved rank is below the smaller dimension). A Linear
weight that is the same tensor as an ``nn.Embedding`` weight (a tied LM head) stays full-rank, as do
embeddings, norms, biases and every non-2-D tensor. ``target_modules`` (a list of regular expressions
searched in the module name, or a callable ``(name, module) -> bool``) replaces the default rule: the
2-D weights of the matching modules are projected, with the rank clamped to their smaller dimension.

Given parameters or parameter groups, a 2-D parameter is projected by the same size rule; a group's
``"project": True/False`` forces the choice for its parameters (the per-parameter decision:
:func:`coap_compile.runtime.layout.kind_of`).

4-D convolution weights (``C_out×C_in×kh×kw``) are Tucker-projected when the group sets
``conv_rank_ratio`` ``ρ`` and the weight has more than 9216 elements (the official size threshold,
``32·32·3·3``; smaller kernels run the base optimizer), with the official ranks: two modes
``r_i = max(1, C_i // √ρ)``, or mode 0 only ``r_0 = max(1, C_out // ρ)`` when ``kw == 1``
(:mod:`coap_compile.projection.tucker`). ``project=False`` keeps them full-rank; ``project=True`` does
not force a small kernel (a Tucker core of a tiny kernel saves nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["canonical_dims", "groups_from_model"]

TargetModules = Sequence[str] | Callable[[str, nn.Module], bool] | None


def canonical_dims(shape, transposed: bool) -> tuple[int, int]:
    """``(M, N)`` of the projected view ``X`` of an ``m×n`` weight (``X = Gᵀ`` when ``transposed``)."""
    m, n = int(shape[0]), int(shape[1])
    return (n, m) if transposed else (m, n)


def _matcher(target_modules: TargetModules) -> Callable[[str, nn.Module], bool] | None:
    if target_modules is None:
        return None
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        raise TypeError(
            f"target_modules must be a list of regular expressions or a callable, got the string "
            f"{target_modules!r} (wrap it in a list)"
        )
    patterns = [re.compile(p) for p in target_modules]
    return lambda name, _m: any(p.search(name) for p in patterns)


def groups_from_model(model: nn.Module, target_modules: TargetModules) -> tuple[list[dict], dict[int, str]]:
    """Split a model's trainable parameters into a full-rank group and a projected group.

    Returns ``(groups, names)`` where ``names`` maps ``id(param)`` to its qualified name.
    """
    match = _matcher(target_modules)
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, bool] = {}
    for mod_name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.ndim != 2 or id(w) in embedding_weights:
            continue
        if match is not None:
            if match(mod_name, module):
                chosen[id(w)] = True
        elif isinstance(module, nn.Linear):
            chosen[id(w)] = None  # size rule decides
    full, auto, forced, seen = [], [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) not in chosen:
            # 4-D (convolution) weights: the size and conv_rank_ratio rule of layout.kind_of decides
            (auto if p.ndim == 4 else full).append(p)
        else:
            (forced if chosen[id(p)] else auto).append(p)
    groups = [{"params": full, "project": False}]
    if auto:
        groups.append({"params": auto})
    if forced:
        groups.append({"params": forced, "project": True})
    return [g for g in groups if g["params"]], names
