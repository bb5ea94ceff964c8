"""The fused CPU lowering: a group's load → derived update → store as one Inductor-generated C++ loop.

For a chunk of ``K`` members of a matrix group (or one matrix, ``K = 1``) with stacked states
(:mod:`.stacked`), the elementwise part of a step is the pure function :func:`lowrank_stored`::

    s = load(parts)                                    (float32; bf16 upcast, int8 value[code]·a)
    (decay, D, s', k') = lowrank(X̃, s, k, lr, h)      (the compiled program's derived update, K×M×r)
    parts' = store(s'),  ema' = store(lerp(ema, X̃, 1 − β))   (bf16 stochastic rounding, int8 codes/scales)

Eagerly that is dozens of torch ops per state (a counter hash of ~15 int64 ops per element for bf16, a
7–8 level code search for int8); :func:`elementwise` runs it instead as ``torch.compile(fn,
dynamic=False, fullgraph=True)`` of that same Python function (Inductor's C++/OpenMP backend on CPU),
which fuses the loads, the update and the stores into a few loops over the stacked states. The GEMMs
(``X P``, ``D Pᵀ``) stay outside (the BLAS is already at its floor there).

**Runtime inputs.** ``k``, ``lr`` and every hyperparameter are 0-d float64 tensor inputs of the compiled
function, so schedulers and edited betas never recompile (``tests/test_inductor_lowering.py`` counts
Dynamo's compiled graphs). **Cache.** One compiled function per *signature* — the program, the states'
stacked specs (storage, precision, shapes, dtypes), the EMA coefficient, and the shapes/dtypes of ``X̃``
and of every stacked tensor — held in-process in :data:`_CACHE`; each signature gets its own code object
(:func:`_bound`), so Dynamo's per-code recompile limit never drops a signature to its slow path.
Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) makes a second process's compile "warm".
**Unavailable** (no C++ compiler, an Inductor error): the first failure emits one ``RuntimeWarning``
naming the error, and every later call of this process runs :func:`lowrank_stored` eagerly (the same
results bit for bit as ``backend="eager"``).

**Per-step scalars outside the loop** (:mod:`.scalarsplit`). The program's step/lr/hyperparameter-only
nodes (bias corrections) run eagerly before the call and enter it as 0-d inputs; compiled inline, they
cost two ``std::pow`` and a ``std::sqrt`` per 16-lane vector. Demo LM fp32 groups, the whole call per
step with warm caches, 1 thread (2-core Xeon, two alternating runs each): 17×256×64 0.84-1.00 → 0.55-0.62
ms, 12×688×64 1.69-2.86 → 1.07-1.45 ms (the compiled kernel alone: 0.57 ms, 1.1 ns per element; the rest
is the call's fixed cost, ~0.25 ms: Dynamo's guards, the wrapper, the eager scalars).

**On the member pool** (:mod:`coap_compile.runtime.threads`) each fused loop is one task of the step's batch,
beside the other groups' chunks and its own run's member GEMMs (:mod:`coap_compile.runtime.chunks`). The loops
are compiled with ``cpp_wrapper`` (Inductor's C++ wrapper, which releases the GIL for the whole compiled call;
its default Python wrapper calls kernels that keep it), so two fused runs, or a fused run and another task's
torch ops, overlap. Demo LM, 2 threads, two runs each, int8 / fp32 COAP: 1.56-1.61× with ``cpp_wrapper`` and
fused runs in the batch, 2.24× with the Python wrapper and each fused run alone in the stepping thread (its
member GEMMs on the pool), bf16 0.95-1.06× against 1.07-1.32×; the fused fp32 step 1.87-2.03× AdamW against
1.92-2.27×. Compile cost with it, cold / warm (``benchmarks/inductor_compile.py``, commit ae47d96): fp32 14.5
/ 3.3 s, bf16 82.1 / 4.7 s, int8 71.0 / 6.3 s. Tried and not kept: splitting each fused run into two tasks
(int8 / fp32 1.51-1.62×, within the noise of the above, and a 17-member group would compile two signatures);
``cpp.threads = 2`` (OpenMP inside the loop, Python wrapper: int8 / fp32 1.71-1.93×; it brings back the
parallel regions that collapse under contention).

**Exactness.** Loads, the integer hash, the bf16 rounding, the int8 code search and the dequantization
are exact operations, so Inductor reproduces them bit for bit given the same float32 inputs. The derived
update's arithmetic may differ in the last bit: Inductor evaluates ``lerp`` as ``a + w·(b − a)`` where
torch's CPU kernel switches formula at ``w ≥ 0.5``, may contract ``a·b + c`` and computes ``x ** k``
scalars in its own order. The bound checked (hypothesis, float64 oracle) is that every state and ``D``
stays within ``8·2⁻²⁴`` relative (plus a 1e-30 absolute floor) of float64 where the eager lowering is —
i.e. both lowerings are float32-accurate versions of the same update; measured states differ from eager
by at most 1 ulp, stored bf16/int8 codes then differ only where that ulp crosses a rounding threshold.

**Decision: ``backend="auto"`` keeps the eager lowering on CPU.** Measured on this project's 2-core Xeon VM
(``benchmarks/results/inductor_compile.json``, ``fused_step/step_overhead_cpu.csv``): the demo LM's
**cold** compile (every signature of its first step) took 12 s for fp32 states (2 signatures), 95 s for
bf16 (4) and 83 s for int8 (3) at load ≈ 1 (commit fcefd7b; an earlier int8 graph took 286 s at load
9.7; 14.5, 82 and 71 s with ``cpp_wrapper`` at ae47d96), and **warm** (Inductor's on-disk cache, a second
process) 3–6 s. The fused step saves about 54 ms
(bf16) and 133 ms (int8) per step against the eager grouped lowering on the quiet machine (78 → 24 ms and
189 → 56 ms, ``fused_step/``, measured before the int8 changes of ``fused_step_int8/``; 80–160 and 190–410 ms
under load), about nothing for fp32. A cold compile is paid back after about 1 800 bf16 or 600 int8 steps;
a short run (the test suite, a smoke test, a notebook) loses. So ``backend="inductor"`` is opt-in, and
tests compile a few tiny signatures only (``tests/test_inductor_lowering.py``, and two in
``tests/test_member_pool.py``).
"""

