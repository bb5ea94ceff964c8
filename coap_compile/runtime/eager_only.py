"""``eager_only``: ``torch.compiler.disable`` without importing Dynamo before it is needed.

``torch.compiler.disable`` imports ``torch._dynamo`` (about 0.9 s) when it decorates, so using it on a
method at class definition made ``import coap_compile`` pay for Dynamo (issue 14). Nothing can be
tracing while ``torch._dynamo`` is not imported, so the wrapper calls the function directly until
then, and afterwards calls a ``torch._dynamo.disable`` wrapper made once per function (which Dynamo
treats as a graph break, running the function eagerly). :func:`prime` makes the wrappers up front when
Dynamo is already imported (the optimizer calls it on construction and on eager steps), so that a
trace normally finds them; a trace that runs first makes the wrapper itself, at the cost of one extra
graph break in that first trace (``torch._dynamo.disable`` is on Dynamo's skip list).

This saves import time only: constructing any ``torch.optim`` optimizer imports Dynamo anyway
(``Optimizer.add_param_group`` is wrapped by ``torch._compile._disable_dynamo``, torch 2.11 and 2.13),
and ``CoapOptimizer`` builds one (its probe and inner instances).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["eager_only", "prime"]

F = TypeVar("F", bound=Callable[..., Any])
_DISABLED: dict[Callable[..., Any], Callable[..., Any]] = {}
_ALL: list[Callable[..., Any]] = []


def _disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch._dynamo

    wrapped = _DISABLED[fn] = torch._dynamo.disable(fn)
    return wrapped


def prime() -> None:
    """Make the disabled wrappers now if Dynamo is imported (cheap: a dictionary check otherwise)."""
    if "torch._dynamo" in sys.modules and len(_DISABLED) < len(_ALL):
        for fn in _ALL:
            if fn not in _DISABLED:
                _disabled(fn)


def eager_only(fn: F) -> F:
    """Decorator: ``fn`` always runs eagerly, also when called from a traced (``torch.compile``) region."""
    _ALL.append(fn)

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        wrapped = _DISABLED.get(fn)
        if wrapped is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)  # no Dynamo, so no trace
            wrapped = _disabled(fn)
        return wrapped(*args, **kwargs)

    return inner  # type: ignore[return-value]
