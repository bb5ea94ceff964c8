"""The ``torch_dynamo_backends`` entry point of ``backend="coap"`` (``pyproject.toml``).

torch looks the name up in this package's entry points the first time ``torch.compile(...,
backend="coap")`` runs, so ``import coap_compile`` stays free of Dynamo and Inductor (issue 14: they
were 0.94 s of a 1.2 s import). The heavy module, :mod:`coap_compile.backend`, is imported on the first
compilation. Importing :mod:`coap_compile.backend` directly also registers the name (a source tree
that is not pip-installed has no entry point); either order registers it once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["coap"]


def coap(gm: Any, example_inputs: Any) -> Any:
    """``torch.compile`` backend ``"coap"``: :func:`coap_compile.backend.coap_backend`, imported lazily."""
    from .backend import coap_backend

    return coap_backend(gm, example_inputs)