from __future__ import annotations

import threading
import time
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .eager import run_lowrank
from .scalarsplit import split_scalars
from .stacked import StackedSpec, load_stacked, stored_stacked

__all__ = ["STATS", "elementwise", "lowrank_stored", "reset", "uses_param"]

#: compiled signatures: signature → compiled function (or None after a failure of that signature).
_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
#: counters for tests and benchmarks: ``compiles`` (signatures compiled), ``compile_s`` (seconds spent in
#: first calls), ``fallbacks`` (calls that ran eagerly because compilation is unavailable).
STATS = {"compiles": 0, "compile_s": 0.0, "fallbacks": 0, "disabled": None}


def reset() -> None:
    """Forget every compiled signature and the unavailability flag (tests)."""
    with _LOCK:
        _CACHE.clear()
        STATS.update(compiles=0, compile_s=0.0, fallbacks=0, disabled=None)


def uses_param(program) -> bool:
    """Whether the derived update reads the weight itself (then it cannot run on stacked members)."""
    return any(n.op == "placeholder" and n.name == "param" and n.users for n in program.lowrank.graph.nodes)


def lowrank_stored(
    program,
    specs: Sequence[StackedSpec],
    ema: tuple[StackedSpec, float] | None,
    param: Tensor | None,
    x_proj: Tensor,
    parts: dict[str, Tensor],
    k: Tensor,
    lr: Tensor,
    hypers: Sequence[Tensor],
    hoisted: Sequence[Tensor] | None = None,
) -> tuple[Tensor | float, Tensor, Tensor, dict[str, Tensor]]:
    """``(decay, D, k', new parts)`` of the stacked chunk (module docstring); writes nothing. A state
    stored fp32 that the program returns unchanged is left out of ``new parts``. ``hoisted``: the
    program's per-step scalars, computed by the caller (:mod:`.scalarsplit`; the compiled loop)."""
    olds = [load_stacked(spec, parts) for spec in specs]
    if hoisted is None:
        decay, delta, new_states, new_step = run_lowrank(program, param, x_proj, olds, k, lr, hypers)
    else:
        body = split_scalars(program.lowrank, len(olds)).body
        decay, delta, *rest = body(param, x_proj, *olds, k, lr, *hypers, *hoisted)
        new_states, new_step = list(rest[:-1]), rest[-1]
    out: dict[str, Tensor] = {}
    for spec, old, value in zip(specs, olds, new_states):
        if spec.precision == "fp32" and value is old:
            continue
        out.update(stored_stacked(spec, parts, value))
    if ema is not None:
        spec, beta = ema
        out.update(stored_stacked(spec, parts, torch.lerp(load_stacked(spec, parts), x_proj, 1.0 - beta)))
    return decay, delta, new_step, out


