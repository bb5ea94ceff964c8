"""Capture adapter for ``transformers.optimization.Adafactor`` (the Adafactor the COAP paper compresses).

The update is the tensor-only port :mod:`coap_compile.capture.hf_adafactor_port` (transformers keeps a
Python ``int`` step and combines floats with ``math.pow``/``min``/``max``, which cannot be traced):

* **live** (0-d float64 inputs, read from ``param_groups`` every step; a change never re-captures):
  ``beta1`` (when not None), ``decay_rate``, ``eps[0]`` (``eps1``), ``eps[1]`` (``eps2``),
  ``clip_threshold`` and ``weight_decay`` (gated: a zero is the constant 0 and transformers' skipped
  term; nonzero ↔ zero re-compiles once);
* **structural** (the signature): ``beta1 is None``, ``scale_parameter``, ``relative_step``,
  ``warmup_init``; ``factored`` is ``ndim ≥ 2``.

``lr`` is the usual runtime input; with ``relative_step=True`` transformers ignores it (the step size
is ``min(1e-2 or 1e-6·t, 1/√t)``) and so does the port. :func:`~.hf_adafactor_port.check_hf_hyperparams`
runs first, so settings transformers refuses (``lr`` with ``relative_step``, ``warmup_init`` without
it, ``lr=None`` without it) are refused here with the same reason. A mapping without an ``lr`` key
(a bare ``capture(cls, {...})``) is checked as if the lr were given where it is needed.

**First moment.** transformers' ``exp_avg`` is an EMA of the clipped, preconditioned *update*
``U = α_t · clip(V̂^{-1/2} ⊙ X̃)`` (see the port's docstring), so the compiler's own classifier
(``s' = a·s + b·x``) calls it ``other``. The plan therefore carries the hint
``state_kinds = {"exp_avg": "first_moment"}``; the Decompose pass accepts it only after checking that
``exp_avg' = a·exp_avg + b·u`` with scalar ``a``, ``b`` and ``u`` free of ``exp_avg`` and reading the
projected gradient (``passes/decompose.py``). COAP's correlation step then reads ``exp_avg`` (its
cosine is scale-invariant per fibre, so the ``α_t`` inside ``U`` does not matter, the direction does),
and ``restore_state`` maps it linearly between bases; no extra ``coap_exp_avg`` is kept, which is where
the memory saving over this base comes from (``M×n`` first moment → ``M×r``).

Drift check: the constructor's parameter names and defaults must be exactly the ones checked here
(transformers 5.24; checked at every normalize/plan, as the torch adapters check torch's private
signatures); the arithmetic itself is checked against the installed transformers in
``tests/test_hf_adafactor_adapter.py``.

This module imports transformers; :func:`coap_compile.capture.trace.adapter_for` imports it only when
asked for a class whose module is ``transformers.optimization``, so ``import coap_compile`` stays light.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from coap_compile.capture import hf_adafactor_port as port
from coap_compile.capture.adapter_base import (
    NON_MATH_KEYS,
    Adapter,
    HyperInput,
    UpdatePlan,
    normalize_value,
)
from coap_compile.errors import UnsupportedOptimizerError

__all__ = ["HF_ADAFACTOR", "HFAdafactorAdapter", "hf_adafactor_class"]

#: ``module.name`` of the adapted class.
HF_ADAFACTOR = "transformers.optimization.Adafactor"

#: transformers' constructor: parameter names and defaults (``params`` has none).
_CTOR = (
    ("lr", None),
    ("eps", (1e-30, 1e-3)),
    ("clip_threshold", 1.0),
    ("decay_rate", -0.8),
    ("beta1", None),
    ("weight_decay", 0.0),
    ("scale_parameter", True),
    ("relative_step", True),
    ("warmup_init", False),
)


def hf_adafactor_class() -> type[torch.optim.Optimizer]:
    """``transformers.optimization.Adafactor`` (imports transformers)."""
    from transformers.optimization import Adafactor

    return Adafactor


class HFAdafactorAdapter(Adapter):
    """transformers' Adafactor through the tensor-only port (module docstring).

    Placeholders: ``(param, grad, [exp_avg], exp_avg_sq_row, exp_avg_sq_col | exp_avg_sq, step, lr,
    *hypers)`` with the live hypers in the port's order ``beta1, decay_rate, eps1, eps2,
    clip_threshold, weight_decay`` (absent ones skipped).
    """

    math_keys = frozenset(k for k, _ in _CTOR) - NON_MATH_KEYS
    hypers = (
        HyperInput("beta1", "beta1"),
        HyperInput("decay_rate", "decay_rate"),
        HyperInput("eps1", "eps", 0),
        HyperInput("eps2", "eps", 1),
        HyperInput("clip_threshold", "clip_threshold"),
        HyperInput("weight_decay", "weight_decay"),
    )
    gates = frozenset({"weight_decay"})
    native_full_rank = False  # int ``step`` and an ``RMS`` float in transformers' state

    def __init__(self, cls: type[torch.optim.Optimizer] | None = None) -> None:
        self.cls = cls if cls is not None else hf_adafactor_class()

    def check_signature(self) -> None:
        """Fail loudly when transformers' constructor (names or defaults) changed."""
        try:
            params = inspect.signature(self.cls.__init__).parameters
        except (TypeError, ValueError) as exc:  # pragma: no cover - a C extension class
            raise UnsupportedOptimizerError(self.optimizer, f"cannot read its constructor: {exc}") from exc
        found = tuple((n, p.default) for n, p in params.items() if n not in ("self", "params"))
        if found != _CTOR:
            raise UnsupportedOptimizerError(
                self.optimizer,
                f"its constructor changed (expected {list(_CTOR)}, found {list(found)}); "
                "the capture adapter (coap_compile/capture/hf_adapter.py) must be updated",
            )

    def normalize(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        """Checked first (:func:`~.hf_adafactor_port.check_hf_hyperparams`; the defaults are the
        constructor's, verified by :meth:`check_signature`), then the normalized math keys."""
        self.check_signature()
        merged = {**dict(_CTOR), **hyperparams}
        if "lr" not in hyperparams:  # a bare capture: lr is a runtime input, given where it is needed
            merged["lr"] = None if merged["relative_step"] else 1.0
        check_hf_hyperparams_named(merged)
        return {k: normalize_value(merged[k]) for k in sorted(self.math_keys)}

    def plan(self, hp, dtype, ndim, live=()) -> UpdatePlan:
        self.check_signature()
        use_m = hp["beta1"] is not None
        factored = ndim >= 2
        names = port.state_names(use_first_moment=use_m, factored=factored)
        fn = port.make_update(
            use_first_moment=use_m,
            scale_parameter=bool(hp["scale_parameter"]),
            relative_step=bool(hp["relative_step"]),
            warmup_init=bool(hp["warmup_init"]),
        )
        order = port.hyper_names(use_m)
        by_name = {h.name: h for h in self.hypers}
        live_names = tuple(h.name for h in live)
        baked = {n: float(by_name[n].read(hp)) for n in order if n not in live_names}
        if set(baked) - self.gates:  # only a gated zero may be a constant (see Adapter.live_inputs)
            raise UnsupportedOptimizerError(
                self.optimizer, f"hyperparameters {sorted(set(baked) - self.gates)} must be numbers"
            )
        n_states = len(names)

        def update(p: Tensor, g: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            head, hv = rest[: n_states + 2], dict(zip(live_names, rest[n_states + 2 :]))
            return fn(p, g, *head, *(hv[n] if n in hv else baked[n] for n in order))

        return UpdatePlan(
            names,
            update,
            functools.partial(port.init, use_first_moment=use_m),
            verify_shape_generic=True,
            hypers=live,
            state_kinds={"exp_avg": "first_moment"} if use_m else {},
        )


def check_hf_hyperparams_named(hp: Mapping[str, Any]) -> None:
    """:func:`~.hf_adafactor_port.check_hf_hyperparams`, plus the float hyperparameters' types, with
    messages naming ``transformers.optimization.Adafactor``."""
    try:
        port.check_hf_hyperparams(hp)
        for key in ("clip_threshold", "decay_rate", "weight_decay"):
            v = hp.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float | Tensor):
                raise TypeError(f"{key} must be a number, got {v!r}")
        if hp.get("beta1") is not None and (
            isinstance(hp["beta1"], bool) or not isinstance(hp["beta1"], int | float | Tensor)
        ):
            raise TypeError(f"beta1 must be None or a number, got {hp['beta1']!r}")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{HF_ADAFACTOR}: {exc}") from None
