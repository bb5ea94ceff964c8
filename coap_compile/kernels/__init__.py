"""Generated Triton kernels for the projected (COAP) update, their eager twins and custom ops.

Importable without Triton: :data:`HAS_TRITON` (from :mod:`.env`) says whether it is installed; the eager
functions and the custom ops (which then always take the eager path) work either way. See :mod:`.launch`
for the math, :mod:`.codegen` for the kernel templates and traffic model, :mod:`.ops` for
``torch.ops.coap_compile``, :mod:`.variants` / :mod:`.stored` for the storage variants of K1 (bf16 and
int8 states), :mod:`.grouped` for the grouped K1/K2 (one launch each over equal-shape members),
:mod:`.counts` for counting launches.
"""

from __future__ import annotations

from coap_compile.kernels.counts import count_launches
from coap_compile.kernels.env import HAS_TRITON
from coap_compile.kernels.launch import (
    INPUT_PRECISIONS,
    eager_project_back_update_,
    eager_projected_update_,
    epilogue_decay,
    fused_projected_update_,
    project_back_update_,
    projected_lowrank_,
)
from coap_compile.kernels.ops import (
    fused_projected_update,
    get_epilogue,
    get_kernel,
    grouped_fused_projected_update,
    project_back_update,
    register_epilogue,
    register_variant,
)
from coap_compile.kernels.variants import FP32, KernelVariant, StateMode, mode_of

__all__ = [
    "FP32",
    "HAS_TRITON",
    "INPUT_PRECISIONS",
    "KernelVariant",
    "StateMode",
    "count_launches",
    "eager_project_back_update_",
    "eager_projected_update_",
    "epilogue_decay",
    "fused_projected_update",
    "fused_projected_update_",
    "get_epilogue",
    "get_kernel",
    "grouped_fused_projected_update",
    "mode_of",
    "project_back_update",
    "project_back_update_",
    "projected_lowrank_",
    "register_epilogue",
    "register_variant",
]
