"""``P`` sharded under FSDP2 (issue 18, item 1): stored as ``torch.chunk`` row slices, gathered per step.

On 2 and 4 gloo ranks the tiny LM of ``tests/test_fsdp2.py`` trains 9 steps (init k=0, correlation
k=2, 6, SVD k=4, 8) with the default ``projection_sharding="sharded"`` and with ``"replicated"``, for
AdamW (normalized correlation) and SGD with momentum (the paper's correlation step). Checked: every
``P`` is a DTensor with the weight's mesh and placements holding ``torch.chunk`` rows of ``n``; its
slices concatenate to the replicated run's ``P`` bit for bit at every step (the gather copies bits and
the refresh collectives are unchanged), so the whole trajectory equals the replicated run's bit for bit
and the single-process ``projection_side="rows"`` reference within ``test_fsdp2.py``'s tolerances; the
collectives are the replicated run's plus exactly one ``P`` all-gather per weight and update (and two more
per refreshing weight that has a ``P``); the bytes held are ``memory_plan()``'s; a DCP checkpoint saved on
2 ranks resumes on 4 and one saved on 4 resumes on 2 (against the uninterrupted run).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import local_state_bytes, rel_err
from test_fsdp2 import (
    BASES,
    LOSS_SCALE,
    PROJECTED,
    RANK,
    REFRESH,
    SAVE_AT,
    STEPS,
    _batch,
    _full,
    _loss,
    _optimizer,
    _projected,
    _reference,
    _rows,
    _sharded,
)
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from coap_compile.distributed import CommLog
from coap_compile.distributed.basis import p_gather_bytes
from coap_lab.launch import run_distributed

TIMEOUT = 180.0
WIDTHS = dict(zip(PROJECTED, (16, 32, 16, 6, 16)))  # n: P is n×r on the rows side


def _p(v) -> torch.Tensor:
    return (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()


def _train(model, opt, steps, rows, scale: float = 1.0) -> dict:
    losses, projs, locals_, comm = [], [], [], []
    for step in steps:
        opt.zero_grad()
        loss = _loss(model, _batch(step)[rows])
        (loss * scale).backward()
        opt.comm_log.clear()
        opt.step()
        comm.append([(r.label, r.nbytes) for r in opt.comm_log.records])
        losses.append(loss.item())
        st = {n: opt.state[p]["proj"] for n, p in _projected(model).items()}
        projs.append({n: _p(v) for n, v in st.items()})
        locals_.append({
            n: (v.to_local().clone(), tuple(v.placements), v.device_mesh is _projected(model)[n].device_mesh)
            if isinstance(v, DTensor) else None
            for n, v in st.items()
        })  # fmt: skip
    return {"losses": losses, "projs": projs, "locals": locals_, "comm": comm}


def _held(model, opt) -> dict:
    out = {}
    plan = {row.name: row for row in opt.memory_plan().rows}
    for n, p in _projected(model).items():
        held = local_state_bytes({p: opt.state[p]})
        out[n] = (held, plan[n].state_bytes, plan[n].transient_bytes)
    return out


def _save(model, opt, path):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)  # fmt: skip


def _resume(mesh, path, rows) -> dict:
    model = _sharded(mesh)
    opt = _optimizer(model, "adamw")
    opt.comm_log = CommLog()
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    run = _train(model, opt, range(SAVE_AT, STEPS), rows)
    run["params"] = _full(model)
    return run


def _worker(path: str, resume_only: bool = False) -> dict:
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = _rows(world)
    out: dict = {}
    for base in () if resume_only else BASES:
        for sharding in ("sharded", "replicated"):
            model = _sharded(mesh)
            opt = _optimizer(model, base, projection_sharding=sharding)
            opt.comm_log = CommLog()
            if base == "adamw" and sharding == "sharded":
                first = _train(model, opt, range(SAVE_AT), rows)
                _save(model, opt, os.path.join(path, f"w{world}"))
                rest = _train(model, opt, range(SAVE_AT, STEPS), rows)
                run = {k: first[k] + rest[k] for k in first}
            else:
                run = _train(model, opt, range(STEPS), rows, LOSS_SCALE[base])
            run["params"] = _full(model)
            run["held"] = _held(model, opt)
            out[(base, sharding)] = run
    dist.barrier()
    other = {2: 4, 4: 2}[world]
    if os.path.exists(os.path.join(path, f"w{other}", ".metadata")):
        out["resume"] = _resume(mesh, os.path.join(path, f"w{other}"), rows)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fsdp2_sharded_p"))
    out = {2: run_distributed(_worker, 2, path, timeout=TIMEOUT)}  # saves w2
    out[4] = run_distributed(_worker, 4, path, timeout=TIMEOUT)  # saves w4, resumes w2 on 4 ranks
    out["2b"] = run_distributed(_worker, 2, path, True, timeout=TIMEOUT)  # resumes w4 on 2 ranks
    out["reference"] = {base: _reference(base) for base in BASES}
    return out


def _chunk(n: int, world: int, rank: int) -> tuple[int, int]:
    c = -(-n // world)
    return min(n, rank * c), min(n, (rank + 1) * c)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("base", list(BASES))
def test_sharded_p_is_chunked_and_equals_the_replicated_run_bit_for_bit(runs, base, world):
    for rank, r in enumerate(runs[world]):
        sh, rep = r[(base, "sharded")], r[(base, "replicated")]
        assert sh["losses"] == rep["losses"]
        for name in sh["params"]:
            assert torch.equal(sh["params"][name], rep["params"][name]), name
        for step in range(STEPS):
            for name in PROJECTED:
                loc, placements, same_mesh = sh["locals"][step][name]
                assert placements == (Shard(0),) and same_mesh, (step, name)
                start, stop = _chunk(WIDTHS[name], world, rank)
                assert loc.shape == (stop - start, RANK), (step, name)
                assert rep["locals"][step][name] is None  # the replicated option: a plain tensor
                assert torch.equal(loc, rep["projs"][step][name][start:stop]), (step, name)
                assert torch.equal(sh["projs"][step][name], rep["projs"][step][name]), (step, name)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("base", list(BASES))
def test_sharded_p_matches_single_process_rows_reference(runs, base, world):
    ref, ranks = runs["reference"][base], runs[world]
    mean = [sum(r[(base, "sharded")]["losses"][s] for r in ranks) / world for s in range(STEPS)]
    assert max(abs(a - b) / b for a, b in zip(mean, ref["losses"])) < 2e-6  # test_fsdp2's bound
    for name, value in ref["params"].items():
        assert rel_err(ranks[0][(base, "sharded")]["params"][name], value) < 2e-6, name  # test_fsdp2's bound
    for step in range(STEPS):  # init, correlation and SVD refreshes
        for name, proj in ref["projs"][step].items():
            assert rel_err(ranks[0][(base, "sharded")]["projs"][step][name], proj) < 2e-5, (step, name)


@pytest.mark.parametrize("world", [2, 4])
def test_traffic_is_the_replicated_runs_plus_one_p_gather_per_use(runs, world):
    for r in runs[world]:
        for base in BASES:
            sh, rep = r[(base, "sharded")], r[(base, "replicated")]
            for step in range(STEPS):
                other = [x for x in sh["comm"][step] if x[0] != "p_gather"]
                assert other == rep["comm"][step], (base, step)
                gathers = [b for lab, b in sh["comm"][step] if lab == "p_gather"]
                uses = 1 + (2 if step in REFRESH and step else 0)  # update; refresh plan + commit
                want = sorted(p_gather_bytes(WIDTHS[n], RANK, world) for n in PROJECTED for _ in range(uses))
                assert sorted(gathers) == want, (base, step)


@pytest.mark.parametrize("world", [2, 4])
def test_held_bytes_are_the_memory_plan(runs, world):
    for r in runs[world]:
        for base in BASES:
            for sharding in ("sharded", "replicated"):
                for name, (held, plan, transient) in r[(base, sharding)]["held"].items():
                    assert held == plan, (base, sharding, name)
                    full = 4 * WIDTHS[name] * RANK
                    assert transient == (full if sharding == "sharded" else 0), (base, sharding, name)


def test_dcp_resharding_with_sharded_p_resumes(runs):
    """Saved at step 5 on W ranks, resumed on the other W: equal to the uninterrupted run on W ranks,
    within the tolerance of a change of reduction order (test_fsdp2's resharding bound)."""
    for saved_on, resumed in ((2, runs[4]), (4, runs["2b"])):
        want = runs[saved_on][0][("adamw", "sharded")]
        world = len(resumed)
        want_mean = [sum(r[("adamw", "sharded")]["losses"][SAVE_AT + i] for r in runs[saved_on]) / saved_on
                     for i in range(STEPS - SAVE_AT)]  # fmt: skip
        mean = [sum(r["resume"]["losses"][i] for r in resumed) / world for i in range(STEPS - SAVE_AT)]
        assert max(abs(a - b) / b for a, b in zip(mean, want_mean)) < 2e-6, saved_on  # observed ≤ 1.2e-7
        got = resumed[0]["resume"]
        for name, value in want["params"].items():
            assert rel_err(got["params"][name], value) < 2e-5, (saved_on, name)
        for name in PROJECTED:
            assert rel_err(got["projs"][-1][name], want["projs"][-1][name]) < 2e-5, (saved_on, name)
            assert got["locals"][-1][name] is not None  # still sharded after the load
