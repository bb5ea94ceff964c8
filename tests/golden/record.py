"""Record the golden trajectories of ``tests/test_golden.py`` (run on the *unmodified* library).

Usage, from the repository root: ``python -m tests.golden.record`` (or ``python tests/golden/record.py``);
``python -m tests.golden.record --fsdp2-only`` re-records ``fsdp2.pt`` alone.
It writes, under ``tests/golden/data/`` (each loadable with ``torch.load(path, weights_only=True)``):

* ``trajectories.pt``: ``{"meta", "refused", "runs": {name: {key: tensor}}}`` — for every configuration of
  :func:`tests.golden.configs.all_cases`, after ``STEPS = 12`` steps, every parameter (``param/<name>``) and
  every tensor of ``opt.state_dict()["state"]`` (``state/<index>/<key>``: ``P``, moments, ``step``, bf16
  ``.rng`` streams, int8 ``.q8`` codes and ``.absmax`` scales, Flora seeds, DCT indices);
* ``fsdp2.pt``: ``{"meta", "runs": {name: {"rank<r>/<key>": tensor}}}`` — the FSDP2 cases on 2 gloo ranks,
  each rank's local shards (``DTensor.to_local()``) of the parameters and states;
* ``checkpoints.pt``: ``{"meta", "checkpoints": {name: {"optimizer": opt.state_dict() after 6 steps,
  "model": {name: parameter after 6 steps}, "after": the snapshot after 6 more steps continued from it}}}``.

Everything runs with ``torch.set_num_threads(1)`` (as the test replays it). Snapshot tensors with equal
contents are stored once (``torch.save`` keeps shared tensors shared): the grouped and per-matrix runs are
bit-identical on CPU, so the ungrouped entries cost nothing. The checkpoints' own tensors are not shared.

**Checked while recording** (the script fails otherwise):

* the refresh schedule, from the recorded ``P`` (``proj``, ``proj0``/``proj1`` for Tucker, ``dct_index``)
  of every projected parameter after every step: with ``update_interval=2, reproject_factor=3`` over 12
  steps, ``P`` changes only at the refresh steps of the policy (COAP and Tucker: correlation steps at
  ``k = 2, 4, 8, 10``, low-cost SVD at ``k = 6``; GaLore/Flora/DCT: every even ``k > 0``), COAP's SVD at
  ``k = 6`` changes it in every COAP configuration, and Flora resamples at every even ``k > 0``. The run
  prints, per configuration, the steps at which ``P`` changed and, for COAP, the largest ``max|ΔP|`` of
  the correlation steps and of the SVD. Observed (commit of ``meta``): with an fp32 ``P``, ``P`` changes
  at k = 2, 4, 6, 8, 10 in every configuration, the paper's correlation steps by 5e-6…2e-5 and the SVD by
  ≈1; with a bf16 ``P`` (``projection_precision="auto"`` under bf16/int8 states) most correlation steps
  fall below half an ulp and only the SVD moves it (exceptions: adam-l2 bf16 at k = 2, Adafactor int8 at
  k = 8, 10, the Tucker factors); GaLore, Flora and DCT change ``P`` (or the DCT indices) at every even
  ``k > 0``. Edits (``policy`` None) are printed, not checked;
* the continuation from each old-format checkpoint equals the uninterrupted run, bit for bit;
* the FSDP2 ranks hold ``torch.chunk`` row slices of ``P`` (sharded since issue 18; until then it was
  replicated and both ranks held the same ``P``).

**Refused combinations** (the construction raises; listed in ``trajectories.pt["refused"]`` and checked
to be still refused by the test): RMSprop with momentum and ``state_precision="int8"`` (recorded for
``rmsprop-momentum/coap/int8/grouped``, the only int8 entry of that base) — ``ValueError:
state_precision='int8' quantizes moment-like EMA states only; parameter 'tall.weight' (param group 1) has
state 'momentum_buffer' of shape (256, 16) that the compiler classifies as 'other' (not s' = a·s + b·x or
a·s + b·x²), so it cannot share a block scale safely: use state_precision='bf16' (or 'fp32')``. Every other
base × policy × precision combination is accepted. Not recorded because refused under FSDP2
(``coap_compile/distributed/fsdp.py``, ``tests/test_fsdp2.py``): int8, GaLore, DCT, Tucker and Adafactor.
Not recorded because it fails (a library limitation, see ``configs.other_cases``): switching
``state_precision`` mid-run on full-rank parameters that run torch's own optimizer.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # python tests/golden/record.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.golden import configs as C

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[2]
PROJ_KEYS = ("proj", "proj0", "proj1", "dct_index")
REFUSALS = (ValueError, TypeError, NotImplementedError)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def metadata() -> dict:
    try:
        import transformers

        hf = str(transformers.__version__)
    except ImportError:  # pragma: no cover
        hf = "not installed"
    return {
        "torch": str(torch.__version__),
        "transformers": hf,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "commit": _git("rev-parse", "HEAD"),
        "library_dirty": bool(_git("status", "--porcelain", "--", "coap_compile")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_threads": 1,
        "steps": C.STEPS,
        "checkpoint_at": C.CHECKPOINT_AT,
        "schedule": dict(C.SCHEDULE),
    }


def _proj(opt) -> dict[str, torch.Tensor]:
    return {
        f"{i}/{k}": v.detach().clone()
        for i, entry in opt.state_dict()["state"].items()
        for k, v in entry.items()
        if k in PROJ_KEYS
    }


def _max_change(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:  # re-based at another rank (an edit)
        return float("inf")
    if not a.is_floating_point():
        return float(not torch.equal(a, b))
    return float((a.double() - b.double()).abs().max())


def run_checked(case: C.Case, model, opt) -> tuple[dict[str, torch.Tensor], str]:
    """The snapshot after STEPS steps of the freshly set up ``(model, opt)`` of ``case``, and a line
    describing when P changed (the schedule is checked)."""
    changes: dict[int, float] = {}
    before: dict[str, torch.Tensor] = {}

    def each(k: int) -> None:
        nonlocal before
        now = _proj(opt)
        if k > 0:
            assert now.keys() == before.keys(), (case.name, k)
            delta = max((_max_change(now[n], before[n]) for n in now), default=0.0)
            if delta > 0:
                changes[k] = delta
        before = now

    C.train(case, model, opt, 0, C.STEPS, each)
    line = f"P changed at k={sorted(changes)}"
    if case.policy is not None:
        schedule = C.REFRESHES[case.policy]
        off = sorted(set(changes) - set(schedule))
        assert not off, f"{case.name}: P changed outside the refresh steps, at k = {off}"
        if case.policy == "coap":
            assert 6 in changes, f"{case.name}: the SVD at k = 6 left P unchanged"
        if case.policy == "flora":
            assert sorted(changes) == sorted(k for k in schedule if k), f"{case.name}: {sorted(changes)}"
        corr = [changes.get(k, 0.0) for k, kind in schedule.items() if kind == "correlation"]
        if corr:
            line += f"; max|dP| correlation {max(corr):.1e}, svd {changes.get(6, 0.0):.1e}"
    return C.snapshot(model, opt), line


class Dedup:
    """Replace tensors by the first tensor of equal dtype, shape and bytes (stored once by torch.save)."""

    def __init__(self) -> None:
        self.seen: dict[tuple, torch.Tensor] = {}

    def __call__(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().clone().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            key = (t.dtype, tuple(t.shape), hashlib.sha1(raw).hexdigest())
            return self.seen.setdefault(key, t)
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self(v) for v in obj)
        return obj


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _fsdp_result(fsdp_run) -> dict:
    fsdp = fsdp_run.result()
    for name, run in fsdp.items():
        projs = [k.split("/", 1)[1] for k in run if k.startswith("rank0/") and k.endswith("/proj")]
        assert projs, name
        for k in projs:  # P is sharded by rows (torch.chunk of n over the 2 ranks)
            a, b = run[f"rank0/{k}"], run[f"rank1/{k}"]
            assert a.shape[1] == b.shape[1] and a.shape[0] - b.shape[0] in (0, 1), f"{name}: {k} not chunked"
    return fsdp


def main(argv: list[str] | None = None) -> None:
    """All goldens; ``--fsdp2-only``: only ``fsdp2.pt`` (the other files untouched)."""
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    DATA.mkdir(parents=True, exist_ok=True)
    meta = metadata()
    if meta["library_dirty"]:
        print("WARNING: coap_compile/ has uncommitted changes; goldens must come from the unmodified library")
    t0 = time.monotonic()
    fsdp_run = C.FsdpRun().start()  # in the background, while the single-process cases run
    if argv == ["--fsdp2-only"]:
        fsdp = _fsdp_result(fsdp_run)
        path = DATA / "fsdp2.pt"
        torch.save({"meta": meta, "runs": Dedup()(fsdp)}, path)
        torch.load(path, weights_only=True)
        print(f"{len(fsdp)} FSDP2 runs, {time.monotonic() - t0:.1f} s; {path.relative_to(ROOT)}")
        return
    runs, refused = {}, {}
    cases = C.all_cases()
    for name, case in cases.items():
        try:
            model, opt = C.setup(case)
        except REFUSALS as exc:
            refused[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name:45s} REFUSED {refused[name][:150]}")
            continue
        runs[name], line = run_checked(case, model, opt)
        print(f"{name:45s} {line}")
    print(f"{len(runs)} runs, {len(refused)} refused, {time.monotonic() - t0:.1f} s")

    checkpoints = {}
    for name, case in cases.items():
        if case.checkpoint:
            saved = C.checkpoint_at(case)
            after = C.resume(case, saved)
            assert _same(after, runs[name]), f"{name}: the resumed run differs from the uninterrupted one"
            checkpoints[name] = {**saved, "after": after}
    print(f"{len(checkpoints)} checkpoints, resumed bit-identically")

    t1 = time.monotonic()
    fsdp = _fsdp_result(fsdp_run)
    print(f"{len(fsdp)} FSDP2 runs, {time.monotonic() - t1:.1f} s more")

    dedup = Dedup()
    files = {
        "trajectories.pt": {"meta": meta, "refused": refused, "runs": dedup(runs)},
        "fsdp2.pt": {"meta": meta, "runs": dedup(fsdp)},
        # the checkpoints themselves are not deduplicated: each state tensor keeps its own storage, as in
        # a file written by torch.save(opt.state_dict()) (configs.unshared explains why that matters)
        "checkpoints.pt": {
            "meta": meta,
            "checkpoints": {n: {**c, "after": dedup(c["after"])} for n, c in checkpoints.items()},
        },
    }
    for fname, obj in files.items():
        path = DATA / fname
        torch.save(obj, path)
        torch.load(path, weights_only=True)  # must load without unpickling arbitrary objects
        print(f"{path.relative_to(ROOT)}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
