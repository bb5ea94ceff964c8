"""Checkpoints and copies of a :class:`~coap_compile.runtime.optimizer.CoapOptimizer`.

**state_dict** is torch's (tensors, numbers and strings only, so ``torch.load(weights_only=True)``
works) plus a top-level ``"coap"`` entry ``{"format": 1, "base": "torch.optim.AdamW"}``.

**load_state_dict** checks, before anything changes (a mismatch raises ``ValueError`` and leaves the
optimizer as it was, still usable):

1. the number of groups and of parameters per group (as torch does);
2. that it is a COAP checkpoint of the same base optimizer (``"coap"`` entry; a checkpoint without it
   and without COAP keys in its groups is a plain ``torch.optim`` one, see below);
3. per group: the same projection policy, and the checkpoint's values validated as keyword arguments are
   (:class:`~.settings.CoapSettings`: ``scale=inf``, ``rank=-5`` …; the base hyperparameters by the base
   class itself, :mod:`.hyper`), for every group, with or without saved state;
4. per parameter with saved state: the state names and shapes against what this optimizer expects
   for the checkpoint's hyperparameters (as torch, a checkpoint's hyperparameters, lr or amsgrad alike,
   replace the current ones). Low-rank shapes come from *this* optimizer's rank, so a rank mismatch is
   refused, naming both ranks: rank decides memory, and silently adopting the checkpoint's would undo
   the user's choice; rebuild with the checkpoint's rank to resume it (or change ``group["rank"]``
   after loading to re-base ``P``);
5. per parameter, the saved tensors as the step reads them (:func:`_check_tensors`): ``step`` a finite
   integer ``≥ 0``, ``P`` and the other floating states finite, each own-stored state laid out as its
   storage expects (:meth:`coap_compile.storage.StateStorage.validate`: int8 codes with their dtype, scales
   and rounding stream present, no float64 value in a float32 storage …). A refusal is a ValueError
   naming the parameter and the state.

A **plain torch.optim checkpoint** (full-rank ``exp_avg`` of every weight) is refused with that
explanation rather than converted: projecting its full moments needs ``P``, which COAP computes from
a gradient, so a faithful migration cannot happen at load time.

If torch's own loading then fails anyway, the previous groups and state are restored.

**Copies** (``copy.deepcopy``, ``pickle``, ``torch.save(opt)``): ``__getstate__`` adds the
configuration torch's ``Optimizer.__getstate__`` drops (the :class:`~.plan.OptimizerConfig`, with
parameter names by position, and the re-compilation events); the plan is derived again on unpickling.

Everything here reads the optimizer through its public interface (``opt.config``, ``opt.layout(p)``,
``opt.state_io(p)``, ``opt.sync_plan``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..capture import capture, init_states
from ..capture.adapter_base import qualified_name
from ..compiler import compile_base
from ..distributed import fsdp
from ..projection.tucker import core_shape
from ..storage import convert_state, is_replicated_key, load_any, logical_layout, logical_name
from .hyper import check_base_hyperparams
from .layout import Kind, kind_of
from .memory import base_keeps_step
from .plan import OptimizerConfig
from .precision import PRECISION_KEYS, StateIO
from .selection import canonical_dims
from .settings import EMA_KEY, CoapSettings, OptimizerOptions

__all__ = [
    "add_metadata",
    "expected_layout",
    "getstate",
    "load",
    "logical_layout",
    "logical_name",
    "setstate",
    "validate",
]

FORMAT = 1


def add_metadata(opt, sd: dict[str, Any]) -> dict[str, Any]:
    sd["coap"] = {"format": FORMAT, "base": qualified_name(opt.config.base)}
    return sd


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "()"


def _describe(layout: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(layout.items())) or "no state"


def expected_layout(opt, p: Tensor, group: dict, index: int = 0) -> dict[str, tuple[int, ...]]:
    """Logical state names and shapes ``p`` has after a step, under ``group``'s hyperparameters and COAP
    settings (validated: ValueError naming the setting and the group) and this optimizer's layout of
    ``p`` (kind, rank, side; physical storage keys are precision details, see
    :func:`coap_compile.storage.logical_layout`)."""
    config, lay = opt.config, opt.layout(p)
    settings = CoapSettings.from_group(group, index, config.policy_instance)
    hyper = {k: v for k, v in group.items() if k != "params" and k not in CoapSettings.__dataclass_fields__}
    if not lay.projected:
        dtype = lay.program.captured.dtype if hasattr(lay.program, "captured") else p.dtype
        captured = capture(config.base, hyper, dtype=dtype, ndim=p.ndim)
        like = torch.empty(p.shape, dtype=dtype, device="meta")
        out = {k: tuple(v.shape) for k, v in init_states(captured, like).items()}
        if base_keeps_step(config.base, config.base_kwargs) or lay.kind is Kind.DERIVED:
            out["step"] = ()
        return out
    dtype = lay.work_dtype
    if lay.kind is Kind.TUCKER:
        compiled = compile_base(config.base, hyper, dtype, 4)
        policy = settings.tucker_policy(config.conv_policy)
        core = core_shape(p.shape, lay.ranks)
        out = {k: tuple(s_) for k, (s_, _) in policy.state_layout(tuple(p.shape), lay.ranks, dtype).items()}
        out.update({k: tuple(v.shape) for k, v in compiled.init_core_states(core, dtype, "meta").items()})
        out["step"] = ()
        if compiled.program.first_moment is None and policy.needs_first_moment:
            out[EMA_KEY] = core
        return out
    big, small = canonical_dims(p.shape, lay.transposed)  # global M, N (a DTensor's shape is global)
    compiled = compile_base(config.base, hyper, dtype)
    policy = settings.policy(config.policy_instance)
    out = {k: tuple(s) for k, (s, _) in policy.state_layout(small, lay.rank, dtype).items()}
    out.update(
        {k: tuple(v.shape) for k, v in compiled.init_lowrank_states(big, lay.rank, dtype, "meta").items()}
    )
    out["step"] = ()
    if compiled.program.first_moment is None and policy.needs_first_moment:
        out[EMA_KEY] = (big, lay.rank)
    return out


def _check_shape(opt, sd: Any) -> None:
    """A state dict with as many groups, and parameters per group, as this optimizer (as torch checks)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("load_state_dict expects a dict with 'state' and 'param_groups' (from state_dict())")
    groups, saved = opt.param_groups, sd["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise ValueError(
            f"the checkpoint has param groups of sizes {[len(s['params']) for s in saved]}, this optimizer "
            f"{[len(g['params']) for g in groups]}"
        )


