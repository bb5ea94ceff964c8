"""Triton source generation for the projected update: an :class:`~coap_compile.ir.Epilogue` → two kernels.

Canonical orientation (see :mod:`coap_compile.ir`): ``X`` is the M×N gradient view, ``P`` the N×r
projection, the states and ``D`` are M×r fp32, ``W`` the M×N weight view, ``c`` the fp32 vector of hoisted
scalars (read by pointer, so a new step or lr never recompiles).

* **K1** (grid ⌈M/BM⌉·⌈r/BR⌉): ``acc = X[rows] @ P[:, cols]`` (loop over N, fp32 accumulation), then the
  epilogue printed from ``Epilogue.body`` — load the old states, store the new ones in place, store ``D``.
  The state loads/stores are the pluggable storage (:mod:`.variants`): fp32 (plain), bf16 (upcast /
  nearest or stochastic rounding) or int8 (``value[code]·absmax`` / per-block absmax + codes, the helpers
  of :mod:`coap_compile.storage.triton_src` pasted into the module). The printed body is the same for every
  storage; an all-fp32 variant generates exactly the plain epilogue's source and name.
* **K2** (grid ⌈M/BM⌉·⌈N/BN⌉): ``acc = D[rows] @ Pᵀ[:, cols]`` (loop over r; ``Pᵀ`` via swapped strides),
  then ``W ← decay·W + scale·acc`` in fp32, stored in ``W``'s dtype. K2 does not depend on the epilogue.

Traffic model (HBM bytes per call; ``bx``/``bw`` = bytes per element of X/W, ``k`` = number of states):

    K1: reads  M·N·bx (X, once when BR ≥ r) + ⌈M/BM⌉·N·r·4 (P, L2-resident) + Σ bs·M·r (states)
        writes Σ bs·M·r (states) + M·r·4 (D)      (bs = 4 fp32, 2 bf16, 1 + 4/B int8 codes + scales)
    K2: reads  M·N·bw (W) + ⌈N/BN⌉·M·r·4 (D, L2) + ⌈M/BM⌉·N·r·4 (P, L2)
        writes M·N·bw (W)

so ≈ M·N·(bx + 2·bw) + (2k + 2)·M·r·4 bytes in all, against ≥ M·N·(bx + 2·bw + 8) for the unfused
``mm → pointwise → mm → mul_/add_`` chain (the M×N fp32 ``D Pᵀ`` round-trip alone costs 8 bytes/element).

The generated files are plain Python modules (a real ``@triton.jit`` needs ``inspect.getsource``), written
and imported by :mod:`coap_compile.kernels.cache`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from coap_compile.ir import Epilogue
from coap_compile.storage import triton_src

from .templates import DOT, K1, K2, META, RNE
from .variants import FP32, StateMode

__all__ = [
    "K1_MEMBER",
    "K2_MEMBER",
    "CodegenError",
    "K1Source",
    "TritonPrinter",
    "code_map_log2",
    "k1_member_columns",
    "k1_source",
    "k2_source",
]


class CodegenError(ValueError):
    """An epilogue expression uses an operation the Triton printer does not support."""


class TritonPrinter(StrPrinter):
    """Prints epilogue expressions as Triton (fp32) code; raises :class:`CodegenError` on anything else.

    ``x**2 → (x*x)``, ``x**-1 → (1.0/x)``, ``x**-2 → (1.0/(x*x))``, ``x**(1/2) → tl.sqrt(x)``,
    ``x**(-1/2) → (1.0/tl.sqrt(x))``, ``Abs → tl.abs``, ``Max/Min → tl.maximum/tl.minimum`` (NaN
    propagating, like torch), ``sign(x) → tl.where(x > 0, 1, tl.where(x < 0, -1, x))``; numbers are
    printed as float literals with ``repr``. ``names`` maps every free symbol's *name* to its kernel
    variable (symbols are matched by name, as in :func:`~coap_compile.ir.evaluate_epilogue`).
    """

    def __init__(self, names: dict[str, str]):
        super().__init__({"full_prec": True})
        self.names = names

    def doprint(self, expr: sympy.Expr) -> str:  # type: ignore[override]
        return super().doprint(sympy.sympify(expr))

    def emptyPrinter(self, expr: object) -> str:
        raise CodegenError(f"cannot print {type(expr).__name__} {expr!r} as Triton")

    def _print_Basic(self, expr: sympy.Basic) -> str:
        raise CodegenError(f"unsupported operation {type(expr).__name__} in epilogue expression {expr}")

    _print_Function = _print_Basic
    _print_Piecewise = _print_Basic
    _print_Relational = _print_Basic

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        if expr.name not in self.names:
            raise CodegenError(f"symbol {expr} is not defined at this point of the epilogue")
        return self.names[expr.name]

    def _print_float(self, value: float) -> str:
        if not math.isfinite(value):
            raise CodegenError(f"non-finite constant {value} in an epilogue")
        return repr(float(value))

    def _print_Float(self, expr: sympy.Float) -> str:
        return self._print_float(float(expr))

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return self._print_float(float(int(expr)))

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return self._print_float(float(expr.p) / float(expr.q))

    def _print_Infinity(self, expr: sympy.Basic) -> str:
        raise CodegenError(f"non-finite constant {expr} in an epilogue")

    _print_NegativeInfinity = _print_Infinity
    _print_ComplexInfinity = _print_Infinity
    _print_NaN = _print_Infinity

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, e = expr.args
        if not e.is_Number:
            raise CodegenError(f"power with a non-constant exponent {expr}: hoist it into a scalar")
        ev = float(e)
        b = self._print(base)
        if ev in (2.0, -1.0, -2.0) and not base.is_Atom:
            b = f"({b})"
        if ev == 2.0:
            return f"({b}*{b})"
        if ev == 1.0:
            return b
        if ev == -1.0:
            return f"(1.0/{b})"
        if ev == -2.0:
            return f"(1.0/({b}*{b}))"
        if ev == 0.5:
            return f"tl.sqrt({b})"
        if ev == -0.5:
            return f"(1.0/tl.sqrt({b}))"
        raise CodegenError(f"unsupported exponent {e} in {expr} (allowed: 2, -1, -2, 1/2, -1/2)")

    def _print_Abs(self, expr: sympy.Abs) -> str:
        return f"tl.abs({self._print(expr.args[0])})"

    def _print_exp(self, expr: sympy.Basic) -> str:
        return f"tl.exp({self._print(expr.args[0])})"

    def _print_log(self, expr: sympy.Basic) -> str:
        if len(expr.args) != 1:
            raise CodegenError(f"log with a base is not supported: {expr}")
        return f"tl.log({self._print(expr.args[0])})"

    def _minmax(self, fn: str, args: tuple[sympy.Basic, ...]) -> str:
        args = tuple(sorted(args, key=lambda a: bool(a.is_Number)))  # a tensor operand first
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)}, propagate_nan=tl.PropagateNan.ALL)"
        return out

    def _print_Max(self, expr: sympy.Basic) -> str:
        return self._minmax("tl.maximum", expr.args)

    def _print_Min(self, expr: sympy.Basic) -> str:
        return self._minmax("tl.minimum", expr.args)

    def _print_sign(self, expr: sympy.Basic) -> str:
        x = self.parenthesize(expr.args[0], PRECEDENCE["Atom"], strict=True)
        return f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, {x}))"


def _ident(name: str, prefix: str, taken: set[str]) -> str:
    base = prefix + re.sub(r"\W", "_", name)
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


@dataclass(frozen=True)
class K1Source:
    """A generated K1 module: ``name`` (file stem), ``source``, the kernel's state parameter names."""

    name: str
    source: str
    state_params: tuple[str, ...]


