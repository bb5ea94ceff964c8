"""Translation between FX aten graphs and sympy expressions.

:func:`translate` maps every pointwise node of the graph to a sympy expression over *leaf symbols*
(placeholders, chosen leaf nodes such as the projection point, and opaque nodes). Nodes that have no
algebraic meaning here (reductions, matmuls, unknown ops) become opaque symbols ``o_<node name>`` and are
later re-emitted as copies of the original FX node. :class:`Emitter` goes the other way: it writes a
sympy expression into an FX graph with aten ops, so the derived (simplified, hoisted) form is what runs.

Table (``a, b, c`` operands, ``α``/``v`` the alpha/value keyword):

==========================  ================================
``add(a, b, α)``            ``a + α b``
``sub(a, b, α)``            ``a − α b``;  ``rsub(a, b, α) = b − α a``
``mul / div``               ``a b``, ``a / b``
``lerp(a, b, w)``           ``a + w (b − a)``
``addcmul(a, b, c, v)``     ``a + v b c``;  ``addcdiv(a, b, c, v) = a + v b / c``
``sqrt / rsqrt / recip``    ``a^{1/2}``, ``a^{-1/2}``, ``a^{-1}``
``pow``                     ``a^b``
``maximum / clamp``         ``Max``, ``Min``
``where(cond, a, b)``       ``Piecewise((a, cond), (b, True))``
``abs / sign / exp / log``  the sympy functions
==========================  ================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import sympy
import torch
import torch.fx

__all__ = ["Emitter", "opaque_symbol", "translate"]

aten = torch.ops.aten
Expr = sympy.Expr


def opaque_symbol(node: torch.fx.Node) -> sympy.Symbol:
    return sympy.Symbol(f"o_{node.name}")


def _kw(node: torch.fx.Node, name: str, pos: int, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _clamp(a, lo, hi):
    if lo is not None:
        a = sympy.Max(a, lo)
    if hi is not None:
        a = sympy.Min(a, hi)
    return a


_REL = {
    "eq": sympy.Eq,
    "ne": sympy.Ne,
    "gt": sympy.StrictGreaterThan,
    "ge": sympy.GreaterThan,
    "lt": sympy.StrictLessThan,
    "le": sympy.LessThan,
}


#: ops that pass their first operand through unchanged (copies, aliases, dtype casts).
_IDENTITY_OPS = (
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.lift_fresh_copy.default,
)

#: constant fills (:func:`_fill_rule`).
_FILLS = ("zeros_like", "zeros", "ones_like", "ones", "full", "full_like")

#: ``op name -> rule(a, α, v)``: the pointwise ops of the module table, ``a(i)`` the translated operand
#: ``i``, ``α``/``v`` the node's ``alpha``/``value`` (1 when absent).
_POINTWISE: dict[str, Callable[[Callable[[int], Expr], object, object], Expr]] = {
    "add": lambda a, alpha, value: a(0) + alpha * a(1),
    "sub": lambda a, alpha, value: a(0) - alpha * a(1),
    "rsub": lambda a, alpha, value: a(1) - alpha * a(0),
    "mul": lambda a, alpha, value: a(0) * a(1),
    "neg": lambda a, alpha, value: -a(0),
    "reciprocal": lambda a, alpha, value: 1 / a(0),
    "sqrt": lambda a, alpha, value: sympy.sqrt(a(0)),
    "rsqrt": lambda a, alpha, value: 1 / sympy.sqrt(a(0)),
    "pow": lambda a, alpha, value: a(0) ** a(1),
    "lerp": lambda a, alpha, value: a(0) + a(2) * (a(1) - a(0)),
    "addcmul": lambda a, alpha, value: a(0) + value * a(1) * a(2),
    "addcdiv": lambda a, alpha, value: a(0) + value * a(1) / a(2),
    "abs": lambda a, alpha, value: sympy.Abs(a(0)),
    "sign": lambda a, alpha, value: sympy.sign(a(0)),
    "exp": lambda a, alpha, value: sympy.exp(a(0)),
    "log": lambda a, alpha, value: sympy.log(a(0)),
    "maximum": lambda a, alpha, value: sympy.Max(a(0), a(1)),
    "minimum": lambda a, alpha, value: sympy.Min(a(0), a(1)),
    "square": lambda a, alpha, value: a(0) ** 2,
    "where": lambda a, alpha, value: sympy.Piecewise((a(1), a(0)), (a(2), True)),
    "fma": lambda a, alpha, value: a(0) * a(1) + a(2),
    "scalar_tensor": lambda a, alpha, value: a(0),
}


def _rule(node: torch.fx.Node, a: Callable[[int], Expr]) -> Expr | None:
    """The sympy meaning of one node given its translated operands ``a(i)``; None if opaque.

    In this order: identities (:data:`_IDENTITY_OPS`; ``copy(dst, src) = src``), true division
    ``a / b`` (a ``rounding_mode`` makes it opaque), clamps (:func:`_clamp_rule`), comparisons
    (:data:`_REL`), constant fills (:func:`_fill_rule`), then the pointwise table :data:`_POINTWISE`."""
    t = node.target
    if t in _IDENTITY_OPS:
        return a(0)
    if t is aten.copy.default:
        return a(1)
    op = getattr(getattr(t, "overloadpacket", None), "__name__", "")
    if op == "div" and _kw(node, "rounding_mode", 2, None) is None:
        return a(0) / a(1)
    if op in ("clamp", "clamp_min", "clamp_max"):
        return _clamp_rule(node, op, a)
    if op in _REL:
        return _REL[op](a(0), a(1))
    if op in _FILLS:
        return _fill_rule(node, op)
    rule = _POINTWISE.get(op)
    return rule(a, _kw(node, "alpha", 2, 1), _kw(node, "value", 3, 1)) if rule is not None else None


def _clamp_rule(node: torch.fx.Node, op: str, a: Callable[[int], Expr]) -> Expr:
    """``clamp(a, lo, hi) = Min(Max(a, lo), hi)``, ``clamp_min(a, lo) = Max(a, lo)``, ``clamp_max(a, hi) =
    Min(a, hi)``; a bound is a number or a tensor operand (then its translation), or absent."""
    lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
    hi = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
    if op == "clamp_max":
        lo, hi = None, lo

    def conv(v):
        if v is None:
            return None
        if isinstance(v, torch.fx.Node):
            return a(1 if v is node.args[1] else 2)
        return sympy.sympify(v)

    return _clamp(a(0), conv(lo), conv(hi))


def _fill_rule(node: torch.fx.Node, op: str) -> Expr:
    """The constant of a fill: ``zeros*`` → 0, ``ones*`` → 1, ``full*(…, v)`` → ``v``."""
    if op in ("zeros_like", "zeros"):
        return sympy.Integer(0)
    if op in ("ones_like", "ones"):
        return sympy.Integer(1)
    return sympy.sympify(node.args[1])


def translate(
    graph: torch.fx.Graph,
    leaves: Mapping[str, sympy.Symbol],
    opaque_kinds: Callable[[torch.fx.Node], bool],
) -> dict[str, Expr]:
    """Sympy expression for every node (by name). ``leaves`` pins nodes to symbols; nodes for which
    ``opaque_kinds(node)`` is true, or whose op has no rule, become :func:`opaque_symbol`."""
    exprs: dict[str, Expr] = {}

    def value(arg) -> Expr:
        if isinstance(arg, torch.fx.Node):
            return exprs[arg.name]
        if isinstance(arg, bool):
            return sympy.true if arg else sympy.false
        if isinstance(arg, (int, float)):
            return sympy.Integer(arg) if isinstance(arg, int) else sympy.Float(arg, 17)
        raise TypeError(f"unsupported argument {arg!r}")

    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.name in leaves:
            exprs[node.name] = leaves[node.name]
            continue
        if node.op != "call_function" or opaque_kinds(node):
            exprs[node.name] = opaque_symbol(node)
            continue
        try:
            e = _rule(node, lambda i, node=node: value(node.args[i]))
        except (TypeError, IndexError, KeyError):
            e = None
        exprs[node.name] = opaque_symbol(node) if e is None else e
    return exprs


class Emitter:
    """Writes sympy expressions into an FX graph as aten ops (memoized per sub-expression).

    ``env`` maps symbols to FX nodes already in the graph. Numbers stay Python floats where an aten op
    accepts a scalar operand; a fully numeric expression is returned as a float.
    """

    def __init__(self, graph: torch.fx.Graph, env: Mapping[sympy.Symbol, torch.fx.Node]):
        self.graph = graph
        self.env = dict(env)
        self.memo: dict[Expr, object] = {}

    def call(self, target, *args):
        return self.graph.call_function(target, args)

    def __call__(self, expr: Expr):
        expr = sympy.sympify(expr)
        if expr in self.memo:
            return self.memo[expr]
        out = self._emit(expr)
        self.memo[expr] = out
        return out

    def _emit(self, e: Expr):
        if e.is_Number:
            return float(e)
        if e.is_Symbol:
            if e not in self.env:
                raise KeyError(f"no graph value bound to symbol {e}")
            return self.env[e]
        if isinstance(e, sympy.Add):
            return self._emit_add(e)
        if isinstance(e, sympy.Mul):
            return self._emit_mul(e)
        if isinstance(e, sympy.Pow):
            return self._emit_pow(e)
        unary = {
            sympy.Abs: aten.abs.default,
            sympy.sign: aten.sign.default,
            sympy.exp: aten.exp.default,
            sympy.log: aten.log.default,
        }
        for cls, target in unary.items():
            if isinstance(e, cls):
                return self.call(target, self(e.args[0]))
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self._emit_minmax(e)
        if isinstance(e, sympy.Piecewise):
            (a, cond), (b, _) = e.args
            return self.call(
                aten.where.self, self(cond), self.as_tensor_node(self(a)), self.as_tensor_node(self(b))
            )
        rel = {
            sympy.Eq: aten.eq,
            sympy.Ne: aten.ne,
            sympy.StrictGreaterThan: aten.gt,
            sympy.GreaterThan: aten.ge,
            sympy.StrictLessThan: aten.lt,
            sympy.LessThan: aten.le,
        }
        for cls, packet in rel.items():
            if isinstance(e, cls):
                lhs, rhs = self(e.lhs), self(e.rhs)
                if not isinstance(lhs, torch.fx.Node):
                    raise ValueError(f"cannot emit a relation with a constant left side: {e}")
                return self.call(packet.Tensor if isinstance(rhs, torch.fx.Node) else packet.Scalar, lhs, rhs)
        raise ValueError(f"cannot emit {type(e).__name__}: {e}")

    def as_tensor_node(self, v):
        """``v`` as a graph node: a number becomes a 0-d ``scalar_tensor``."""
        if isinstance(v, torch.fx.Node):
            return v
        return self.call(aten.scalar_tensor.default, float(v))

    def _binary(self, packet, a, b):
        if isinstance(a, torch.fx.Node):
            return self.call(packet.Tensor, a, b)
        if isinstance(b, torch.fx.Node):
            if packet is aten.add or packet is aten.mul:
                return self.call(packet.Tensor, b, a)
            if packet is aten.sub:
                return self.call(aten.rsub.Scalar, b, a)
            if packet is aten.div:
                return self.call(aten.mul.Tensor, self.call(aten.reciprocal.default, b), a)
        return {aten.add: a + b, aten.sub: a - b, aten.mul: a * b, aten.div: a / b}[packet]

    def _emit_add(self, e: sympy.Add):
        pos, neg = [], []
        for term in e.args:
            coeff, _ = term.as_coeff_Mul()
            (neg if coeff.is_negative else pos).append(term if not coeff.is_negative else -term)
        acc = None
        for t in pos:
            acc = self(t) if acc is None else self._binary(aten.add, acc, self(t))
        for t in neg:
            acc = (
                self._binary(aten.mul, self(t), -1.0) if acc is None else self._binary(aten.sub, acc, self(t))
            )
        return acc

    def _emit_mul(self, e: sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        num, den = [], []
        for f in sympy.Mul.make_args(rest):
            if isinstance(f, sympy.Pow) and f.exp.is_Number and f.exp.is_negative:
                den.append(f.base ** (-f.exp))
            else:
                num.append(f)
        acc = None
        for f in num:
            acc = self(f) if acc is None else self._binary(aten.mul, acc, self(f))
        if den:
            d = None
            for f in den:
                d = self(f) if d is None else self._binary(aten.mul, d, self(f))
            acc = self.call(aten.reciprocal.default, d) if acc is None else self._binary(aten.div, acc, d)
        if coeff != 1:
            acc = self._binary(aten.mul, acc, float(coeff)) if acc is not None else float(coeff)
        return acc

    def _emit_pow(self, e: sympy.Pow):
        base, exp = e.base, e.exp
        if exp == 2:
            b = self(base)
            return self._binary(aten.mul, b, b)
        if exp == sympy.Rational(1, 2):
            return self.call(aten.sqrt.default, self(base))
        if exp == -sympy.Rational(1, 2):
            return self.call(aten.rsqrt.default, self(base))
        if exp == -1:
            return self.call(aten.reciprocal.default, self(base))
        b, x = self(base), self(exp)
        if isinstance(b, torch.fx.Node):
            return self.call(
                aten.pow.Tensor_Tensor if isinstance(x, torch.fx.Node) else aten.pow.Tensor_Scalar, b, x
            )
        if isinstance(x, torch.fx.Node):
            return self.call(aten.pow.Scalar, b, x)
        return b**x

    def _emit_minmax(self, e):
        packet = aten.maximum if isinstance(e, sympy.Max) else aten.minimum
        clamp = aten.clamp_min if isinstance(e, sympy.Max) else aten.clamp_max
        vals = [self(a) for a in e.args]
        nodes = [v for v in vals if isinstance(v, torch.fx.Node)]
        consts = [v for v in vals if not isinstance(v, torch.fx.Node)]
        acc = nodes[0]
        for v in nodes[1:]:
            acc = self.call(packet.default, acc, v)
        for c in consts:
            acc = self.call(clamp.default, acc, c)
        return acc
