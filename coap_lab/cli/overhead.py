"""``bench step`` overhead rows: a whole model's ``opt.step()`` and the fixed cost per matrix (issue 14).

Two cases, each timed for every optimizer in one run, interleaved:

* ``demo``: the demo LM (:func:`~coap_lab.models.demo_config`, 3.3 M parameters, 29 projected
  weight matrices at ``rank_ratio=4``, the quality benchmark's setting), every parameter with a fixed
  seeded gradient;
* ``demo-train``: the same model and optimizers, each timed ``opt.step()`` preceded (untimed) by
  ``zero_grad`` and a forward/backward of the demo's loss on a fixed seeded batch (8 sequences of 129
  bytes, the demo's batch): the step sees the caches and the allocator as a training loop leaves them.
  Measured at f9e0ae3 (2-core Xeon): in the step-only loop COAP's fused int8 step took 606 minor page
  faults per step and its eager fp32 step 959, in the training loop 120 and 1 (glibc returns the freed
  top of its heap to the system after a step's temporaries are freed, unless larger allocations, such
  as the activations, have raised its thresholds), and torch's in-place AdamW allocates nothing either
  way; so ``demo`` alone overstates what a step costs in training;
* ``64x64x16``: sixteen independent 64×64 weights at rank 16, where the fixed cost per matrix
  (Python, dispatch, small-kernel launches) dominates; ``per_matrix_us`` is the step over 16.

Optimizers: ``adamw`` (torch's defaults for the device: on the CPU the single-tensor path),
``adamw-foreach``, ``coap`` (grouped update, the default), ``coap-per-matrix`` (``grouped=False``),
and ``galore-torch``/``apollo-torch`` when installed. Timing: ``rounds`` rounds; in each, every
optimizer takes ``warmup`` untimed then ``repeat`` timed steps (``time.perf_counter`` around
``opt.step()``; CUDA: synchronized); the row is the median and 20/80 % quantiles of all timed samples.
An optimizer's steps continue across rounds, so the samples include the occasional refresh (one step in
``update_interval``); the median is the steady step. ``vs_adamw`` and ``vs_galore_torch`` are ratios of
medians measured in the same run; ``gemm-floor`` is timed with them as one more "optimizer": the two
projection GEMMs (``X P``, ``W += D Pᵀ``) of every projected matrix, spread over the member pool as COAP's
small CPU step spreads them (:class:`_Floor`, ``coap_compile.runtime.threads``), and ``vs_floor`` is
each row's median over that floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from coap_compile.runtime.threads import intra_op_threads, run_members
from coap_lab.cli.floor import floor_threads, gemm_floor_fn
from coap_lab.cli.optimizers import BASELINES, EXTERNAL, availability, build_optimizer
from coap_lab.cli.timing import quantiles_ms, timed_samples

__all__ = ["OVERHEAD_CASES", "OVERHEAD_OPTIMIZERS", "build_case", "overhead_rows", "training_pass"]

OVERHEAD_CASES = ("demo", "demo-train", "64x64x16")
OVERHEAD_OPTIMIZERS = ("adamw", "adamw-foreach", "coap", "coap-per-matrix", "galore-torch", "apollo-torch")


def build_case(case: str, device: str, seed: int = 0) -> tuple[nn.Module, dict[str, float]]:
    """The model of ``case`` with fixed seeded gradients, and its rank arguments."""
    gen = torch.Generator().manual_seed(seed)
    if case in ("demo", "demo-train"):
        from coap_lab.models import build_llama, demo_config

        model, ranks = build_llama(demo_config(), seed=seed), {"rank_ratio": 4.0}
    elif case == "64x64x16":
        model, ranks = nn.Sequential(*(nn.Linear(64, 64, bias=False) for _ in range(16))), {"rank": 16}
    else:
        raise ValueError(f"unknown overhead case {case!r}; choose from {', '.join(OVERHEAD_CASES)}")
    model = model.to(device)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return model, ranks


class _Floor:
    """``step()`` = the two projection GEMMs of every matrix COAP projects in ``case`` (rank ratio 4 or the
    case's rank): :func:`coap_lab.cli.floor.gemm_floor_fn` per matrix, the model's matmul floor."""

    def __init__(self, case: str, device: str) -> None:
        from coap_lab.cli.optimizers import projected_linear_weights

        model, ranks = build_case(case, device)
        shapes = dict(model.named_parameters())
        chosen = projected_linear_weights(model, ranks.get("rank"), ranks.get("rank_ratio"))
        self.fns = [gemm_floor_fn(*shapes[n].shape, r, device) for n, r in chosen.items()]
        dims = [(*shapes[n].shape, r) for n, r in chosen.items()]
        self.threads = floor_threads(dims) if device == "cpu" else None

    def step(self) -> None:
        with intra_op_threads(self.threads):  # the model's thread count in COAP's step
            run_members(self.fns)  # and its member pool (one task per matrix), as COAP's step runs them


def training_pass(case: str, model: nn.Module) -> Callable[[], None] | None:
    """``demo-train``: ``zero_grad`` and a forward/backward of the demo's loss on a fixed seeded batch
    (module docstring), else None."""
    if case != "demo-train":
        return None
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (8, model.config.max_seq_len + 1),
                        generator=torch.Generator().manual_seed(1)).to(device)  # fmt: skip

    def run() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(ids).backward()

    return run


def overhead_rows(
    cases: Sequence[str] = OVERHEAD_CASES,
    optimizers: Sequence[str] = OVERHEAD_OPTIMIZERS,
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 20,
    rounds: int = 3,
) -> list[dict[str, object]]:
    """One row per (case, available optimizer); see the module docstring."""
    avail = availability([n for n in optimizers if n in EXTERNAL])
    names = [n for n in optimizers if avail[n] is None]
    rows: list[dict[str, object]] = []
    for case in cases:
        opts, counts = {"gemm-floor": _Floor(case, device)}, {"gemm-floor": None}
        passes = {"gemm-floor": training_pass(case, build_case(case, device)[0])}  # the same caches
        for name in names:
            model, ranks = build_case(case, device)
            opt = build_optimizer(name, model, lr=1e-4, **({} if name in BASELINES else ranks))
            passes[name] = training_pass(case, model)
            if passes[name] is not None:
                passes[name]()
            opt.step()  # the initialising step (states, first P) is not timed
            opts[name] = opt
            counts[name] = len(opt.projected_parameters()) if hasattr(opt, "projected_parameters") else None
        sync = torch.cuda.synchronize if device.startswith("cuda") else None
        samples: dict[str, list[float]] = {n: [] for n in opts}
        for _ in range(rounds):
            for name in opts:
                samples[name] += timed_samples(opts[name].step, warmup, repeat, sync, passes[name])
        med = {n: quantiles_ms(s) for n, s in samples.items()}
        for name in opts:
            m, p20, p80 = med[name]
            rows.append(
                {
                    "case": case,
                    "optimizer": name,
                    "median_ms": m,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "per_matrix_us": 1e3 * m / 16 if case == "64x64x16" else None,
                    "vs_adamw": m / med["adamw"][0] if "adamw" in med else None,
                    "vs_galore_torch": m / med["galore-torch"][0] if "galore-torch" in med else None,
                    "vs_floor": m / med["gemm-floor"][0],
                    "projected_matrices": counts[name],
                    "device": device,
                    "threads": torch.get_num_threads(),
                }
            )
        del opts
    return rows
