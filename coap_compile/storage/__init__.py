"""Optimizer-state storage precisions: ``fp32``, ``bf16`` (round-to-nearest or stochastic) and ``int8``
(blockwise dynamic quantization), plus the Triton helper sources for the generated kernels.

See :mod:`.base` for the interface, the registry and the key scheme (:func:`logical_name`,
:func:`is_companion`, :func:`is_replicated_key`, :func:`logical_layout`: what a state-dict key is, derived
from the registered classes), :mod:`.bf16`, :mod:`.int8` and :mod:`.codemap` for the formats, their error
bounds and the measurements behind their defaults, and :mod:`.triton_src` for the kernel-side helpers.
"""

from __future__ import annotations

from .base import (
    KINDS,
    FP32Storage,
    StateStorage,
    check_kind,
    convert_state,
    get_storage,
    is_companion,
    is_replicated_key,
    load_any,
    logical_layout,
    logical_name,
    register_storage,
    storage_class_of,
    storage_names,
    stored_precision,
)
from .bf16 import Bf16Storage
from .codemap import CodeMap, code_map
from .int8 import (
    BLOCK_SHAPES,
    BlockLayout,
    Int8Storage,
    block_layout,
    check_block_size,
    check_blocks,
    kernel_block_m,
)

__all__ = [
    "KINDS",
    "Bf16Storage",
    "BlockLayout",
    "CodeMap",
    "FP32Storage",
    "Int8Storage",
    "StateStorage",
    "BLOCK_SHAPES",
    "block_layout",
    "check_blocks",
    "check_block_size",
    "check_kind",
    "code_map",
    "convert_state",
    "get_storage",
    "is_companion",
    "is_replicated_key",
    "kernel_block_m",
    "load_any",
    "logical_layout",
    "logical_name",
    "register_storage",
    "storage_class_of",
    "storage_names",
    "stored_precision",
]
