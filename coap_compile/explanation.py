"""Human-readable report of a compiled optimizer: captured graph, roles, derived update, memory."""

from __future__ import annotations

from collections import Counter

import sympy

from .capture import LIVE
from .passes.decompose import GRAD, LR, PARAM, K, X, state_symbol
from .runtime.grouped import explain_groups

__all__ = ["effective_ranks", "explain_optimizer"]


def _fmt(e: sympy.Expr) -> str:
    names = {
        X: sympy.Symbol("x̃"),
        K: sympy.Symbol("k"),
        LR: sympy.Symbol("lr"),
        PARAM: sympy.Symbol("W"),
        GRAD: sympy.Symbol("G"),
    }
    e = e.xreplace(names)
    e = e.xreplace({f: sympy.Float(f, 7) for f in e.atoms(sympy.Float)})  # display precision only
    return sympy.sstr(e, full_prec=False).replace("**", "^")


def _value(v) -> str:
    return f"{float(v):g}" if not isinstance(v, (tuple, list)) else repr(v)


def _header(opt) -> list[str]:
    """The settings line, the projected count, why the other weights (2-D and more) stay full-rank, and the
    Tucker weights."""
    projected, g0 = opt.projected_parameters(), opt.param_groups[0]
    out = [
        f"coap_compile: {opt.config.base.__qualname__} -> COAP "
        f"(projection={g0['projection']}, rank={g0['rank']}, rank_ratio={g0['rank_ratio']}, "
        f"update_interval={g0['update_interval']}, reproject_factor={g0['reproject_factor']}, "
        f"scale={g0['scale']})",
        f"projected parameters: {len(projected)} of {len(opt.plan.layouts)}",
    ]
    why: dict[str, list[str]] = {}
    for p, lay in opt.plan.layouts.items():
        if not lay.projected and p.ndim >= 2:  # 1-D tensors (biases, norms) are never projected
            why.setdefault(lay.reason, []).append(opt.param_name(p))
    for reason, names in why.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        out.append(f"  full rank ({len(names)}: {shown}): {reason}")
    tucker = [p for p in projected if opt.layout(p).ranks]
    if tucker:
        out.append(
            f"Tucker-projected 4-D weights: {len(tucker)} (conv_rank_ratio; contractions and the elementwise "
            "middle run as torch ops on every device)"
        )
        out += [f"  {opt.param_name(p)} {tuple(p.shape)}: ranks {opt.layout(p).ranks}" for p in tucker]
    return out


def _program(gi: int, dtype, ndim: int, compiled, group: dict) -> list[str]:
    """One compiled program: the captured graph, its signature and live inputs, the derived update."""
    cap, prog, unit = compiled.captured, compiled.program, compiled.unit
    ops = Counter(
        str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
        for n in cap.graph_module.graph.nodes
        if n.op == "call_function"
    )
    out = [
        f"\n[group {gi}, {dtype}{', Tucker core (4-D)' if ndim == 4 else ''}] captured {cap.optimizer}: "
        f"{sum(ops.values())} aten ops " + ", ".join(f"{k}x{v}" for k, v in sorted(ops.items()))
    ]
    fixed = [(k, v) for k, v in cap.hyperparams if v != LIVE and not (isinstance(v, tuple) and LIVE in v)]
    out.append(
        "  structural (the signature; a change re-compiles once): "
        + (", ".join(f"{k}={v!r}" for k, v in fixed) or "none")
    )
    live = ", ".join(
        f"{h.name}{'' if h.where == h.name else '=' + h.where}={_value(h.read(group))}" for h in cap.hypers
    )
    out.append(
        f"  live inputs (read from param_groups at every step): lr={_value(group['lr'])}, {live}".rstrip(", ")
    )
    facts = unit.facts["graph_facts"]
    out.append("  roles: " + ", ".join(f"{r}={n}" for n, r in facts.roles.items()))
    dec = prog.decomposition
    out.append(f"  projected quantity: X = {_fmt(dec.x_expr)}   (x̃ = X P, M×r)")
    out.append("  derived low-rank update (k = completed steps):")
    for name in prog.state_names:
        kind = prog.state_kinds[name] + (", adapter hint (checked)" if name in dec.hinted else "")
        out.append(f"    {name}' = {_fmt(dec.new_states[name])}    [{kind}]")
    delta = dec.delta.xreplace({state_symbol(n, True): sympy.Symbol(n + "'") for n in prog.state_names})
    out.append(f"    D = {_fmt(delta)}")
    out.append(f"    W <- ({_fmt(dec.decay)}) * W + scale * D P^T")
    if dec.param_stats:
        out.append(f"    0-d statistics of the full weight: {sorted(dec.param_stats)}")
    if prog.epilogue is not None:
        out.append("  kernel epilogue (hoisted scalars per step, then elementwise body):")
        out += [f"    {s} = {_fmt(e)}" for s, e in prog.epilogue.scalars]
        out += [f"    {s} = {_fmt(e)}" for s, e in prog.epilogue.body]
    else:
        out.append(
            f"  {prog.n_phases} phases (reductions on the projected matrix): low-rank middle runs eagerly"
        )
    first = prog.first_moment or "coap_exp_avg (extra low-rank EMA of x̃)"
    out.append(f"  correlation step reads: {first}")
    out.append("  passes: " + ", ".join(f"{n} {t * 1e3:.0f}ms" for n, t, _ in unit.log))
    return out


def effective_ranks(opt) -> list[str]:
    """Projected matrices whose basis has null directions (zero columns of ``P``, dropped because their
    singular value was numerically zero at the last init or refresh, :func:`~.projection.linalg.drop_null`):
    ``name (shape): effective rank e of r``. Empty when every basis is full (or before the first step)."""
    out = []
    for p in opt.projected_parameters():
        lay, state = opt.layout(p), opt.state.get(p, {})
        if lay.ranks or "proj" not in state:  # Tucker factors, or not stepped yet
            continue
        basis = lay.policy.basis(state)
        live = int((basis.abs().amax(0) > 0).sum())
        if live < basis.shape[1]:
            out.append(f"  {opt.param_name(p)} {tuple(p.shape)}: effective rank {live} of {basis.shape[1]}")
    return out


def explain_optimizer(opt) -> str:
    """The report of :meth:`~coap_compile.CoapOptimizer.explain`, from the optimizer's public interface:
    header, one section per compiled program, re-compilations, the grouped update, the memory plan."""
    out = _header(opt)
    programs = sorted(opt.plan.programs().items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2]))
    for (gi, dtype, ndim), compiled in programs:
        out += _program(gi, dtype, ndim, compiled, opt.param_groups[gi])
    low = effective_ranks(opt)
    if low:
        out.append("\neffective rank below r (null directions get no update until the next SVD refresh):")
        out += low
    if opt.events:
        out.append("\nre-compilations (structural hyperparameters changed):")
        out += [f"  {e}" for e in opt.events]
    grouped = opt.config.options.grouped
    out.append("\n" + explain_groups(opt.plan.matrix_groups, opt.plan.alone(grouped), grouped))
    out.append("\nmemory plan (optimizer-state bytes):")
    out.append(str(opt.memory_plan()))
    return "\n".join(out)
