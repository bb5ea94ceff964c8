"""``torch.ops.coap_compile`` custom ops: opcheck, torch.compile tracing, dispatch and fallback."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import assert_rel_close, randn
from kernel_epilogues import adamw, initial_states

from coap_compile.ir import evaluate_scalars
from coap_compile.kernels import launch, ops
from coap_compile.kernels.launch import eager_project_back_update_, eager_projected_update_

EP = adamw()
EID = ops.register_epilogue(EP)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")
fused_op = torch.ops.coap_compile.fused_projected_update
back_op = torch.ops.coap_compile.project_back_update


def problem(seed: int, m: int = 24, n: int = 16, r: int = 4, transposed: bool = False, t: float = 3.0):
    """(w, g, p, states, c) for the op: ``w``/``g`` are n×m when ``transposed`` (a "left" matrix)."""
    shape = (n, m) if transposed else (m, n)
    w, g = randn(seed, *shape), randn(seed + 1, *shape)
    p = torch.linalg.qr(randn(seed + 2, n, r, dtype=torch.float64))[0].float()
    c = evaluate_scalars(EP, torch.tensor(t), torch.tensor(1e-2))
    return w, g, p, initial_states(EP, m, r, seed + 3), c


def expected(w, g, p, states, c, transposed=False):
    w2, st2 = w.clone(), [s.clone() for s in states]
    eager_projected_update_(w2.t() if transposed else w2, g.t() if transposed else g, p, st2, c, EP)
    return w2, st2


def assert_same(w, states, w_ref, st_ref, tol=2e-5):
    assert_rel_close(w, w_ref, tol, "w")
    for s, s_ref in zip(states, st_ref):
        assert_rel_close(s, s_ref, tol, "state")


@pytest.fixture(autouse=True)
def _fresh_fallback_state():
    ops.reset_fallback_warnings()
    yield
    ops.reset_fallback_warnings()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_interpreter)])
def test_opcheck_fused(backend, transposed):
    w, g, p, states, c = problem(0, transposed=transposed)
    torch.library.opcheck(fused_op.default, (w, g, p, states, c, EID, transposed, backend, "ieee"))


@pytest.mark.parametrize("with_decay", [False, True])
def test_opcheck_project_back(with_decay):
    w, _, p, _, c = problem(1, transposed=True)
    d = randn(9, 24, 4)
    torch.library.opcheck(
        back_op.default, (w, d, p, c[:1] if with_decay else None, -0.5, True, "auto", "ieee")
    )


@needs_interpreter
@pytest.mark.parametrize("transposed", [False, True])
def test_dispatch(monkeypatch, transposed):
    """``auto`` on CPU runs the eager twin; ``triton`` launches the kernels; both give the same result."""
    launches = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda *a, **kw: launches.append(a[0]) or real(*a, **kw))
    w, g, p, states, c = problem(2, transposed=transposed)
    w_ref, st_ref = expected(w, g, p, states, c, transposed)
    for backend, n_launches in (("auto", 0), ("eager", 0), ("triton", 2)):
        w2, st2 = w.clone(), [s.clone() for s in states]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback allowed here
            ops.fused_projected_update(w2, g, p, st2, c, EID, transposed=transposed, backend=backend)
        assert len(launches) == n_launches, backend
        launches.clear()
        assert_same(w2, st2, w_ref, st_ref)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "coap"])
@pytest.mark.parametrize("op_backend", ["auto", pytest.param("triton", marks=needs_interpreter)])
def test_torch_compile_matches_eager(compile_backend, op_backend, monkeypatch):
    import coap_compile.backend  # noqa: F401  (registers "coap")

    # A kernel that fails falls back to the eager twin: make that an error and count the real launches,
    # so the "triton" case cannot pass by comparing eager with eager.
    launches = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda *a, **kw: (real(*a, **kw), launches.append(a[0])))

    def step(w, g, p, m, v, c):
        fused_op(w, g * 1.0, p, [m, v], c, EID, True, op_backend, "ieee")  # transposed ("left") weight
        return w.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    w, g, p, states, c = problem(3, transposed=True)
    w_c, st_c = w.clone(), [s.clone() for s in states]
    for t in (1.0, 2.0):
        c = evaluate_scalars(EP, torch.tensor(t), torch.tensor(1e-2))
        w, states = expected(w, g, p, states, c, transposed=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="coap_compile: falling back")
            total = compiled(w_c, g, p, *st_c, c)
        assert_same(w_c, st_c, w, states)
        assert torch.allclose(total, w_c.sum())
    assert len(launches) == (4 if op_backend == "triton" else 0)  # K1 + K2 per call


def test_project_back_under_compile():
    w, _, p, _, c = problem(4)
    d = randn(5, 24, 4)
    w_ref = w.clone()
    eager_project_back_update_(w_ref, d, p, c[0], 2.0)

    def fn(w, d, p, dec):
        back_op(w, d, p, dec, 2.0, False, "auto", "ieee")

    torch.compile(fn, fullgraph=True, backend="aot_eager")(w, d, p, c[:1])
    assert_rel_close(w, w_ref, 1e-6, "w")


def _fallback_messages(caught) -> list[str]:
    return [str(x.message) for x in caught if "falling back" in str(x.message)]


def test_fallback_without_interpreter_warns_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w, g, p, states, c = problem(6)
    w_ref, st_ref = expected(w, g, p, states, c)
    w_ref, st_ref = expected(w_ref, g, p, st_ref, c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ops.fused_projected_update(w, g, p, states, c, EID, backend="triton")
    assert len(msgs := _fallback_messages(caught)) == 1 and "TRITON_INTERPRET" in msgs[0], msgs
    assert_same(w, states, w_ref, st_ref)


@needs_interpreter
@pytest.mark.parametrize("failing", ["projected_lowrank_", "project_back_update_"])
def test_kernel_failure_falls_back_once_and_stays_correct(monkeypatch, failing):
    """A failing K1 leaves nothing mutated; a failing K2 runs after K1 (states updated once)."""
    calls = []

    def boom(*a, **kw):
        calls.append(1)
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(launch, failing, boom)
    w, g, p, states, c = problem(7)
    w_ref, st_ref = expected(w, g, p, states, c)
    w_ref, st_ref = expected(w_ref, g, p, st_ref, c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ops.fused_projected_update(w, g, p, states, c, EID, backend="triton")
    msgs = _fallback_messages(caught)
    assert len(msgs) == 1 and "simulated compile failure" in msgs[0], msgs
    assert len(calls) == 1, "a failed kernel must not be retried"
    assert_same(w, states, w_ref, st_ref)


def test_errors():
    w, g, p, states, c = problem(8)
    with pytest.raises(KeyError, match="register_epilogue"):
        fused_op(w, g, p, states, c, "ep_unknown", False, "auto", "ieee")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_op(w, g, p, states, c, EID, False, "cuda-graphs", "ieee")
    with pytest.raises(ValueError, match="input_precision must be one of"):
        fused_op(w, g, p, states, c, EID, False, "triton", "fp8")
    with pytest.raises(ValueError, match="p has shape"):
        fused_op(w, g, p, states, c, EID, True, "auto", "ieee")  # transposed flag on a tall matrix
    assert ops.register_epilogue(adamw()) == EID  # the id is a content hash


@pytest.mark.cuda
def test_cuda_op_uses_triton_and_compiles(monkeypatch):
    import coap_compile.backend  # noqa: F401

    launches = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda *a, **kw: launches.append(a[0]) or real(*a, **kw))
    w, g, p, states, c = (t.cuda() if isinstance(t, torch.Tensor) else t for t in problem(9, 256, 128, 32))
    states = [s.cuda() for s in states]
    w_ref, st_ref = expected(w, g, p, states, c)
    compiled = torch.compile(
        lambda *a: fused_op(*a, EID, False, "auto", "ieee"), backend="coap", fullgraph=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled(w, g, p, states, c)
    assert len(launches) == 2
    assert_same(w.cpu(), [s.cpu() for s in states], w_ref.cpu(), [s.cpu() for s in st_ref])


_NO_TRITON_SCRIPT = """
import sys, warnings
sys.modules["triton"] = None  # as if Triton were not installed
import torch
import coap_compile.kernels as k
from kernel_epilogues import adamw
assert not k.HAS_TRITON
ep = adamw()
m, n, r = 12, 8, 3
w, g, p = torch.randn(m, n), torch.randn(m, n), torch.linalg.qr(torch.randn(n, r))[0]
st, c = [torch.zeros(m, r), torch.zeros(m, r)], torch.tensor([0.99, 1e-2, 1e-8])
w_ref, st_ref = w.clone(), [s.clone() for s in st]
k.eager_projected_update_(w_ref, g, p, st_ref, c, ep)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    k.fused_projected_update(w, g, p, st, c, ep, backend="triton")
assert torch.allclose(w, w_ref) and all(torch.allclose(a, b) for a, b in zip(st, st_ref))
assert [str(x.message) for x in caught if "not installed" in str(x.message)], caught
print("ok")
"""


def test_importable_and_usable_without_triton():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    out = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
