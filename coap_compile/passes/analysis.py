"""Graph analyses on a networkx view of the captured update (no rewriting happens here).

* **Node kinds.** Each ``call_function`` node is one of ``pointwise`` (``torch.Tag.pointwise`` or an
  explicit table), ``reduction`` (norms, means, sums, amax), ``matmul``, ``host_sync``
  (``_local_scalar_dense``: a ``.item()``), ``alias`` (clone/detach/views that do not change values)
  or ``other``.
* **Roles.** From the placeholders' ``meta["role"]`` set by capture: param, grad, each state, step, lr.
* **Grad → update path.** ``descendants(grad) ∩ ancestors(outputs)``: the nodes that must move into
  the projected space.
* **Regions and phases.** Pointwise regions are the weakly connected components of the pointwise
  subgraph; a node's phase is ``max(phase(pred) + crosses(pred))`` where ``crosses`` is 1 for a
  reduction of a non-scalar value (it needs every element before anything downstream can run). Phase
  boundaries are where a fused kernel must split.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx

__all__ = ["GraphFacts", "analyse", "node_kind", "to_networkx"]

aten = torch.ops.aten

_REDUCTIONS = {
    aten.linalg_vector_norm.default,
    aten.mean.dim,
    aten.mean.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.amax.default,
    aten.amin.default,
    aten.norm.ScalarOpt_dim,
}
_MATMUL = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default}
_ALIAS = {
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.lift_fresh_copy.default,
}
_EXTRA_POINTWISE = {aten.copy.default, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther}


def node_kind(node: torch.fx.Node) -> str:
    """Classify one node (see the module docstring)."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if t in _ALIAS:
        return "alias"
    if t in _REDUCTIONS:
        return "reduction"
    if t in _MATMUL:
        return "matmul"
    if t is aten._local_scalar_dense.default:
        return "host_sync"
    if t in _EXTRA_POINTWISE:
        return "pointwise"
    tags = getattr(t, "tags", ())
    if torch.Tag.pointwise in tags:
        return "pointwise"
    return "other"


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """A DiGraph over node names with edges input → user and ``kind``/``shape`` node attributes."""
    g = nx.DiGraph()
    for node in graph.nodes:
        val = node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        g.add_node(node.name, kind=node_kind(node), shape=shape, node=node)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


@dataclass(frozen=True)
class GraphFacts:
    """What :func:`analyse` found. Node names refer to ``graph_module.graph``."""

    roles: dict[str, str]  # placeholder -> "param", "grad", "state:<name>", "step", "lr", "hyper:<name>"
    outputs: tuple[str, ...]  # (param', *states', step') node names
    kinds: dict[str, str]
    grad_path: frozenset[str]
    param_readers: frozenset[str]  # nodes whose value depends on the param
    scalar_nodes: frozenset[str]  # 0-d nodes not depending on grad/param/states (the scalar prologue)
    regions: tuple[frozenset[str], ...]
    phases: dict[str, int]

    @property
    def n_phases(self) -> int:
        return 1 + max(self.phases.values(), default=0)


def _is_scalar(g: nx.DiGraph, name: str) -> bool:
    shape = g.nodes[name]["shape"]
    return shape is not None and len(shape) == 0


def analyse(gm: torch.fx.GraphModule) -> tuple[nx.DiGraph, GraphFacts]:
    graph = gm.graph
    g = to_networkx(graph)
    roles: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            role = node.meta.get("role")
            if role == "state":
                role = f"state:{node.meta['state_name']}"
            elif role == "hyper":
                role = f"hyper:{node.meta['hyper_name']}"
            roles[node.name] = role
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs = tuple(a.name for a in out_node.args[0])
    grad = next(n for n, r in roles.items() if r == "grad")
    param = next(n for n, r in roles.items() if r == "param")
    out_ancestors = set().union(*(nx.ancestors(g, o) | {o} for o in outputs))
    grad_path = frozenset((nx.descendants(g, grad) | {grad}) & out_ancestors)
    param_readers = frozenset(nx.descendants(g, param))
    tensor_inputs = {n for n, r in roles.items() if r in ("grad", "param") or r.startswith("state:")}
    dep_on_tensors = set().union(*(nx.descendants(g, n) for n in tensor_inputs))
    scalar_nodes = frozenset(
        n
        for n, d in g.nodes(data=True)
        if d["kind"] not in ("placeholder", "output") and _is_scalar(g, n) and n not in dep_on_tensors
    )
    pw = g.subgraph(n for n, d in g.nodes(data=True) if d["kind"] in ("pointwise", "alias"))
    regions = tuple(sorted((frozenset(c) for c in nx.weakly_connected_components(pw)), key=lambda c: -len(c)))
    phases: dict[str, int] = {}
    for name in nx.topological_sort(g):
        ph = 0
        for pred in g.predecessors(name):
            crosses = g.nodes[pred]["kind"] in ("reduction", "matmul") and not all(
                _is_scalar(g, q) for q in g.predecessors(pred)
            )
            ph = max(ph, phases[pred] + int(crosses))
        phases[name] = ph
    facts = GraphFacts(
        roles=roles,
        outputs=outputs,
        kinds={n: d["kind"] for n, d in g.nodes(data=True)},
        grad_path=grad_path,
        param_readers=param_readers,
        scalar_nodes=scalar_nodes,
        regions=regions,
        phases=phases,
    )
    return g, facts
