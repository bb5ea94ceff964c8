"""The ``"coap"`` torch.compile backend and its post-grad pass."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch.fx.experimental.proxy_tensor import make_fx

import coap_compile.backend as backend
from coap_compile.backend import CoapGraphPass, scalar_cse


@pytest.fixture
def fresh_compile():
    """No Dynamo/FX-graph cache hits, so every compile runs (and counts) our pass."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def test_backend_is_registered_idempotently():
    assert "coap" in torch._dynamo.list_backends()
    backend._register()  # a second registration (e.g. a re-import) is a no-op, not an error
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("coap") is backend.coap_backend


_LIGHT_IMPORT = """
import sys, torch
import coap_compile
heavy = sorted(m for m in sys.modules if m.split(".")[:2] in (["torch", "_dynamo"], ["torch", "_inductor"]))
assert not heavy, heavy[:5]
assert "coap_compile.backend" not in sys.modules
model = torch.nn.Linear(8, 8)
opt = coap_compile.optimize(model, base_optim=torch.optim.AdamW, rank=2, lr=1e-2)
model(torch.randn(4, 8)).square().sum().backward()
opt.step()  # (torch.optim's own add_param_group imports Dynamo at the first construction: torch's cost)
assert "coap_compile.backend" not in sys.modules
"""

_ENTRY_POINT = """
import sys, torch
from torch._dynamo.backends.registry import lookup_backend
fn = torch.compile(lambda x: torch.sin(x) * 2.0, backend="coap")
assert torch.allclose(fn(torch.ones(4)), torch.sin(torch.ones(4)) * 2.0)
import coap_compile.backend as backend  # imported by the first compilation, registered once
assert "coap_compile.backend" in sys.modules
from coap_compile.backend_entry import coap
assert lookup_backend("coap") in (backend.coap_backend, coap)
"""


@pytest.mark.parametrize("script", [_LIGHT_IMPORT, _ENTRY_POINT], ids=["light-import", "entry-point"])
def test_import_is_light_and_the_backend_is_found_by_its_entry_point(script):
    """``import coap_compile`` imports no Dynamo/Inductor, nor does an eager step import the backend;
    ``backend="coap"`` resolves through the ``torch_dynamo_backends`` entry point without importing
    ``coap_compile`` first (fresh interpreters: this process has Dynamo loaded already)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_pass_uuid_is_stable():
    a, b = CoapGraphPass(), CoapGraphPass()
    assert a.uuid() == b.uuid() == pickle.loads(pickle.dumps(a)).uuid()
    own = hashlib.sha256(Path(backend.__file__).read_bytes() + backend._version().encode()).hexdigest()
    assert a.uuid() == own
    assert CoapGraphPass([lambda g: None]).uuid() is None  # an unhashable user pass disables FX caching
    assert CoapGraphPass([b]).uuid() == (own, own)


def _scalars(a, b, x):
    s = a * b + b * a  # commutative duplicate: merged
    s = s + (a + b) * (b + a)  # merged
    s = s + a * 0.0 + a * -0.0  # distinct constants: kept
    t = x * 2.0 + x * 2.0  # not 0-d: left to Inductor
    a.add_(1.0)  # mutation: a barrier
    return s + a * b, t  # a*b after the mutation is recomputed


def test_scalar_cse_merges_commutative_duplicates_only():
    args = (torch.tensor(-2.0), torch.tensor(3.0), torch.randn(4))
    gm = make_fx(_scalars, tracing_mode="fake")(*(t.clone() for t in args))
    n_before = len(gm.graph.nodes)
    assert scalar_cse(gm.graph) == 2
    gm.recompile()
    assert len(gm.graph.nodes) == n_before - 2
    want, got = _scalars(*(t.clone() for t in args)), gm(*(t.clone() for t in args))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scalar_cse_keeps_random_ops():
    gm = make_fx(lambda: torch.rand(()) + torch.rand(()), tracing_mode="fake")()
    assert scalar_cse(gm.graph) == 0


def test_pass_runs_inside_torch_compile(fresh_compile):
    def f(lr, step, x):
        return x * (lr * step) + x / (step * lr)

    before = backend.PASS_STATS["scalar_cse_removed"]
    args = (torch.tensor(0.1), torch.tensor(3.0), torch.randn(5))
    out = torch.compile(f, backend="coap")(*args)
    torch.testing.assert_close(out, f(*args))
    assert backend.PASS_STATS["scalar_cse_removed"] > before


def _model_and_opt(lr: torch.Tensor):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False)


def test_compiled_train_step_matches_eager(fresh_compile):
    data = [(torch.randn(32, 8), torch.randn(32, 4)) for _ in range(3)]
    results = []
    for compiled in (False, True):
        model, opt = _model_and_opt(torch.tensor(1e-2))

        def train_step(x, y, model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        step = torch.compile(train_step, backend="coap") if compiled else train_step
        losses = [step(x, y).detach() for x, y in data]
        results.append((losses, [p.detach().clone() for p in model.parameters()], opt))
    (l_e, p_e, opt_e), (l_c, p_c, opt_c) = results
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)
    for pe, pc in zip(opt_e.param_groups[0]["params"], opt_c.param_groups[0]["params"]):
        # exp_avg_sq ≈ 1e-3·g²: entries near 1e-9 carry the grads' fp32 reassociation error (~1e-5 relative)
        sq_c, sq_e = opt_c.state[pc]["exp_avg_sq"], opt_e.state[pe]["exp_avg_sq"]
        torch.testing.assert_close(sq_c, sq_e, rtol=1e-5, atol=1e-10)


def test_one_compile_over_20_steps_with_tensor_lr_schedule(fresh_compile):
    lr = torch.tensor(1e-2)
    model, opt = _model_and_opt(lr)
    ref_model, ref_opt = _model_and_opt(torch.tensor(1e-2))
    compiled_step = torch.compile(opt.step, backend="coap")
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    graphs_before = backend.PASS_STATS["graphs"]
    for i in range(20):
        for m, o, step in ((model, opt, compiled_step), (ref_model, ref_opt, ref_opt.step)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.param_groups[0]["lr"].fill_(1e-2 * 0.9**i)  # the schedule: in place, never a new float
            step()
    assert counters["stats"]["unique_graphs"] == 1
    assert backend.PASS_STATS["graphs"] - graphs_before == 1
    torch.testing.assert_close(list(model.parameters()), list(ref_model.parameters()), rtol=1e-5, atol=1e-6)
