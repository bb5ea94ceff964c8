"""Base hyperparameters of a param group, validated as torch validates them, before anything is written.

COAP's own keys are validated by :class:`~.settings.CoapSettings`; the base optimizer's (``lr``, ``betas``,
``eps``, ``weight_decay`` …) are the base class's business. :func:`check_base_hyperparams` asks the base
class itself, on a probe parameter (a 2×2 tensor of the group's device, float32, or float64 for float64
weights):

1. **construction** ``base([probe], **hyper)`` with the group's values (the keys its constructor takes):
   NaN/inf/out-of-range values are refused exactly as torch's constructor refuses them as keyword
   arguments (``betas=(nan, 0.999)``: "Invalid beta parameter at index 0");
2. **one step** of that instance with a gradient of ones: values the constructor accepts but its step
   cannot use (``eps=10**30``: "int too big to convert"; an edited ``betas=(1.0, 0.999)``, which the
   constructor would refuse, fails there too) are refused here instead of in the middle of the real step.

Both are a pure function of the values: the answer is cached by ``(base, frozen values, device, dtype)``
and depends on no compile cache or process history. A finite ``lr ≥ 0`` (a Python number) is probed as
:data:`PROBE_LR`: schedulers change it every step, and torch's constructors only check ``0 <= lr``; any
other ``lr`` (None, NaN, negative, a tensor) is probed as it is. (Before issue 21 a NaN β₁ was refused in a
fresh process, by the pass pipeline's numeric checks on a cold compile cache, and accepted once another
AdamW had been compiled.) The optimizer calls it at construction, on ``add_param_group``, on
``load_state_dict`` (for the checkpoint's groups) and at every step for each group whose values changed
since its last check, before the settings check, the refreshes and the update: a step with a bad edit
raises naming the group and writes nothing.

Cost (CPU, AdamW, measured on the shared 2-core Xeon under load): 1.3 ms per new set of values (a
constructor and a 4-element step), then cached; an LR schedule alone makes no new set. Per step the
optimizer compares ``(hyper_key, lr_token)`` per group (the :func:`~.scalars.hyper_key` it computes
anyway).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import Tensor

from .settings import PROJECTION_KEYS

__all__ = ["PROBE_LR", "check_base_hyperparams", "lr_token", "value_key"]


def _freeze(v: Any) -> Any:
    if isinstance(v, Tensor):
        return ("tensor", v.dtype, float(v)) if v.numel() == 1 else ("tensor", id(v))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, *map(_freeze, v))
    if isinstance(v, (int, float, str, bool, type(None))):
        return (type(v).__name__, v)  # 1, 1.0 and True are different arguments
    return ("obj", type(v).__name__, repr(v))


#: what a finite ``lr ≥ 0`` (a Python number) is probed as: its value decides nothing torch checks
PROBE_LR = 1e-3


def lr_token(lr: Any) -> Any:
    """``lr`` as the check sees it: every finite Python number ``≥ 0`` is one token (schedulers change
    ``lr`` every step, and torch's constructors only check ``0 <= lr``), anything else its value."""
    if not isinstance(lr, bool) and isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0:
        return "finite lr >= 0"
    return _freeze(lr)


def value_key(group: dict) -> tuple:
    """A hashable snapshot of the base hyperparameters of ``group`` as checked (``lr`` by
    :func:`lr_token`): equal keys are validated once."""
    return tuple(
        (k, lr_token(v) if k == "lr" else _freeze(v))
        for k, v in sorted(group.items())
        if k != "params" and k not in PROJECTION_KEYS
    )


@functools.cache
def _signature(base: type) -> tuple[dict[str, Any], bool]:
    """The constructor's keyword names with their defaults, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):
        return {}, True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {n: p.default for n, p in params.items() if n not in ("self", "params")}, var_kw


def _shown(base: type, hyper: dict) -> str:
    """The values that differ from the constructor's defaults (what the user set)."""
    defaults = _signature(base)[0]

    def same(k: str, v: Any) -> bool:
        try:
            return k in defaults and type(v) is type(defaults[k]) and bool(v == defaults[k])
        except Exception:
            return False

    return ", ".join(f"{k}={v!r}" for k, v in hyper.items() if not same(k, v))


def _probe_like(group: dict) -> tuple[str, torch.dtype]:
    params = group.get("params") or []
    p = params[0] if params else None
    if not isinstance(p, Tensor) or p.device.type == "meta":
        return "cpu", torch.float32
    return str(p.device), torch.float64 if p.dtype == torch.float64 else torch.float32


def check_base_hyperparams(base: type, group: dict, index: int) -> None:
    """Raise (``ValueError``/``TypeError`` naming the group) if ``base`` refuses the group's base
    hyperparameters (module docstring); otherwise return. Cached by value (:func:`value_key`)."""
    device, dtype = _probe_like(group)
    names, var_kw = _signature(base)
    hyper = {
        k: v for k, v in group.items()
        if k != "params" and k not in PROJECTION_KEYS and (k in names or (var_kw and k != "initial_lr"))
    }  # fmt: skip
    if lr_token(hyper.get("lr")) == lr_token(PROBE_LR):
        hyper["lr"] = PROBE_LR
    key = (base, value_key(hyper), device, dtype)
    try:
        hash(key)
    except TypeError:  # an unhashable value torch may still accept: check it, uncached
        _check(base, hyper, device, dtype)
        return
    error = _cached(key, hyper)
    if error is not None:
        raise type(error)(f"param group {index}: {error}") from None


_CACHE: dict[tuple, BaseException | None] = {}
_CACHE_SIZE = 256  # distinct value sets remembered (a schedule cycling β₁ makes a new one every step)


def _cached(key: tuple, hyper: dict) -> BaseException | None:
    if key in _CACHE:
        return _CACHE[key]
    base, _, device, dtype = key
    try:
        _check(base, hyper, device, dtype)
        error = None
    except (TypeError, ValueError) as exc:
        error = exc
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = error
    return error


def _check(base: type, hyper: dict, device: str, dtype: torch.dtype) -> None:
    shown = _shown(base, hyper)
    probe = torch.zeros(2, 2, device=device, dtype=dtype, requires_grad=True)
    try:
        opt = base([probe], **hyper)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{base.__name__}({shown}) refuses these values: {exc}") from None
    except Exception as exc:
        raise ValueError(
            f"{base.__name__}({shown}) refuses these values: {type(exc).__name__}: {exc}"
        ) from None
    probe.grad = torch.ones_like(probe)
    try:
        opt.step()
    except Exception as exc:
        raise ValueError(
            f"{base.__name__}'s step fails with these hyperparameters ({shown}): {type(exc).__name__}: {exc}"
        ) from None