def _state_params(i: int, name: str, mode: StateMode) -> list[tuple[str, str]]:
    """K1 parameters (name, comment) of state ``i`` stored in ``mode``; the launcher passes them in this
    order (:func:`coap_compile.kernels.stored.state_args`)."""
    n = _doc_text(name)
    if mode.precision == "fp32":
        return [(f"s{i}_ptr", f"*{n}: M×r fp32, updated in place")]
    rng = [(f"s{i}_rng_ptr", f"*{n}.rng: int64 [seed, counter] of stochastic rounding, read")]
    rng = rng if mode.stochastic else []
    rnd = "stochastic" if mode.stochastic else "nearest"
    if mode.precision == "bf16":
        return [(f"s{i}_ptr", f"*{n}: M×r bf16, updated in place ({rnd} rounding)"), *rng]
    signed = "int8 (signed map)" if mode.signed else "uint8 (unsigned map)"
    return [
        (f"s{i}_q_ptr", f"*{n}.q8: M×r {signed} codes, updated in place ({rnd} rounding)"),
        (f"s{i}_a_ptr", f"*{n}.absmax: fp32 block scales, row-major NR×NC, updated in place"),
        *rng,
        (f"s{i}_tab_ptr", f"*code-map {'levels' if mode.stochastic else 'thresholds'} (storage/codemap.py)"),
        (f"s{i}_val_ptr", "*code-map decode table (256 fp32)"),
        (f"s{i}_nr", "scale grid rows NR"),
        (f"s{i}_nc", "scale grid columns NC"),
        (f"S{i}_BH: tl.constexpr", "block rows (BLOCK_M is a multiple)"),
        (f"S{i}_BW: tl.constexpr", "block columns (BLOCK_R is a multiple)"),
    ]


