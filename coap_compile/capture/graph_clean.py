"""Turn a freshly functionalized trace into a purely functional aten graph (in place).

Input: the ``make_fx(functionalize(f))`` graph of an update wrapper that returns its new values, so
its tail ``copy_(placeholder, new)`` write-backs are redundant. Steps:

* drop ``profiler`` ``record_function`` enter/exit nodes (side-effecting, but no math);
* drop the ``copy_`` write-backs, checking that only ``param``/``state``/``step`` inputs were mutated;
* inline host scalars: ``s = _local_scalar_dense(t)`` (``.item()`` of a 0-d tensor ``t``) is what a
  tensor ``lr`` becomes when torch passes it as a Python scalar argument. Every use is rewritten to
  tensor arithmetic on ``t``::

      add/sub(a, b, alpha=s)        →  add/sub(a, b·t)
      addcmul(a, b, c, value=s)     →  a + (b·c)·t
      addcdiv(a, b, c, value=s)     →  a + (b/c)·t
      mul/div/add/sub(a, s)         →  mul/div/add/sub.Tensor(a, t)

  any other use raises :class:`UnsupportedOptimizerError` naming the node;
* replace ``copy(a, b)`` by ``b`` when both have the same shape and dtype (functionalized ``a.copy_(b)``);
* drop casts of 0-d values computed from ``step``/``lr``/hyperparameters only (torch moves a tensor
  β₁ to the parameter's dtype): the scalar prologue stays in float64, as torch's eager arithmetic on
  Python floats does, and as the derived form computes it;
* verify: only non-mutating aten ops (and ``getitem``) remain.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch.fx import Graph, GraphModule, Node

from coap_compile.errors import UnsupportedOptimizerError

__all__ = ["clean_functional_graph"]

aten = torch.ops.aten

_MUTABLE_ROLES = frozenset({"param", "state", "step"})
_SCALAR_ROLES = frozenset({"step", "lr", "hyper"})
_ALPHA_OPS = frozenset({aten.add.Tensor, aten.sub.Tensor})
_VALUE_OPS = {aten.addcmul.default: aten.mul.Tensor, aten.addcdiv.default: aten.div.Tensor}
_BINARY = {
    aten.mul.Tensor: aten.mul.Tensor,
    aten.mul.Scalar: aten.mul.Tensor,
    aten.div.Tensor: aten.div.Tensor,
    aten.div.Scalar: aten.div.Tensor,
    aten.add.Tensor: aten.add.Tensor,
    aten.add.Scalar: aten.add.Tensor,
    aten.sub.Tensor: aten.sub.Tensor,
    aten.sub.Scalar: aten.sub.Tensor,
}


def _is_op(node: Node, namespace: str) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == namespace


def _drop_profiler(graph: Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if _is_op(node, "profiler") and not node.users:
            graph.erase_node(node)


def _drop_writebacks(graph: Graph, roles: Sequence[str], name: str) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.copy_.default and node.args[0] in placeholders:
            role = roles[placeholders.index(node.args[0])]
            if role not in _MUTABLE_ROLES:
                raise UnsupportedOptimizerError(
                    name, f"the update modifies its {role} input in place", node=node.name
                )
            if node.users:
                raise UnsupportedOptimizerError(name, "a write-back result is used", node=node.name)
            graph.erase_node(node)


def _inline_scalar_use(graph: Graph, user: Node, s: Node, t: Node, name: str) -> None:
    """Rewrite one use of the host scalar ``s`` in ``user`` into tensor arithmetic on ``t``."""
    target, args, kwargs = user.target, user.args, dict(user.kwargs)
    with graph.inserting_before(user):
        if target in _ALPHA_OPS and kwargs.get("alpha") is s and s not in args:
            kwargs.pop("alpha")
            user.args = (args[0], graph.call_function(aten.mul.Tensor, (args[1], t)))
            user.kwargs = kwargs
            return
        if target in _VALUE_OPS and kwargs.get("value") is s and s not in args:
            inner = graph.call_function(_VALUE_OPS[target], (args[1], args[2]))
            new = graph.call_function(
                aten.add.Tensor, (args[0], graph.call_function(aten.mul.Tensor, (inner, t)))
            )
            user.replace_all_uses_with(new)
            graph.erase_node(user)
            return
        if (
            target in _BINARY
            and len(args) == 2
            and args[1] is s
            and args[0] is not s
            and "alpha" not in kwargs
        ):
            user.target = _BINARY[target]
            user.args = (args[0], t)
            return
    raise UnsupportedOptimizerError(
        name,
        f"a host scalar (`.item()` of a tensor) is used by {target}; only alpha/value arguments of "
        "add/sub/addcmul/addcdiv and scalar operands of mul/div/add/sub can be turned back into tensors",
        node=user.name,
    )


def _inline_host_scalars(graph: Graph, name: str) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._local_scalar_dense.default:
            t = node.args[0]
            if not isinstance(t, Node) or t.meta.get("val") is None or t.meta["val"].dim() != 0:
                raise UnsupportedOptimizerError(name, "`.item()` of a non-0-d tensor", node=node.name)
            for user in list(node.users):
                val = user.meta.get("val")
                t_use = t
                if isinstance(val, torch.Tensor) and val.dim() == 0 and val.dtype != t.meta["val"].dtype:
                    # all-0-d arithmetic would promote to t's dtype; a host scalar never does
                    with graph.inserting_before(user):
                        t_use = graph.call_function(aten._to_copy.default, (t,), {"dtype": val.dtype})
                _inline_scalar_use(graph, user, node, t_use, name)
            graph.erase_node(node)


def _drop_identity_copies(graph: Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.copy.default and not node.kwargs:
            a, b = (x.meta.get("val") if isinstance(x, Node) else None for x in node.args)
            if a is None or b is None:
                continue
            if (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device):
                node.replace_all_uses_with(node.args[1])
                graph.erase_node(node)


def _drop_scalar_casts(graph: Graph, roles: Sequence[str]) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    scalar_only = {p for p, r in zip(placeholders, roles) if r in _SCALAR_ROLES}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        ins = node.all_input_nodes
        val = node.meta.get("val")
        if ins and all(i in scalar_only for i in ins) and isinstance(val, torch.Tensor) and val.dim() == 0:
            scalar_only.add(node)
            if node.target is aten._to_copy.default and set(node.kwargs) <= {
                "dtype",
                "device",
                "non_blocking",
            }:
                node.replace_all_uses_with(node.args[0])
    graph.eliminate_dead_code()


def _verify(graph: Graph, name: str) -> None:
    for node in graph.nodes:
        if node.op in ("call_module", "call_method", "get_attr"):
            raise UnsupportedOptimizerError(
                name, f"unexpected {node.op} in the traced update", node=node.name
            )
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            raise UnsupportedOptimizerError(
                name, f"non-aten operation {target} (Python arithmetic on host scalars?)", node=node.name
            )
        if target._schema.is_mutable:
            raise UnsupportedOptimizerError(
                name, f"in-place op {target} remains after functionalization", node=node.name
            )


def clean_functional_graph(gm: GraphModule, roles: Sequence[str], name: str) -> None:
    """Apply the steps of the module docstring to ``gm`` in place (``roles``: one per placeholder)."""
    graph = gm.graph
    _drop_profiler(graph)
    _drop_writebacks(graph, roles, name)
    _inline_host_scalars(graph, name)
    _drop_identity_copies(graph)
    _drop_scalar_casts(graph, roles)
    graph.eliminate_dead_code()
    _verify(graph, name)
    graph.lint()
    gm.recompile()
