"""Settings that decide collectives are checked equal across an FSDP2 shard group (issue 18, item 5).

Two gloo ranks build the same sharded model with settings that differ per rank. Without the check a
different ``update_interval`` makes one rank enter a correlation all-reduce the other never joins
(a hang until the process-group timeout) and a different state precision trains with a different ``P``
per rank. With it, the first step raises on *every* rank, naming the setting and each rank's value, and
changes nothing. The process group's timeout is the run's (60 s), so a regression fails instead of
hanging CI.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import coap_compile
from coap_compile.distributed import CommLog
from coap_lab.launch import run_distributed

TIMEOUT = 60.0
BASE = {"rank": 2, "update_interval": 2, "reproject_factor": 2, "correlation": "normalized", "lr": 1e-2}
#: case → (settings of rank 0, settings of rank 1)
CASES = {
    "update_interval": ({}, {"update_interval": 3}),
    "state_precision": ({}, {"state_precision": "bf16"}),
    "projection": ({}, {"projection": "flora"}),
    "rank": ({}, {"rank": 3}),
    "projection_sharding": ({}, {"projection_sharding": "replicated"}),
}


def _model(mesh) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _loss(model) -> torch.Tensor:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(7 + dist.get_rank()))
    return model(x).square().mean()


def _full(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def _step(model, opt) -> None:
    opt.zero_grad()
    _loss(model).backward()
    opt.step()


def _worker() -> dict:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out: dict = {}
    for case, per_rank in CASES.items():
        model = _model(mesh)
        opt = coap_compile.optimize(model, torch.optim.AdamW, **{**BASE, **per_rank[dist.get_rank()]})
        before = _full(model)
        try:
            for _ in range(4):  # crosses a correlation refresh of the update_interval=2 rank
                _step(model, opt)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        out[case] = {
            "message": message,
            "unchanged": all(torch.equal(before[n], v) for n, v in _full(model).items()),
            "state_empty": not any(opt.state[p] for p in model.parameters()),
        }
    model = _model(mesh)
    opt = coap_compile.optimize(model, torch.optim.AdamW, **BASE)
    opt.comm_log = CommLog()
    digests = []
    for _ in range(3):
        opt.comm_log.clear()
        _step(model, opt)
        digests.append([r.nbytes for r in opt.comm_log.records if r.label == "settings_digest"])
    opt.param_groups[0]["update_interval"] = 4  # a COAP key changed: the plan is rebuilt, checked again
    opt.comm_log.clear()
    _step(model, opt)
    digests.append([r.nbytes for r in opt.comm_log.records if r.label == "settings_digest"])
    out["agree"] = {"digests": digests, "dtensor": isinstance(opt.state[model[0].weight]["exp_avg"], DTensor)}
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 2, timeout=TIMEOUT)


def test_settings_mismatch_raises_on_every_rank_naming_the_setting(ranks):
    values = {
        "update_interval": ("2", "3"),
        "state_precision": ("'fp32'", "'bf16'"),
        "projection": ("'coap'", "'flora'"),
        "rank": ("2", "3"),
        "projection_sharding": ("'sharded'", "'replicated'"),
    }
    for case, (v0, v1) in values.items():
        messages = [r[case]["message"] for r in ranks]
        assert messages[0] == messages[1], case  # every rank raises the same error
        msg = messages[0]
        assert f"setting {case!r} of parameter '" in msg, msg
        assert f"rank 0: {v0}, rank 1: {v1}" in msg, msg
        assert "nothing was stepped" in msg, msg
        for r in ranks:
            assert r[case]["unchanged"] and r[case]["state_empty"], case


def test_equal_settings_cost_one_digest_per_plan(ranks):
    for r in ranks:
        # one 8-byte all-gather (one shard group) at the first step and after the plan rebuild, nothing else
        assert r["agree"]["digests"] == [[8], [], [], [8]]
        assert r["agree"]["dtensor"]