#: Inductor options of every fused loop: ``assert_indirect_indexing`` off. Every gather index of
#: :mod:`.stacked` is in range by construction (codes + offset < 256, clamped cells, ``j ≤ n`` into the
#: ``n + 2`` levels, block indices from ``arange``), and the per-vector bounds check cost about a fifth
#: of a fused int8 store (12×688×64, 1 thread, 2-core Xeon: 7.6 → 5.8 ms stochastic, 3.9 → 3.4 ms
#: nearest). ``cpp_wrapper``: the compiled call runs without the GIL (module docstring, member pool).
_OPTIONS = {"assert_indirect_indexing": False, "cpp_wrapper": True}
#: Added when a state is int8: ``realize_reads_threshold = 2`` (default 4), so an intermediate read by
#: two loops is stored once instead of recomputed in each. The code search (a bit cast, two table
#: gathers) feeds the stochastic bracket, the rounding test and the sign pass, which Inductor puts in
#: different loops (the rounding bits are indexed per member, the rest per flat row); recomputed there,
#: it ran three times per state. Demo LM, profiled fused-group time per step (1 thread, 10 steps, 2-core
#: Xeon at load ≈ 1): int8 41 ms → 23–29 ms. Not for bf16/fp32: there it stores cheap intermediates
#: (bf16 8.0 / 7.7 ms → 13.9 / 12.7 ms in two runs each) and fp32 did not change beyond noise. Storing a
#: float32 intermediate does not change its value (the results are the same bits,
#: ``tests/test_inductor_lowering.py``).
_INT8_OPTIONS = {**_OPTIONS, "realize_reads_threshold": 2}


def _bound(program, specs, ema):
    """:func:`lowrank_stored` of one program and stacked layout, with its own code object (Dynamo keeps
    compiled entries per code object: a shared one would hit its recompile limit across signatures)."""

    def fused(x_proj, parts, k, lr, hypers, hoisted):
        return lowrank_stored(program, specs, ema, None, x_proj, parts, k, lr, hypers, hoisted)

    return types.FunctionType(
        fused.__code__.replace(), fused.__globals__, fused.__name__, fused.__defaults__, fused.__closure__
    )


def _torch_compile(fn, specs: Sequence[StackedSpec], ema: tuple[StackedSpec, float] | None):
    int8 = any(sp.precision == "int8" for sp in (*specs, *(ema[:1] if ema else ())))
    return torch.compile(fn, dynamic=False, fullgraph=True, options=_INT8_OPTIONS if int8 else _OPTIONS)


def _signature(program, specs, ema, x_proj, parts) -> tuple:
    return (
        id(program), tuple(specs), ema, tuple(x_proj.shape), x_proj.dtype, x_proj.device.type,
        tuple((key, tuple(t.shape), t.dtype) for key, t in sorted(parts.items())),
    )  # fmt: skip


def _unavailable(exc: BaseException) -> None:
    STATS["disabled"] = f"{type(exc).__name__}: {exc}"[:400]
    warnings.warn(
        "coap_compile: backend='inductor' could not compile the fused CPU lowering "
        f"({STATS['disabled']}); the eager lowering runs instead for the rest of this process "
        "(same results as backend='eager', slower for bf16/int8 states)",
        RuntimeWarning,
        stacklevel=4,
    )


def elementwise(
    fused: bool,
    program,
    specs: Sequence[StackedSpec],
    ema: tuple[StackedSpec, float] | None,
    param: Tensor | None,
    x_proj: Tensor,
    parts: dict[str, Tensor],
    inputs: tuple[Tensor, Tensor, Sequence[Tensor]],
    hoisted: Sequence[Tensor] | None = None,
) -> tuple[Tensor | float, Tensor, Tensor, dict[str, Tensor]]:
    """:func:`lowrank_stored`, compiled when ``fused`` (module docstring), else eager. ``param`` must be
    None when fused (the caller checks :func:`uses_param`). ``hoisted``: the program's per-step scalars
    for ``inputs`` (:mod:`.scalarsplit`), when the caller computed them once for several chunks."""
    k, lr, hypers = inputs
    if not fused or STATS["disabled"] is not None:
        if fused:
            STATS["fallbacks"] += 1
        return lowrank_stored(program, specs, ema, param, x_proj, parts, k, lr, hypers, hoisted)
    sig = _signature(program, specs, ema, x_proj, parts)
    entry = _CACHE.get(sig)
    first = entry is None
    if first:
        entry = (program, _torch_compile(_bound(program, tuple(specs), ema), specs, ema))
    t0 = time.perf_counter()
    try:
        if hoisted is None:
            hoisted = split_scalars(program.lowrank, len(specs)).scalars(k, lr, *hypers)
        out = entry[1](x_proj, parts, k, lr, list(hypers), list(hoisted))
    except Exception as exc:
        _unavailable(exc)
        STATS["fallbacks"] += 1
        return lowrank_stored(program, specs, ema, param, x_proj, parts, k, lr, hypers, hoisted)
    if first:
        with _LOCK:
            _CACHE[sig] = entry
            STATS["compiles"] += 1
            STATS["compile_s"] += time.perf_counter() - t0
    return out
