"""The DDP comm hook that steps each bucket after its all-reduce (:mod:`coap_compile.distributed.backward`).

Two gloo ranks train the tiny LM of ``tests/test_ddp.py`` for 9 steps (init k=0, correlation k=3,
SVD k=6 with ``update_interval=3``) on different data per rank, once with the normal DDP path
(``loss.backward(); opt.step()``) and once with ``step_in_backward(ddp, opt)``, with
``gradient_as_bucket_view`` on and off and a small bucket cap (several buckets, completing in any
order). References: the other rank (every parameter and state tensor ``torch.equal``) and the normal
DDP path. Gradient accumulation through ``ddp.no_sync()`` is checked the same way.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_ddp import BATCH_PER_RANK, OPT_KW, TinyLM, _global_batch, _loss
from torch.nn.parallel import DistributedDataParallel

import coap_compile
from coap_compile.distributed.backward import DdpStepHook
from coap_lab.launch import run_distributed

WORLD, STEPS, MICRO = 2, 9, 2


def _snapshot(module, opt) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in module.named_parameters()}
    ids = [p for g in opt.param_groups for p in g["params"]]
    out = {f"param/{n}": p.detach().clone() for n, p in module.named_parameters()}
    for idx, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            out[f"state/{names[id(ids[idx])]}/{key}"] = value.clone()
    return out


def _train(bucket_view: bool, in_backward: bool, micro: int) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = TinyLM()
    ddp = DistributedDataParallel(module, gradient_as_bucket_view=bucket_view, bucket_cap_mb=0.002)
    opt = coap_compile.optimize(module, torch.optim.AdamW, **OPT_KW)
    hook = coap_compile.step_in_backward(ddp, opt) if in_backward else None
    freed = True
    for step in range(STEPS):
        for i in range(micro):
            batch = _global_batch(step * micro + i)[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK]
            if i < micro - 1:
                with ddp.no_sync():
                    (_loss(ddp, batch) / micro).backward()
            else:
                (_loss(ddp, batch) / micro).backward()
        if hook is not None:
            freed &= all(p.grad is None for p in module.parameters())
        opt.step()  # in-backward: nothing left to do
        opt.zero_grad()
    return {
        "final": _snapshot(module, opt),
        "freed": freed,
        "buckets": None if hook is None else hook.buckets_stepped,
        "hook_type": type(hook).__name__,
    }


def _nonfinite() -> dict:
    """A NaN in one rank's ``up.weight`` gradient at the second step, then two more steps."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = TinyLM()
    ddp = DistributedDataParallel(module, bucket_cap_mb=0.002)
    opt = coap_compile.optimize(module, torch.optim.AdamW, **OPT_KW)
    coap_compile.step_in_backward(ddp, opt)
    batches = [_global_batch(s)[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK] for s in range(4)]
    _loss(ddp, batches[0]).backward()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    hook = module.up.weight.register_hook(lambda g: g * float("nan") if rank == 1 else g)
    try:
        _loss(ddp, batches[1]).backward()
        error = ""
    except Exception as e:  # the exception itself, not a RuntimeError wrapping it (issue 21)
        error = f"{type(e).__name__}: {e}"
    hook.remove()
    changed = {n: not torch.equal(p, before[n]) for n, p in module.named_parameters()}
    after_error = _snapshot(module, opt)
    opt.zero_grad()
    for b in batches[2:]:
        _loss(ddp, b).backward()
    return {"error": error, "changed": changed, "after_error": after_error, "final": _snapshot(module, opt)}


def _worker() -> dict:
    out = {"nonfinite": _nonfinite()}
    for bucket_view in (True, False):
        for in_backward in (False, True):
            out[(bucket_view, in_backward, 1)] = _train(bucket_view, in_backward, 1)
    out[(True, False, MICRO)] = _train(True, False, MICRO)
    out[(True, True, MICRO)] = _train(True, True, MICRO)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, WORLD, timeout=150.0)


KEYS = [(True, 1), (False, 1), (True, MICRO)]
IDS = ["bucket_view", "no_bucket_view", "no_sync_accumulation"]


@pytest.mark.parametrize(("bucket_view", "micro"), KEYS, ids=IDS)
def test_replicas_bit_identical(runs, bucket_view, micro):
    r0, r1 = (runs[r][(bucket_view, True, micro)] for r in range(WORLD))
    assert r0["hook_type"] == DdpStepHook.__name__ and r0["freed"] and r1["freed"]
    # several buckets per backward (bucket_cap_mb=0.002: the 7 parameters do not fit one)
    assert r0["buckets"] == r1["buckets"] and r0["buckets"] > 2 * STEPS
    assert r0["final"].keys() == r1["final"].keys()
    assert sum(k.endswith("/proj") for k in r0["final"]) == 3
    for key, value in r0["final"].items():
        assert torch.equal(value, r1["final"][key]), key


@pytest.mark.parametrize(("bucket_view", "micro"), KEYS, ids=IDS)
def test_equals_the_normal_ddp_path(runs, bucket_view, micro):
    hooked = runs[0][(bucket_view, True, micro)]["final"]
    normal = runs[0][(bucket_view, False, micro)]["final"]
    assert hooked.keys() == normal.keys()
    # world size 2: the hook's ÷2 and DDP's ×½ are the same exact scaling, and each parameter's update
    # reads only its own reduced gradient, so the two paths agree bit for bit
    for key, value in normal.items():
        assert torch.equal(hooked[key], value), key
    moved = [k for k in normal if k.startswith("param/")]
    torch.manual_seed(0)
    initial = dict(TinyLM().named_parameters())
    assert all(not torch.equal(normal[k], initial[k[6:]]) for k in moved)  # training happened


def test_nonfinite_gradient_stops_every_rank_at_the_same_bucket(runs):
    r0, r1 = runs[0]["nonfinite"], runs[1]["nonfinite"]
    for r in (r0, r1):  # the NaN was on rank 1 only: the all-reduce carries it to both
        assert r["error"].startswith("NonFiniteGradientError: ") and "up.weight" in r["error"]
    # buckets step in index order (reverse layer order): head and down stepped before up's bucket
    # raised; up and the embedding (a later bucket) did not step, on both ranks
    assert r0["changed"] == r1["changed"]
    assert r0["changed"]["head.weight"] and r0["changed"]["down.weight"]
    assert not r0["changed"]["up.weight"] and not r0["changed"]["emb.weight"]
    for snap in ("after_error", "final"):  # replicas identical after the error and after two more steps
        for key, value in r0[snap].items():
            assert torch.equal(value, r1[snap][key]), (snap, key)
    assert r0["final"]["state/up.weight/step"].item() == 3  # steps 0, 2, 3: the failed one skipped
