"""Sharded vs replicated ``P`` under FSDP2: step time and per-rank state bytes, gloo on CPU.

``PYTHONPATH=. python benchmarks/fsdp_basis.py [--steps 30] [--worlds 2 4]`` trains the issue's model
(4 × ``Linear(512, 512)``, ``rank_ratio=4``, ``fully_shard`` per layer, AdamW) on ``W`` gloo ranks with
``projection_sharding="sharded"`` and ``"replicated"`` in alternating blocks of steps (the same process
group, the same data), and records per configuration the median wall time of ``opt.step()`` (rank 0,
after a barrier so every rank starts the step together), the median of forward + backward + step, the
per-rank optimizer-state bytes (counted tensors) and the ``P`` gather bytes per step from a
:class:`~coap_compile.distributed.CommLog`. Writes ``benchmarks/results/fsdp_basis_timing.json`` with the
machine, versions, commit and load average. Ratios (sharded / replicated, same run) are what to read;
on a 2-core machine shared with other work, W = 4 oversubscribes the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import coap_compile
from coap_compile.distributed import CommLog
from coap_lab.cli.report import metadata, write_json
from coap_lab.launch import run_distributed

DIM, LAYERS, BATCH = 512, 4, 64


def _model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(DIM, DIM, bias=False) for _ in range(LAYERS)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _state_bytes(opt) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for st in opt.state.values():
        for v in st.values():
            v = v.to_local() if isinstance(v, DTensor) else v
            total += v.numel() * v.element_size()
    return total


def _worker(steps: int, block: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    runs = {}
    for sharding in ("sharded", "replicated"):
        model = _model(mesh)
        opt = coap_compile.optimize(
            model, torch.optim.AdamW, rank_ratio=4, lr=1e-3, projection_sharding=sharding
        )
        runs[sharding] = {"model": model, "opt": opt, "step_s": [], "total_s": [], "gather": 0}
    order = [s for _ in range(steps // block) for s in ("sharded", "replicated")]
    k = {s: 0 for s in runs}
    for sharding in order:
        run = runs[sharding]
        model, opt = run["model"], run["opt"]
        for _ in range(block):
            g = torch.Generator().manual_seed(1000 * k[sharding] + dist.get_rank())
            x = torch.randn(BATCH, DIM, generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            dist.barrier()
            t1 = time.perf_counter()
            opt.comm_log = CommLog()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad()
            if k[sharding] >= 2:  # past the init
                run["step_s"].append(t2 - t1)
                run["total_s"].append(t2 - t0)
            run["gather"] = opt.comm_log.bytes_by_label().get("p_gather", 0)
            k[sharding] += 1
    out = {}
    for sharding, run in runs.items():
        out[sharding] = {
            "step_ms_median": round(1e3 * statistics.median(run["step_s"]), 3),
            "fwd_bwd_step_ms_median": round(1e3 * statistics.median(run["total_s"]), 3),
            "timed_steps": len(run["step_s"]),
            "state_bytes": _state_bytes(run["opt"]),
            "p_gather_bytes_last_step": run["gather"],
            "planned_state_bytes": run["opt"].memory_plan().total_bytes,
            "planned_transient_bytes": run["opt"].memory_plan().transient_bytes,
            "torch_adamw_bytes": run["opt"].memory_plan().base_bytes,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="benchmarks/results/fsdp_basis_timing.json")
    args = parser.parse_args(argv)
    meta = metadata("cpu", ["python", "benchmarks/fsdp_basis.py", *(argv or [])])
    rows = []
    for world in args.worlds:
        ranks = run_distributed(_worker, world, args.steps, args.block, timeout=600.0)
        r0 = ranks[0]
        row = {"world_size": world, **{f"{s}_{k}": v for s, d in r0.items() for k, v in d.items()}}
        row["step_time_ratio_sharded_over_replicated"] = round(
            r0["sharded"]["step_ms_median"] / r0["replicated"]["step_ms_median"], 3
        )
        row["state_ratio_sharded_over_replicated"] = round(
            r0["sharded"]["state_bytes"] / r0["replicated"]["state_bytes"], 3
        )
        rows.append(row)
        print(row)
    meta["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    model = f"{LAYERS} x Linear({DIM}, {DIM}), rank_ratio=4, AdamW"
    write_json(Path(args.out), {"meta": meta, "model": model, "batch": BATCH, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