def _state_load(i: int, var: str, mode: StateMode) -> str:
    if mode.precision == "fp32":
        return f"{var} = tl.load(s{i}_ptr + st_offs, mask=mask, other=0.0)"
    if mode.precision == "bf16":
        return f"{var} = tl.load(s{i}_ptr + st_offs, mask=mask, other=0.0).to(tl.float32)"
    return (
        f"{var} = _st_q8_load(s{i}_q_ptr + st_offs, s{i}_a_ptr, rows, offs_r, s{i}_nc, mask, s{i}_val_ptr, "
        f"S{i}_BH, S{i}_BW, {mode.signed})"
    )


def _state_store(i: int, value: str, mode: StateMode) -> str:
    if mode.precision == "fp32":
        return f"tl.store(s{i}_ptr + st_offs, {value}, mask=mask)"
    if mode.precision == "bf16":
        rng = f"s{i}_rng_ptr" if mode.stochastic else f"s{i}_ptr"  # unused unless stochastic
        return f"_st_bf16_store(s{i}_ptr + st_offs, {value}, mask, {rng}, st_idx, {mode.stochastic})"
    rng = f"s{i}_rng_ptr" if mode.stochastic else f"s{i}_a_ptr"  # unused unless stochastic
    log2n = code_map_log2(mode)
    return (
        f"_st_q8_store({value}, s{i}_q_ptr + st_offs, s{i}_a_ptr, pid_m * BLOCK_M, pid_r * BLOCK_R, "
        f"s{i}_nr, s{i}_nc, mask, s{i}_tab_ptr, {rng}, st_idx, BLOCK_M, BLOCK_R, S{i}_BH, S{i}_BW, "
        f"{mode.signed}, {log2n}, {mode.stochastic})"
    )


def code_map_log2(mode: StateMode) -> int:
    """The binary-search depth of an int8 mode's code map (7 signed, 8 unsigned)."""
    from coap_compile.storage import code_map

    return code_map(mode.signed, mode.style).log2_size


