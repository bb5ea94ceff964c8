"""Capture stage: a base optimizer's per-parameter update as a functional, shape-generic aten FX graph.

See :mod:`coap_compile.capture.tracing` for the graph contract, :mod:`coap_compile.capture.trace` for
the cached front end.
"""

from coap_compile.capture.adapter_base import LIVE, HyperInput
from coap_compile.capture.adapters import check_signatures
from coap_compile.capture.trace import (
    CapturedUpdate,
    alternate_shape,
    canonical_shape,
    capture,
    capture_count,
    clear_capture_cache,
    hyper_values,
    init_states,
    live_inputs,
    run_captured,
    scalar_dtype,
)

__all__ = [
    "LIVE",
    "CapturedUpdate",
    "HyperInput",
    "alternate_shape",
    "canonical_shape",
    "capture",
    "capture_count",
    "check_signatures",
    "clear_capture_cache",
    "hyper_values",
    "init_states",
    "live_inputs",
    "run_captured",
    "scalar_dtype",
]
