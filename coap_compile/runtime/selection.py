r"""Which parameters are projected.

Given a model, the default projects the weights of ``nn.Linear`` modules whose smaller dimension
exceeds the rank (with ``rank_ratio``: whose resolved rank is below the smaller dimension). A Linear
weight that is the same tensor as an ``nn.Embedding`` weight (a tied LM head) stays full-rank, as do
embeddings, norms, biases and every non-2-D tensor. ``target_modules`` (a list of regular expressions
searched in the module name, or a callable ``(name, module) -> bool``) replaces the default rule: the
2-D parameters held directly by the matching modules (a Linear's ``weight``, an ``nn.MultiheadAttention``'s
``in_proj_weight``) are projected, with the rank clamped to their smaller dimension. A regular expression
also selects the 2-D parameters whose qualified name it is found in (``r"attn\.in_proj_weight$"``), so a
parameter that is not a module's ``weight`` can be named. Embedding weights and heads tied to them stay
full-rank even when matched.

**When less is projected than asked** (:func:`shortfall`), ``optimize()`` warns once, naming each reason
and its fix: ``target_modules`` matched nothing; a matched weight is tied to an embedding; the rank is not
below ``min(m, n)`` of any candidate (``rank=256`` on layers ≤ 256 wide, ``rank_ratio ≤ 1``); the base
keeps no per-parameter state (``SGD`` without momentum: nothing to compress, and a projection would only
confine its update to a subspace). The reasons are the layouts' (:attr:`ParamLayout.reason
<coap_compile.runtime.layout.ParamLayout>`); the Hugging Face integration raises with the same message
when its ``optim_target_modules`` select nothing that is projected (as transformers' GaLore route does).

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
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Selection", "canonical_dims", "groups_from_model", "select", "shortfall"]

TargetModules = Sequence[str] | Callable[[str, nn.Module], bool] | None
TIED = "an embedding weight, or a head tied to one: stays full-rank (remove it from target_modules)"


def canonical_dims(shape, transposed: bool) -> tuple[int, int]:
    """``(M, N)`` of the projected view ``X`` of an ``m×n`` weight (``X = Gᵀ`` when ``transposed``)."""
    m, n = int(shape[0]), int(shape[1])
    return (n, m) if transposed else (m, n)


def _patterns(target_modules: TargetModules) -> list[re.Pattern] | None:
    if target_modules is None or callable(target_modules):
        return None
    if isinstance(target_modules, str):
        raise TypeError(
            f"target_modules must be a list of regular expressions or a callable, got the string "
            f"{target_modules!r} (wrap it in a list)"
        )
    return [re.compile(p) for p in target_modules]


@dataclass
class Selection:
    """The parameter groups of a model and what the selection asked for.

    ``names``: ``id(param) → qualified name``; ``forced``: parameters selected by ``target_modules``;
    ``offered``: parameters the default size rule decides (nn.Linear weights); ``excluded``: matched
    parameters that stay full-rank by rule (name → reason); ``target``: the user's ``target_modules``.
    """

    groups: list[dict]
    names: dict[int, str]
    target: Any = None
    forced: list[Tensor] = field(default_factory=list)
    offered: list[Tensor] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def select(model: nn.Module, target_modules: TargetModules) -> Selection:
    """Split a model's trainable parameters into a full-rank group and projected groups (module docstring)."""
    patterns = _patterns(target_modules)
    match = target_modules if callable(target_modules) else None
    if patterns is not None:
        match = lambda name, _m: any(p.search(name) for p in patterns)  # noqa: E731
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, bool | None] = {}
    excluded: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        own = [(f"{mod_name}.{n}" if mod_name else n, w) for n, w in module.named_parameters(recurse=False)]
        if match is not None:
            hit = match(mod_name, module)
            for qual, w in own:
                if w.ndim == 2 and (hit or (patterns and any(p.search(qual) for p in patterns))):
                    if id(w) in embedding_weights:
                        excluded[qual] = TIED
                    else:
                        chosen[id(w)] = True
        elif isinstance(module, nn.Linear) and id(module.weight) not in embedding_weights:
            chosen[id(module.weight)] = None  # size rule decides
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
    offered = [p for p in auto if p.ndim == 2]
    return Selection([g for g in groups if g["params"]], names, target_modules, forced, offered, excluded)


def groups_from_model(model: nn.Module, target_modules: TargetModules) -> tuple[list[dict], dict[int, str]]:
    """``(groups, names)`` of :func:`select` (``names`` maps ``id(param)`` to its qualified name)."""
    sel = select(model, target_modules)
    return sel.groups, sel.names


def _described_target(target: Any) -> str:
    spec = getattr(target, "spec", target)
    return repr(spec if not callable(spec) else getattr(spec, "__name__", spec))


def shortfall(opt: Any, selection: Selection | None = None) -> str | None:
    """Why ``opt`` projects fewer parameters than asked, or None (module docstring).

    Asked: the parameters ``target_modules`` selected (all of them must be projected), the parameters of
    groups with ``"project": True`` (2-D and 4-D ones), and the candidates of the default size rule (at
    least one must be projected). The reasons come from the layouts (``opt.layout(p).reason``).
    """
    groups_forced = [p for g in opt.param_groups if g.get("project") is True for p in g["params"]]
    forced = [p for p in groups_forced if p.ndim in (2, 4)]
    if selection is not None:
        offered = selection.offered
    else:
        auto = [g["params"] for g in opt.param_groups if g.get("project") is None]
        offered = [p for ps in auto for p in ps if p.ndim == 2]
    projected = {id(p) for p in opt.projected_parameters()}
    reasons: dict[str, list[str]] = {}
    if selection is not None:
        for name, why in selection.excluded.items():
            reasons.setdefault(why, []).append(name)
    missing = [p for p in forced if id(p) not in projected]
    if not projected:
        missing += [p for p in offered if id(p) not in projected]
    for p in missing:
        reasons.setdefault(opt.layout(p).reason, []).append(opt.param_name(p))
    lines = []
    if selection is not None and selection.target is not None and not selection.forced:
        lines.append(
            f"target_modules={_described_target(selection.target)} matched no module or parameter with a "
            "2-D weight that can be projected (regular expressions are searched in module names such as "
            f"{_examples(selection)} and in parameter names)"
        )
    for why, who in reasons.items():
        shown = ", ".join(repr(n) for n in who[:3]) + (f" and {len(who) - 3} more" if len(who) > 3 else "")
        lines.append(f"{shown}: {why}")
    if not lines:
        return None
    asked = len({id(p) for p in forced} | ({id(p) for p in offered} if not projected else set()))
    asked += len(selection.excluded) if selection is not None else 0
    head = f"coap_compile projects {len(projected)} parameter{'s' if len(projected) != 1 else ''}" + (
        f" of the {asked} it was asked to project" if asked else ""
    )
    return head + ":\n  " + "\n  ".join(lines)


def _examples(selection: Selection) -> str:
    names = [n for n in selection.names.values() if n.endswith(".weight")][:2]
    return ", ".join(repr(n.rsplit(".", 1)[0]) for n in names) or "'layers.0.q_proj'"