def _epilogue_lines(
    ep: Epilogue, modes: tuple[StateMode, ...] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(scalar loads, body lines, stores) of the K1 epilogue, one statement per line."""
    modes = modes or (FP32,) * len(ep.state_names)
    taken = {"g"}
    names = {"g": "g"}  # symbol name -> kernel variable (rebound when a target reuses a name)
    block = {"g"}  # names whose value is a (BLOCK_M, BLOCK_R) tile rather than a scalar
    for s in ep.state_names:
        names[s] = _ident(s, "s_", taken)
        block.add(s)
    state_vars = [names[s] for s in ep.state_names]
    scalar_names = [str(sym) for sym in ep.scalar_symbols]
    for s in scalar_names:
        names[s] = _ident(s, "c_", taken)
    scalar_vars = dict(names)
    printer = TritonPrinter(names)
    outs = [str(sym) for sym in (*ep.new_states, ep.update)]
    used = set(outs).union(*({str(f) for f in e.free_symbols} for _, e in ep.body))
    loads = [f"{scalar_vars[s]} = tl.load(c_ptr + {i})" for i, s in enumerate(scalar_names) if s in used]
    loads += [_state_load(i, v, mode) for i, (v, mode) in enumerate(zip(state_vars, modes))]
    body = ["g = acc"]
    for target, expr in ep.body:
        code = printer.doprint(expr)
        if not ({str(f) for f in expr.free_symbols} & block):  # scalar-only value: broadcast to the tile
            code = f"zero + {code}"
        names[str(target)] = _ident(str(target), "v_", taken)
        block.add(str(target))
        body.append(f"{names[str(target)]} = {code}")
    values = []
    for sym in outs:
        if sym not in names:
            raise CodegenError(f"epilogue output {sym} is never assigned")
        values.append(names[sym] if sym in block else f"zero + {names[sym]}")
    stores = [_state_store(i, v, mode) for i, (v, mode) in enumerate(zip(values[:-1], modes))]
    stores.append(f"tl.store(d_ptr + d_offs, {values[-1]}, mask=mask)")
    return loads, body, stores


def _doc_text(text: str) -> str:
    """``text`` made safe for a generated docstring/comment (no quotes, backslashes or control chars)."""
    return re.sub(r'["\\\x00-\x1f]', "?", text)


def _key_hash(ep: Epilogue) -> str:
    return hashlib.sha256(ep.key().encode()).hexdigest()[:16]


def _traffic(modes: tuple[StateMode, ...]) -> str:
    k = len(modes)
    if all(m == FP32 for m in modes):
        return f"Traffic: reads M·N·bx + {k}·M·r·4 (+ P from L2), writes {k + 1}·M·r·4 bytes."
    per = {"fp32": 4, "bf16": 2, "int8": 1}
    b = sum(per[m.precision] for m in modes)
    q = sum(m.precision == "int8" for m in modes)
    scales = f" + {q}·4·M·r/B (int8 scales, B elements per block)" if q else ""
    return f"Traffic: reads M·N·bx + {b}·M·r{scales} (+ P, tables from L2), writes {b + 4}·M·r{scales} bytes."


#: Columns of the grouped kernels' int64 member tables (element offsets from member 0's tensors, the
#: member's ``N`` and its own strides); :mod:`.grouped` fills them in this order. K1's table has one
#: offset column per state tensor between ``d_off`` and ``N`` (:func:`k1_member_columns`).
K1_MEMBER = ("x_off", "p_off", "d_off", "N", "stride_xm", "stride_xn", "stride_pn", "stride_pr")
K2_MEMBER = ("w_off", "d_off", "p_off", "N", "stride_wm", "stride_wn", "stride_pn", "stride_pr")


def _member_pointers(i: int, mode: StateMode) -> list[str]:
    """The per-member pointer parameters of state ``i`` (its op tensors, in op order: values [+ rng] or
    codes, absmax [+ rng]); the code tables, grid sizes and block shapes are shared by the members."""
    if mode.precision == "fp32":
        return [f"s{i}_ptr"]
    rng = [f"s{i}_rng_ptr"] if mode.stochastic else []
    if mode.precision == "bf16":
        return [f"s{i}_ptr", *rng]
    return [f"s{i}_q_ptr", f"s{i}_a_ptr", *rng]


def k1_member_columns(modes: tuple[StateMode, ...]) -> tuple[str, ...]:
    """The grouped K1's member-table columns for states stored in ``modes``: ``x_off, p_off, d_off``, one
    ``<pointer>_off`` per state tensor (every member's tensors are separate allocations: its own values,
    scales and ``[seed, counter]``), then ``N`` and the X/P strides."""
    ptrs = [f"{q}_off" for i, m in enumerate(modes) for q in _member_pointers(i, m)]
    return (*K1_MEMBER[:3], *ptrs, *K1_MEMBER[3:])


def _member_code(columns: tuple[str, ...], shifted: dict[str, str], tiles: str | None) -> str:
    """Grouped kernels: member ``program_id(1)``'s row of the table, read before the tile mapping."""
    lines = [
        "# Group member (grid axis 1; Triton's grouped-GEMM pattern): offsets, N and strides from its row.",
        "member = tl.program_id(1).to(tl.int64)",
        f"row_ptr = meta_ptr + member * {len(columns)}",
    ]
    for i, col in enumerate(columns):
        if col in shifted:
            lines += [f"{ptr} += tl.load(row_ptr + {i})" for ptr in shifted[col].split(",") if ptr]
        else:
            lines.append(f"{col} = tl.load(row_ptr + {i})")
    if tiles is not None:  # members differ in N: the grid covers the widest, the others stop early
        lines += [f"if tl.program_id(0) >= {tiles}:", "    return"]
    return "".join(f"    {line}\n" for line in lines) + "\n"


def _nospec(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def k1_source(ep: Epilogue, modes: tuple[StateMode, ...] | None = None, grouped: bool = False) -> K1Source:
    """The K1 module for ``ep``: projection ``X @ P`` plus the printed state/update epilogue, its states
    stored in ``modes`` (default: all fp32, which is exactly the plain kernel). ``grouped``: the grouped
    kernel (any storage): grid axis 1 runs the members of a table ``meta_ptr``
    (:func:`k1_member_columns`), every tile computed exactly as the per-matrix kernel computes it."""
    k = len(ep.state_names)
    modes = tuple(modes) if modes is not None else (FP32,) * k
    if len(modes) != k:
        raise ValueError(f"{len(modes)} storage modes for the states {ep.state_names}")
    plain = all(m == FP32 for m in modes)
    loads, body, stores = _epilogue_lines(ep, modes)
    params = [p for i, (s, m) in enumerate(zip(ep.state_names, modes)) for p in _state_params(i, s, m)]
    member, nospec = "", ("c_ptr",)
    if grouped:
        columns = k1_member_columns(modes)
        params.append(("meta_ptr", f"*int64 K×{len(columns)} member table: {', '.join(columns)}"))
        shifted = {"x_off": "x_ptr", "p_off": "p_ptr", "d_off": "d_ptr"}
        shifted.update({f"{q}_off": q for i, m in enumerate(modes) for q in _member_pointers(i, m)})
        member = _member_code(columns, shifted, None)
        nospec = ("c_ptr", "meta_ptr", *K1_MEMBER[3:])
    doc_body = [_doc_text(f"{t} = {e}") for t, e in ep.body]
    doc_body.append(_doc_text(f"new states: {', '.join(map(str, ep.new_states))}; D = {ep.update}"))
    states = (
        ", ".join(ep.state_names)
        if plain
        else ", ".join(f"{s} [{m.kernel_tag}]" for s, m in zip(ep.state_names, modes))
    )
    head = [] if plain else ["st_idx = rows[:, None] * R + offs_r[None, :]  # logical index (rng stream)"]
    rne = RNE if plain else f"{RNE}\n\n{triton_src.helpers(q8=any(m.precision == 'int8' for m in modes))}"
    src = K1.substitute(
        key=_key_hash(ep),
        state_list=_doc_text(states) or "none",
        doc_body="".join(f"    {line}\n" for line in doc_body),
        traffic=_traffic(modes),
        state_params="".join(f"    {p},  # {c}\n" for p, c in params),
        meta=META,
        member=member,
        nospec=_nospec(nospec),
        dot=DOT,
        rne=rne,
        epilogue="".join(f"    {line}\n" for line in head + loads + body + stores),
    )
    name = f"coap_k1_{_key_hash(ep)}" + ("" if plain else "__" + "__".join(m.kernel_tag for m in modes))
    name += "__grouped" if grouped else ""
    return K1Source(name=name, source=src, state_params=tuple(p.split(":")[0] for p, _ in params))


def k2_source(grouped: bool = False) -> tuple[str, str]:
    """``(name, source)`` of K2: ``W ← decay·W + scale·(D @ Pᵀ)`` (epilogue independent); ``grouped``:
    one launch over the members of a table ``meta_ptr`` (:data:`K2_MEMBER`), members of any ``N``."""
    if not grouped:
        return "coap_k2", K2.substitute(
            meta=META, dot=DOT, rne=RNE, member="", member_params="", nospec=_nospec(("decay_ptr",))
        )
    member = _member_code(
        K2_MEMBER,
        {"w_off": "w_ptr", "d_off": "d_ptr", "p_off": "p_ptr"},
        "tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)",
    )
    params = f"    meta_ptr,  # *int64 K×{len(K2_MEMBER)} member table: {', '.join(K2_MEMBER)}\n"
    nospec = _nospec(("decay_ptr", "meta_ptr", "N", *K2_MEMBER[4:]))
    return "coap_k2_grouped", K2.substitute(
        meta=META, dot=DOT, rne=RNE, member=member, member_params=params, nospec=nospec
    )