def validate(opt, sd: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``sd`` cannot be loaded into ``opt`` (module docstring); change nothing."""
    _check_shape(opt, sd)
    groups, saved = opt.param_groups, sd["param_groups"]
    config = opt.config
    ours = qualified_name(config.base)
    meta = sd.get("coap")
    if meta is None and not all("projection" in s and "rank" in s for s in saved):
        raise ValueError(
            "the checkpoint has no COAP settings (no 'coap' entry, no 'rank'/'projection' in its param "
            "groups): it was saved by a plain torch.optim optimizer. Its full-rank moments cannot be "
            f"loaded into COAP-{config.base.__name__}, whose projected weights keep low-rank states in a "
            "basis computed from a gradient; resume it with the optimizer that saved it, or start the "
            "COAP optimizer fresh"
        )
    theirs = meta.get("base") if isinstance(meta, dict) else None
    if theirs is not None and theirs != ours:
        _refuse_base(opt, sd, theirs, ours)
    first_mismatch = None
    for i, (g, s) in enumerate(zip(groups, saved)):
        if s.get("projection", g["projection"]) != g["projection"]:
            raise ValueError(
                f"param group {i}: the checkpoint uses projection={s['projection']!r}, this optimizer "
                f"projection={g['projection']!r}; build the optimizer with the checkpoint's projection"
            )
        kept = {k: g[k] for k in PRECISION_KEYS if k in g}  # this optimizer's storage, not the checkpoint's
        merged = {**g, **{k: v for k, v in s.items() if k != "params"}, **kept, "params": g["params"]}
        try:  # the checkpoint's values, as keyword arguments are checked (COAP's keys, then the base's)
            CoapSettings.from_group(merged, i, config.policy_instance)
            check_base_hyperparams(config.base, merged, i)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"the checkpoint's settings are refused: {exc}") from None
        for p, idx in zip(g["params"], s["params"]):
            st = sd["state"].get(idx)
            if not st:
                continue
            got = logical_layout(st)
            bad = [k for k, v in got.items() if v is None]
            if bad:
                raise ValueError(
                    f"parameter {opt.param_name(p)!r} (param group {i}): the checkpoint holds non-tensor "
                    f"state {bad}; COAP checkpoints hold tensors only"
                )
            want = expected_layout(opt, p, merged, i)
            if not opt.layout(p).projected and not base_keeps_step(config.base, config.base_kwargs):
                got.pop("step", None)  # torch's SGD keeps none; a compiled or low-precision run adds one
                want.pop("step", None)
            if got != want and first_mismatch is None:
                first_mismatch = (i, p, got, want, merged)
            elif got == want:
                _check_tensors(opt, p, i, st)
    if first_mismatch is not None:
        _refuse_layout(opt, *first_mismatch)


def _check_tensors(opt, p: Tensor, i: int, st: dict[str, Tensor]) -> None:
    """The saved tensors of ``p`` as the step will read them (ValueError naming the parameter and the
    state): ``step`` a finite integer count ``≥ 0``; ``P`` and every other floating state finite; each
    own-stored state as its storage lays it out (:meth:`~coap_compile.storage.StateStorage.validate`:
    dtypes, shapes, companions such as int8 scales and rounding streams), or, saved in another precision
    (converted on load), readable at its logical shape."""
    lay = opt.layout(p)
    where = f"parameter {opt.param_name(p)!r} (param group {i})"
    spec = lay.states
    storages = spec.storages if spec is not None else {}
    for key, t in st.items():
        if logical_name(key) in storages:
            continue
        if key == "step":
            v = float(t.double().reshape(-1)[0]) if t.numel() == 1 else math.nan
            if not (math.isfinite(v) and v >= 0 and v == math.floor(v)):
                raise ValueError(f"{where}: state 'step' must be one finite integer count >= 0, got {t!r}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: state {key!r} holds inf/NaN")
    if spec is None:
        return
    io = StateIO(st, storages, spec.kinds, spec.seed, spec.shapes)
    for name, storage in storages.items():
        if not io.keys_of(name):
            continue
        try:
            if lay.shard is not None:  # row-sharded (DTensor) values: their finiteness only, locally
                value = load_any({k: fsdp.local(v) for k, v in st.items()}, name)
            elif io.matches(name):
                storage.validate(st, name, spec.shapes[name], spec.kinds.get(name, "other"))
                continue
            else:
                value = load_any(st, name)
                if tuple(value.shape) != tuple(spec.shapes[name]):
                    raise ValueError(f"its value is {tuple(value.shape)}, expected {spec.shapes[name]}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError("its value holds inf/NaN")
        except (KeyError, ValueError, RuntimeError) as exc:
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ValueError(f"{where}: state {name!r}: {detail}") from None


def _refuse_layout(opt, i: int, p: Tensor, got: dict, want: dict, merged: dict) -> None:
    """The first parameter whose saved states do not fit: both layouts, and the rank hint."""
    config, lay = opt.config, opt.layout(p)
    saved_rank_rule = kind_of(p, CoapSettings.from_group(merged, i, config.policy_instance))[1]
    what = f"rank {lay.rank}" if lay.projected else "full rank"
    hint = ""
    saved_rank = got["proj"][-1] if "proj" in got else got["dct_index"][0] if "dct_index" in got else None
    if lay.projected and saved_rank is not None and saved_rank != lay.rank:
        hint = (
            f"; the checkpoint's states have rank {saved_rank} (its settings "
            f"rank={merged.get('rank')}, rank_ratio={merged.get('rank_ratio')} give {saved_rank_rule}): "
            "build the optimizer with that rank to resume it"
        )
    raise ValueError(
        f"parameter {opt.param_name(p)!r} (param group {i}): the checkpoint holds {_describe(got)}; this "
        f"optimizer (COAP-{config.base.__name__}, {what}) expects {_describe(want)}{hint}"
    )


def _refuse_base(opt, sd: dict[str, Any], theirs: str, ours: str) -> None:
    """The checkpoint is another base's: name both, and the first parameter's states against ours."""
    detail = ""
    for i, (g, s) in enumerate(zip(opt.param_groups, sd["param_groups"])):
        for p, idx in zip(g["params"], s["params"]):
            st = sd["state"].get(idx)
            if st:
                want = expected_layout(opt, p, g, i)  # this optimizer's own settings (theirs may not fit)
                detail = (
                    f" (parameter {opt.param_name(p)!r}: the checkpoint holds {', '.join(sorted(st))}; this "
                    f"optimizer expects {', '.join(sorted(want))})"
                )
                break
        if detail:
            break
    raise ValueError(
        f"the checkpoint was saved by COAP-{theirs.rsplit('.', 1)[-1]} ({theirs}); this optimizer is "
        f"COAP-{opt.config.base.__name__} ({ours}){detail}"
    )


def load(opt, sd: dict[str, Any], torch_load: Callable[[dict], None]) -> None:
    """Validate, then load with torch's ``load_state_dict``; restore the previous state on failure.

    The checkpoint's hyperparameters replace the current ones (torch's rule), except the storage keys
    (``state_precision``, ``projection_precision``, ``quant_block_size``): this optimizer keeps its own,
    and a state saved in another precision is converted (:func:`coap_compile.storage.convert_state`:
    to fp32 exactly; from fp32 one rounding/quantization, as one step's store). States this optimizer
    stores itself keep their saved dtypes (torch casts floating states to the parameter's dtype).
    """
    validate(opt, sd)
    groups = [dict(g) for g in opt.param_groups]
    state = {p: dict(s) for p, s in opt.state.items()}
    body = {k: v for k, v in sd.items() if k != "coap"}
    try:
        torch_load(body)
        for g, old in zip(opt.param_groups, groups):
            g.update({k: old[k] for k in PRECISION_KEYS if k in old})
        opt.sync_plan(force=True)
        params = [p for g in opt.param_groups for p in g["params"]]
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        for p, idx in zip(params, saved_ids):
            if opt.layout(p).states is not None and idx in sd["state"]:
                opt.state[p] = _restore(opt, p, sd["state"][idx])
    except Exception:
        opt.param_groups[:] = groups
        opt.state.clear()
        opt.state.update(state)
        opt.sync_plan(force=True)
        raise


def _restore(opt, p: Tensor, saved: dict[str, Tensor]) -> dict[str, Tensor]:
    """``p``'s state rebuilt from the saved tensors: own-stored states in this optimizer's precision."""
    lay = opt.layout(p)
    io = opt.state_io(p)
    names = set(io.storages)
    out: dict[str, Tensor] = {}
    for key, value in saved.items():
        if logical_name(key) in names:
            continue
        dtype = lay.precision.proj_dtype if key == "proj" else value.dtype
        out[key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
    spec = lay.shard

    def row(k: str) -> bool:  # a row-sharded state of an FSDP2 weight (not a rounding stream)
        return spec is not None and logical_name(k) in names and not is_replicated_key(k)

    if spec is not None:  # its local rows (a full plain tensor, e.g. a single-process checkpoint, is cut)
        saved = _reblocked(saved, io, spec)
        saved = {k: fsdp.local(fsdp.shard_value(spec, v)) if row(k) else v for k, v in saved.items()}
    for name in names & set(logical_layout(saved)):
        probe = StateIO(saved, io.storages, io.kinds, io.seed, io.shapes)
        if probe.matches(name):
            for key in probe.keys_of(name):
                out[key] = saved[key].detach().to(device=p.device, copy=True)
        else:
            kind = io.kinds.get(name, "other")
            converted = convert_state(saved, name, io.storages[name], kind, seed=io.seed)
            out.update({k: v.to(p.device) for k, v in converted.items()})
    if spec is not None:
        out = {k: spec.wrap(v) if row(k) else v for k, v in out.items()}
    return out


def _reblocked(saved: dict[str, Tensor], io: StateIO, spec) -> dict[str, Tensor]:
    """A whole (single-process) int8 state saved in a block layout a row shard cannot cut (16×16 tiles)
    re-blocked into this optimizer's row blocks before it is cut (one quantization of its values, as
    ``convert_state``; the rounding stream continues from the saved counter)."""
    out = dict(saved)
    for name, stg in io.storages.items():
        if stg.name != "int8":
            continue
        codes, scales = saved.get(name + stg.value_suffix), saved.get(name + stg.scale_suffix)
        if codes is None or scales is None or fsdp.is_dtensor(codes) or codes.ndim < 2:
            continue
        if codes.shape[0] != spec.rows or tuple(scales.shape) == stg.layout(codes.shape).grid:
            continue
        part = {k: v for k, v in saved.items() if logical_name(k) == name}
        fresh = convert_state(part, name, stg, io.kinds.get(name, "other"), seed=io.seed)
        rng = name + stg.rng_suffix
        if rng in saved and rng in fresh:
            fresh[rng] = saved[rng].clone()
        out.update(fresh)
    return out


def getstate(opt, state: dict[str, Any]) -> dict[str, Any]:
    """torch's ``__getstate__`` plus this optimizer's configuration (names by position, not by id)."""
    config = opt.config
    ids = {id(p): (gi, pi) for gi, g in enumerate(opt.param_groups) for pi, p in enumerate(g["params"])}
    names = [(*ids[i], name) for i, name in config.names.items() if i in ids]
    saved = {
        "base": config.base, "base_kwargs": dict(config.base_kwargs),
        "policy_instance": config.policy_instance, "conv_policy": config.conv_policy,
        "options": config.options, "names": names, "events": list(opt.events),
    }  # fmt: skip
    return {**state, "_coap_config": saved}


def setstate(opt, saved: dict[str, Any]) -> tuple[OptimizerConfig, list[str]]:
    """The configuration and events of a pickled optimizer (its ``param_groups`` already restored)."""
    groups = opt.param_groups
    if "_base_cls" in saved:  # pickled before the runtime redesign (private attribute names)
        options = OptimizerOptions(
            saved["_backend"], saved["_check_finite"], saved.get("_grouped", True), saved["_precision"]
        )
        saved = {
            "base": saved["_base_cls"], "base_kwargs": saved["_base_kwargs"],
            "policy_instance": saved["_policy_instance"], "conv_policy": saved["_conv_policy"],
            "options": options, "names": saved["names"], "events": saved.get("_events", []),
        }  # fmt: skip
    names = {id(groups[gi]["params"][pi]): name for gi, pi, name in saved["names"]}
    config = OptimizerConfig(
        saved["base"], saved["base_kwargs"], saved["policy_instance"], saved["conv_policy"],
        saved.get("options", OptimizerOptions()), names,
    )  # fmt: skip
    return config, list(saved.get("events", []))
