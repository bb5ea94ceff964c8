"""One frozen record per parameter: everything the runtime derives from ``(parameter, group, settings)``.

:func:`build_layout` is the only place that decides how a parameter is optimized. Its result, a
:class:`ParamLayout`, is immutable; the optimizer rebuilds every layout when ``param_groups`` change (a
COAP key, the group's parameters, or a structural hyperparameter that selects another compiled
program, :mod:`.plan`) and never patches one. Step, refreshes, checkpoint validation, the memory plan,
``explain()``, in-backward accumulation and sharding all read layouts (``opt.layout(p)``).

**Kinds** (:class:`Kind`)::

    MATRIX   a projected 2-D weight: P (N×r), M×r states          (X = G, or Gᵀ on the canonical side)
    TUCKER   a Tucker-projected 4-D weight: factors, core states   (conv_rank_ratio, large kernels)
    TORCH    full rank, torch's own optimizer (its exact arithmetic, its state layout)
    DERIVED  full rank, the derived (or captured) update with a storage precision (state_precision set)

Selection (which parameters are projected, the ranks, the side) is :func:`kind_of`; the rules are those
of :mod:`.selection` (size rule, ``project`` forcing, Tucker thresholds) and :mod:`.precision` (which
storage each state gets). One more rule needs the compiled program, so :func:`build_layout` applies it: a
base whose update keeps **no per-parameter state** under the group's hyperparameters (``SGD`` without
momentum) is not projected, even with ``project=True``: projecting it would add ``P`` and the policy's
EMA (0 → 262,148 B for a 256×256 weight at rank 128, measured) and confine its update to a rank-``r``
subspace, for nothing saved. Such a layout keeps that stateless program, so a later structural edit
(momentum becoming nonzero) selects another program and rebuilds the plan, which then projects it. A
full-rank layout says why in :attr:`ParamLayout.reason` (``explain()`` and :func:`.selection.shortfall`
print it).

``seed`` is the parameter's position over all groups: it seeds the
stochastic-rounding stream of its states.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..capture import CapturedUpdate, capture, init_states
from ..capture.trace import adapter_for
from ..compiler import CompiledBase, compile_base
from ..distributed import fsdp
from ..distributed.reductions import RowReductionError, RowReductions, plan_row_reductions
from ..errors import UnsupportedOptimizerError
from ..projection import LOCAL, ROWS, Comm, ProjectionPolicy, resolve_rank
from ..projection.tucker import core_shape, is_tucker_candidate, tucker_ranks
from .inits import tucker_inits
from .precision import Precision, StateSpec, resolve_precision, row_states, state_spec
from .selection import canonical_dims
from .settings import EMA_KEY, CoapSettings

__all__ = [
    "Kind", "ParamLayout", "StateSpec", "build_layout", "check_fsdp", "full_program", "kind_of",
]  # fmt: skip


class Kind(enum.Enum):
    """How a parameter is optimized (module docstring)."""

    MATRIX = "projected matrix"
    TUCKER = "Tucker-projected 4-D weight"
    TORCH = "full rank, torch's own optimizer"
    DERIVED = "full rank, the derived update with a storage precision"


@dataclass(frozen=True, eq=False)
class ParamLayout:
    """Everything derived for one parameter (module docstring). ``rank``/``ranks``/``transposed``/``policy``
    are meaningful for the projected kinds; ``program`` is the compiled base update for MATRIX/TUCKER
    (the group's current signature) and the full-rank update for DERIVED; ``states`` is None for TORCH.
    ``kernels`` is ``(backend, input_precision)`` when the generated kernels update this parameter.
    ``reason`` says why a full-rank (TORCH/DERIVED) parameter is not projected, with the fix."""

    name: str
    group: int
    kind: Kind
    settings: CoapSettings
    precision: Precision
    rank: int = 0
    ranks: tuple[int, ...] = ()
    transposed: bool = False
    rows_side: bool = False
    policy: Any = None
    program: Any = None
    states: StateSpec | None = None
    shard: fsdp.ShardSpec | None = None
    kernels: tuple[str, str] | None = None
    lowering: str = "eager"  # "inductor": the fused CPU lowering of the elementwise part (lowering.inductor)
    #: an FSDP2 weight whose derived update reduces over its rows (Adafactor): those reductions, all-reduced
    #: over the shard group (:mod:`coap_compile.distributed.reductions`); None when the update is local.
    row_reductions: Any = None
    seed: int = 0
    ndim: int = 2  # of the program's states: 2 for matrices, 4 for Tucker cores, the weight's for full rank
    reason: str = ""

    @property
    def projected(self) -> bool:
        return self.kind in (Kind.MATRIX, Kind.TUCKER)

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype the update computes in (float64 for float64 weights, float32 otherwise)."""
        return self.precision.work_dtype

    def comm(self, log: Any = None) -> Comm:
        """What the policy's refreshes run over: the FSDP2 shard group (collectives recorded in ``log``,
        a :class:`~coap_compile.distributed.CommLog`), the rows side's aligned convention, or one process."""
        if self.shard is not None:
            return fsdp.ShardComm(self.shard, log)
        return ROWS if self.rows_side else LOCAL

    @property
    def where(self) -> str:
        return f"parameter {self.name!r} (param group {self.group})"

    def collective_settings(self) -> tuple[tuple[str, Any], ...]:
        """What decides this parameter's collectives (and its replicated ``P``) under FSDP2, as
        ``(setting, value)`` pairs, checked equal across a shard group
        (:mod:`~coap_compile.distributed.agreement`)."""
        s, prec = self.settings, self.precision
        out = [("state_precision", prec.states), ("projection_precision", str(prec.proj_dtype)),
               ("quant_block_size", prec.block), ("quant_blocks", prec.blocks), ("kind", self.kind.name),
               ("rows", self.shard.rows if self.shard is not None else None)]  # fmt: skip
        if self.projected:
            side = "rows" if self.rows_side else ("columns" if self.transposed else "canonical")
            out += [("rank", self.rank), ("ranks", self.ranks), ("side", side),
                    ("update_interval", s.update_interval), ("reproject_factor", s.reproject_factor),
                    ("projection", getattr(self.policy, "name", None)),
                    ("correlation", s.correlation),
                    ("projection_sharding", s.projection_sharding)]  # fmt: skip
        return tuple(out)


def kind_of(p: Tensor, settings: CoapSettings) -> tuple[Kind, int, tuple[int, ...], bool, bool, str]:
    """``(kind, rank, ranks, transposed, rows_side, reason)`` by the selection rules (:mod:`.selection`),
    before the storage decides between TORCH and DERIVED (returned as TORCH here, with ``reason``: why the
    parameter is not projected, and the fix)."""
    if settings.project is False:
        why = (
            "project=False in its param group (optimize(model) puts embeddings, heads tied to them and "
            "weights outside nn.Linear or target_modules there)"
        )
        return Kind.TORCH, 0, (), False, False, why
    ratio = settings.conv_rank_ratio
    if p.ndim == 4 and ratio is not None and is_tucker_candidate(p.shape):
        return Kind.TUCKER, 0, tucker_ranks(p.shape, ratio), False, False, ""
    if p.ndim != 2:
        why = (
            f"a {p.ndim}-D tensor (2-D weights are projected, and 4-D convolution weights with "
            "conv_rank_ratio above the Tucker size threshold)"
        )
        return Kind.TORCH, 0, (), False, False, why
    r = resolve_rank(p.shape, settings.rank, settings.rank_ratio)
    if settings.project is None and r >= min(p.shape):
        return Kind.TORCH, 0, (), False, False, _size_reason(p, settings, r)
    if settings.projection_side == "rows" or fsdp.is_dtensor(p):
        return Kind.MATRIX, r, (), False, True, ""
    return Kind.MATRIX, r, (), p.shape[0] < p.shape[1], False, ""


def _size_reason(p: Tensor, settings: CoapSettings, r: int) -> str:
    small = min(p.shape)
    if settings.rank_ratio is not None:
        return (
            f"rank_ratio={settings.rank_ratio} gives rank {r}, not below min(m, n) = {small} (the rank is "
            "min(m, n) / rank_ratio: use rank_ratio > 1)"
        )
    return f"rank={settings.rank} is not below min(m, n) = {small} (use a rank below {small}, or rank_ratio)"


def _stateless_reason(base: type, hyper: dict) -> str:
    knobs = ", ".join(f"{k}={hyper[k]}" for k in ("momentum",) if k in hyper)
    return (
        f"{base.__name__} keeps no per-parameter state{f' with {knobs}' if knobs else ''}: there is nothing "
        "to compress, and a projection would confine its update to a subspace (it runs torch's own step; "
        "a base with state, e.g. SGD with momentum > 0, is projected)"
    )


def full_program(base: type, hyper: dict, dtype: torch.dtype, ndim: int) -> CompiledBase | CapturedUpdate:
    """A full-rank parameter's update: the derived program at its own shape, else its captured graph
    (a base the compiler cannot rewrite, e.g. one whose state reads the weight)."""
    try:
        return compile_base(base, hyper, dtype, ndim)
    except UnsupportedOptimizerError:
        return capture(base, hyper, dtype=dtype, ndim=ndim)


def check_fsdp(lay: ParamLayout, base: type) -> None:
    """Refuse (ValueError naming the parameter) a layout that could not run FSDP2-sharded: the checks
    :func:`build_layout` runs on a DTensor, for a plain parameter's layout (the per-rank memory plan)."""
    if lay.kind is Kind.TORCH:
        return
    program = lay.program.program if isinstance(lay.program, CompiledBase) else None
    local = _shard_local(program)
    if lay.kind is Kind.MATRIX and not local:  # reductions over the rows are all-reduced, if that is all
        local = _row_plan(lay.program, lay.rank, 3, lay.work_dtype, lay.where) is not None
    fsdp.check_sharded(lay.where, policy=lay.policy if lay.kind is Kind.MATRIX else None,
                       tucker=lay.kind is Kind.TUCKER, states=lay.precision.states,
                       shard_local=local, base=base.__name__,
                       blocks=lay.precision.blocks)  # fmt: skip


def _row_plan(program: CompiledBase, rank: int, n: int, dtype: torch.dtype, where: str) -> tuple | None:
    """The reductions over the rows of a projected program on a row shard (empty: elementwise, nothing to
    all-reduce); None when the update cannot run on a row shard (an op that mixes rows otherwise)."""
    prog = program.program
    if _shard_local(prog):
        return ()

    def inputs(rows: int) -> list[Tensor]:
        states = program.init_lowrank_states(rows, rank, dtype, "meta")
        names = [nd.name for nd in prog.lowrank.graph.nodes if nd.op == "placeholder"]
        scalars = [torch.empty((), dtype=torch.float64, device="meta") for _ in names[2 + len(states) :]]
        x = torch.empty((rows, rank), dtype=dtype, device="meta")
        w = torch.empty((rows, n), dtype=dtype, device="meta")
        return [w, x, *(states[s] for s in prog.state_names), *scalars]

    try:
        return plan_row_reductions(prog.lowrank, (), inputs)
    except RowReductionError:
        return None


def _shard_local(program: Any) -> bool:
    """Whether a derived program's update is elementwise (no reductions, no weight statistics), so it
    gives the same result on a row shard as on the whole weight (the grouped update's criterion too)."""
    return program is not None and program.epilogue is not None and not program.decomposition.param_stats


@dataclass(frozen=True)
class _Context:
    """What :func:`build_layout` passes to the builder of each kind."""

    p: Tensor
    settings: CoapSettings
    base: type
    hyper: dict
    prec: Precision
    where: str
    common: dict


def build_layout(
    p: Tensor,
    index: int,
    settings: CoapSettings,
    *,
    base: type,
    hyper: dict,
    name: str,
    seed: int,
    policy: ProjectionPolicy,
    tucker_policy: Any,
    backend: str,
    input_precision: str,
) -> ParamLayout:
    """The layout of ``p`` in param group ``index`` (module docstring). ``hyper`` are the group's base
    hyperparameters (they select the compiled program); compiling here makes an unsupported base fail
    at construction. Raises ValueError naming the parameter for what cannot run (FSDP2 limits, int8 on
    a state that is not an EMA)."""
    kind, rank, ranks, transposed, rows_side, reason = kind_of(p, settings)
    prec = resolve_precision(settings, p)
    where = f"parameter {name!r} (param group {index})"
    common = {"name": name, "group": index, "settings": settings, "precision": prec, "seed": seed}
    ctx = _Context(p, settings, base, hyper, prec, where, common)
    if kind is Kind.TORCH:
        lay = _full_rank(ctx, reason)
        fusable = lay.kind is Kind.DERIVED and lay.shard is None and p.device.type == "cpu"
        if backend == "inductor" and fusable:  # full-rank groups fuse too (.fullgroup)
            return dataclasses.replace(lay, lowering="inductor")
        return lay
    program = _compile(ctx, 4 if kind is Kind.TUCKER else 2, p.shape)
    if not program.program.state_names:  # no per-parameter state: nothing to project (module docstring)
        return _full_rank(ctx, _stateless_reason(base, hyper), program)
    if kind is Kind.TUCKER:
        return _tucker(ctx, ranks, tucker_policy, program)
    if rank > min(p.shape):  # rank_ratio < 1 with project=True (rank itself is clamped)
        raise ValueError(
            f"rank_ratio={settings.rank_ratio!r} gives {where} of shape {tuple(p.shape)} rank {rank} > "
            f"min(m, n) = {min(p.shape)}; a projected weight needs rank_ratio >= 1 (project=True forces "
            "the projection)"
        )
    kernels = None
    if p.dtype in (torch.float32, torch.bfloat16) and (
        backend == "triton" or (backend in ("auto", "inductor") and p.is_cuda)
    ):
        kernels = ("auto" if backend == "inductor" else backend, input_precision)
    lay = _matrix(ctx, rank, transposed, rows_side, policy, kernels, program)
    if backend == "inductor" and kernels is None and p.device.type == "cpu":
        return dataclasses.replace(lay, lowering="inductor")
    return lay


def _compile(ctx: _Context, ndim: int, shape) -> CompiledBase:
    """The base program for ``ndim``-D states; a refusal names the user's parameter (the compiler's
    message speaks of the base optimizer's update, which it captures on a probe parameter)."""
    try:
        return compile_base(ctx.base, ctx.hyper, ctx.prec.work_dtype, ndim)
    except UnsupportedOptimizerError as exc:
        raise UnsupportedOptimizerError(
            exc.optimizer, f"{exc.reason} (needed for {ctx.where}, shape {tuple(shape)})", node=exc.node
        ) from exc


def _tucker(ctx: _Context, ranks: tuple[int, ...], policy: Any, program: CompiledBase) -> ParamLayout:
    """A Tucker-projected 4-D weight: the program compiled for 4-D cores, the core-shaped states."""
    p, prec = ctx.p, ctx.prec
    if fsdp.is_dtensor(p):
        fsdp.check_sharded(ctx.where, policy=None, tucker=True, states=prec.states, shard_local=False,
                           base=ctx.base.__name__)  # fmt: skip
    kinds = dict(program.program.state_kinds)
    kinds.setdefault(EMA_KEY, "first_moment")
    inits = tucker_inits(program, policy, core_shape(p.shape, ranks), prec.work_dtype, "meta")
    shapes = {n: tuple(t.shape) for n, t in inits.items()}
    states = state_spec(prec, list(shapes), kinds, shapes, ctx.common["seed"], ctx.where)
    return ParamLayout(**ctx.common, kind=Kind.TUCKER, ranks=ranks, policy=policy, program=program,
                       states=states, ndim=4)  # fmt: skip


def _matrix(
    ctx: _Context, rank: int, transposed: bool, rows_side: bool, policy, kernels, program: CompiledBase
) -> ParamLayout:
    """A projected matrix: ``M×r`` states (``coap_exp_avg`` too for a first-moment-less base under a policy
    that reads one); an FSDP2 weight gets its shard spec after the sharding checks."""
    p, prec = ctx.p, ctx.prec
    shard = reductions = None
    if fsdp.is_dtensor(p):
        plan = _row_plan(program, rank, p.shape[1], prec.work_dtype, ctx.where)
        fsdp.check_sharded(ctx.where, policy=policy, tucker=False, states=prec.states,
                           shard_local=plan is not None, base=ctx.base.__name__,
                           blocks=prec.blocks)  # fmt: skip
        shard = fsdp.shard_spec(p, ctx.where)
        if plan:
            reductions = RowReductions(plan, shard.rows, shard.group)
    kinds = dict(program.program.state_kinds)
    names = list(program.program.state_names)
    if program.program.first_moment is None and policy.needs_first_moment:
        names.append(EMA_KEY)
        kinds[EMA_KEY] = "first_moment"
    rows = canonical_dims(fsdp.local(p).shape, transposed)[0]  # M (this rank's, when sharded)
    inits = program.init_lowrank_states(rows, rank, prec.work_dtype, "meta")
    shapes = {n: tuple(t.shape) for n, t in inits.items()}
    shapes[EMA_KEY] = (rows, rank)
    more = program.init_lowrank_states(rows + 1, rank, prec.work_dtype, "meta")
    row_names = (*row_states(shapes, {n: tuple(t.shape) for n, t in more.items()}), EMA_KEY)
    states = state_spec(prec, names, kinds, shapes, ctx.common["seed"], ctx.where, row_names, shard)
    if shard is not None and not states.all_fp32:
        kernels = None  # K1 draws rounding bits by local index: a shard's bf16/int8 stores run eagerly
    return ParamLayout(
        **ctx.common, kind=Kind.MATRIX, rank=rank, transposed=transposed, rows_side=rows_side, policy=policy,
        program=program, states=states, shard=shard, kernels=kernels, ndim=2, row_reductions=reductions,
    )  # fmt: skip


def _full_rank(ctx: _Context, reason: str, stateless: CompiledBase | None = None) -> ParamLayout:
    """TORCH (torch's own optimizer, its exact arithmetic) unless an explicit ``state_precision`` (or a
    base torch cannot run as is) asks for the derived update with a storage (DERIVED). ``stateless``: the
    projected program that has no states (kept on a TORCH layout: a structural edit then rebuilds)."""
    p, prec = ctx.p, ctx.prec
    explicit = ctx.settings.state_precision != "auto"
    native = adapter_for(ctx.base).native_full_rank
    if native and (not explicit or (prec.states == "fp32" and p.dtype in (torch.float32, torch.float64))):
        return ParamLayout(**ctx.common, kind=Kind.TORCH, ndim=p.ndim, reason=reason, program=stateless)
    program = full_program(ctx.base, ctx.hyper, prec.work_dtype if explicit else p.dtype, p.ndim)
    captured = program.captured if isinstance(program, CompiledBase) else program
    kinds = dict(program.program.state_kinds) if isinstance(program, CompiledBase) else {}
    like = torch.empty(p.shape, dtype=captured.dtype, device="meta")
    shapes = {n: tuple(t.shape) for n, t in init_states(captured, like).items()}
    more = torch.empty((p.shape[0] + 1, *p.shape[1:]) if p.ndim else (), dtype=captured.dtype, device="meta")
    row_names = row_states(shapes, {n: tuple(t.shape) for n, t in init_states(captured, more).items()})
    shard = None
    if fsdp.is_dtensor(p):  # its own update on the local shard: only if elementwise
        prog = program.program if isinstance(program, CompiledBase) else None
        fsdp.check_sharded(ctx.where, policy=None, tucker=False, states=prec.states,
                           shard_local=_shard_local(prog), base=ctx.base.__name__,
                           blocks=prec.blocks)  # fmt: skip
        shard = fsdp.shard_spec(p, ctx.where, matrix=False)
    states = state_spec(  # (a full-rank spec's shapes are the global ones)
        prec, list(shapes), kinds, shapes, ctx.common["seed"], ctx.where, row_names, shard
    )
    return ParamLayout(
        **ctx.common, kind=Kind.DERIVED, program=program, ndim=p.ndim, states=states, shard=shard,
        reason=reason,
    )  # fmt: skip
