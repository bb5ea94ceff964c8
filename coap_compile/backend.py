"""The ``torch.compile`` backend ``"coap"``: Inductor plus one post-grad :class:`CoapGraphPass`.

``torch.compile(fn, backend="coap")`` runs ``compile_fx(gm, example_inputs, config_patches=
{"post_grad_custom_pre_pass": CoapGraphPass()})``. The pass sees Inductor's functional post-grad aten
graph. A *single* ``CustomGraphPass`` is installed (torch 2.11 accepts one pass, not a list) and chains
our passes internally, plus any pass the user had configured. Its ``uuid()`` is a hash of this file and
the package version, so Inductor's FX graph cache stays valid and is invalidated when the pass changes.

Passes (in order):

* :func:`scalar_cse`: deduplicate 0-d tensor expressions computed by the same deterministic,
  non-mutating aten op from the same inputs, also when a commutative op got its operands swapped
  (``lr*step`` and ``step*lr``). Optimizer steps recompute many such scalars (bias corrections, ``lr·wd``)
  per parameter; AOT's CSE misses the swapped forms. The table is flushed at every node that may mutate.

Importing this module registers the backend (idempotently). ``import coap_compile`` does not import it: the
package's ``torch_dynamo_backends`` entry point (:mod:`.backend_entry`) resolves ``backend="coap"`` lazily.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

__all__ = ["BACKEND_NAME", "PASS_STATS", "CoapGraphPass", "coap_backend", "scalar_cse"]

BACKEND_NAME = "coap"
#: Counters updated by the passes (``"scalar_cse_removed"``, ``"graphs"``); for tests and debugging.
PASS_STATS: Counter[str] = Counter()

_aten = torch.ops.aten
_COMMUTATIVE = {
    _aten.add.Tensor,
    _aten.mul.Tensor,
    _aten.maximum.default,
    _aten.minimum.default,
    _aten.eq.Tensor,
    _aten.ne.Tensor,
}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("coap-compile")
    except Exception:
        return "unknown"


def _const_key(v: Any) -> Hashable:
    """A hashable key that distinguishes ``0.0``/``-0.0``, ``1``/``1.0``/``True``."""
    if isinstance(v, torch.fx.Node):
        return ("node", v)
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_const_key(a) for a in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, _const_key(a)) for k, a in v.items())))
    return (type(v).__name__, repr(v))


def _is_pure(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
        return False
    return not {torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise} & set(target.tags)


def _may_mutate(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    return not (isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.is_mutable)


def scalar_cse(graph: torch.fx.Graph) -> int:
    """Replace repeated 0-d pure aten expressions by their first occurrence; returns how many were removed."""
    seen: dict[Hashable, torch.fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if _may_mutate(node):
            seen.clear()
            continue
        val = node.meta.get("val")
        if node.op != "call_function" or not _is_pure(node.target):
            continue
        if not isinstance(val, torch.Tensor) or val.ndim != 0:
            continue
        args = [_const_key(a) for a in node.args]
        if node.target in _COMMUTATIVE and len(args) == 2 and not node.kwargs:
            args.sort(key=repr)
        key = (node.target, tuple(args), _const_key(dict(node.kwargs)), val.dtype, str(val.device))
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        graph.erase_node(node)
        removed += 1
    return removed


@functools.lru_cache(1)
def _own_uuid() -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + _version().encode()).hexdigest()


class CoapGraphPass(CustomGraphPass):
    """coap_compile's post-grad pass pipeline (module docstring), run after the passes in ``extra``."""

    def __init__(self, extra: Sequence[Any] = ()):
        self.extra = tuple(extra)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.extra:
            p(graph)
        PASS_STATS["graphs"] += 1
        PASS_STATS["scalar_cse_removed"] += scalar_cse(graph)
        graph.lint()

    def uuid(self) -> Any:
        own = _own_uuid()
        if not self.extra:
            return own
        extra = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.extra]
        return None if None in extra else (own, *extra)  # None: a plain callable disables the FX cache


def coap_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    """Dynamo backend: Inductor's ``compile_fx`` with :class:`CoapGraphPass` as the post-grad pre-pass."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    user = inductor_config.post_grad_custom_pre_pass
    if user is None or isinstance(user, CoapGraphPass):
        extra: tuple[Any, ...] = ()
    else:
        extra = tuple(user) if isinstance(user, (list, tuple)) else (user,)
    return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": CoapGraphPass(extra)})


def _register() -> None:
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if _COMPILER_FNS.get(BACKEND_NAME) is not None:
        return  # already registered (module re-executed, e.g. importlib.reload)
    register_backend(coap_backend, name=BACKEND_NAME)


_register()
