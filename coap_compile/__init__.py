"""coap_compile: compile torch.optim optimizers into memory-efficient COAP optimizers.

``optimize(model, base_optim=torch.optim.AdamW, rank=256, lr=1e-3)`` captures the base optimizer's
per-parameter update as an FX graph, rewrites it so that each weight matrix's optimizer state lives in
a low-rank space refreshed by COAP (correlation-aware projection, arXiv 2412.00071), and lowers it to
eager torch (CPU) or generated Triton kernels (CUDA).

``torch.compile(step, backend="coap")`` finds the backend through the package's
``torch_dynamo_backends`` entry point (:mod:`.backend_entry`): importing this package imports no
Dynamo or Inductor.
"""

from .api import explain, optimize
from .errors import NonFiniteGradientError, UnsupportedOptimizerError
from .projection import CoapPolicy, FixedProjection, FloraPolicy, GaLorePolicy, ProjectionPolicy
from .runtime.inbackward import step_in_backward
from .runtime.optimizer import CoapOptimizer

__version__ = "0.1.0"

__all__ = [
    "CoapOptimizer",
    "CoapPolicy",
    "FixedProjection",
    "FloraPolicy",
    "GaLorePolicy",
    "NonFiniteGradientError",
    "ProjectionPolicy",
    "UnsupportedOptimizerError",
    "explain",
    "optimize",
    "step_in_backward",
]
