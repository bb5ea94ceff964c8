"""Golden trajectories: the optimizer's behaviour, frozen bit for bit.

``tests/golden/record.py`` ran every configuration of ``tests/golden/configs.py`` on the unmodified library
(``tests/golden/data/*.pt``, with the commit, torch version and date in ``meta``); this file rebuilds each
configuration from its seed, replays it (12 steps, one intra-op thread) and compares every parameter and
every tensor of ``opt.state_dict()["state"]`` with the recording: equal key sets, dtypes and shapes, and
equal bytes (bit identity: ``torch.equal``, and also the sign of zeros and NaN payloads). Covered: each base
(AdamW, Adam, Adam with L2 decay, SGD with momentum, RMSprop with and without momentum, torch's and
transformers' Adafactor) × policy (COAP, GaLore, Flora, DCT) × state precision (fp32, bf16, int8) ×
grouped, Tucker-projected convolutions, full-rank parameters on the derived update, hyperparameter edits
mid-run, two param groups with different settings, in-backward steps with gradient accumulation, FSDP2 on
2 gloo ranks (each rank's local shards), old-format checkpoints (taken after 6 steps by the recording
code) loaded and continued for 6 steps, and the combinations the library refuses.

**Another torch version.** The goldens are bit-exact only for the torch that recorded them. Under another
version (matmul, QR/SVD and reduction kernels may round differently) the comparison is approximate and
never skipped (see ``_close``): parameters within 1e-3 relative error (Frobenius, per tensor), the norm
of every floating state within 1e-2 (a singular vector's sign, or a basis within a near-degenerate
singular subspace, may legitimately differ across LAPACK builds, and the weights are invariant to those),
and integer bookkeeping (step counters, Flora seeds, rounding streams, DCT indices) exactly; int8 codes
by the norm like floating states. The same torch on another CPU (``meta["cpu_capability"]``) may also
round differently; the failure message names both.

The goldens record the behaviour of the library at ``meta["commit"]``; a change that makes this file fail
changed that behaviour. Re-recording (``python -m tests.golden.record``) is for new configurations or a new
torch, on the unmodified library, never to make a change pass.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from golden import configs as C

DATA = Path(__file__).resolve().parent / "golden" / "data"
CASES = C.all_cases()


@functools.cache
def _load(name: str) -> dict:
    return torch.load(DATA / name, weights_only=True)


def _meta() -> dict:
    return _load("trajectories.pt")["meta"]


EXACT = _meta()["torch"] == str(torch.__version__)


@pytest.fixture(autouse=True)
def _one_thread():
    """Recorded with one intra-op thread; replayed the same way (the bits may depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _close(key: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Another torch version: the tolerances of the module docstring."""
    if key.endswith("/step") or not (a.is_floating_point() or key.endswith(".q8")):
        return torch.equal(a, b)  # step counters, seeds, rounding streams, DCT indices
    a, b = a.double(), b.double()
    if key.startswith("param/") or key.split("/", 1)[-1].startswith("param/"):  # FSDP keys: rank<r>/param/…
        return float((a - b).norm()) <= 1e-3 * max(float(b.norm()), 1e-12)
    return abs(float(a.norm()) - float(b.norm())) <= 1e-2 * max(float(b.norm()), 1e-12)


def assert_matches(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    problems = []
    if got.keys() != want.keys():
        problems.append(
            f"keys: missing {sorted(want.keys() - got.keys())}, unexpected {sorted(got.keys() - want.keys())}"
        )
    for key in sorted(got.keys() & want.keys()):
        a, b = got[key], want[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: {a.dtype} {tuple(a.shape)}, golden {b.dtype} {tuple(b.shape)}")
            continue
        same = torch.equal(_bits(a), _bits(b)) if EXACT else _close(key, a, b)
        if not same:
            note = " (values equal, bits differ: signed zeros or NaN payloads)" if torch.equal(a, b) else ""
            problems.append(f"{key}: max |got - golden| = {_max_abs(a, b):.3e}{note}")
    if problems:
        meta = _meta()
        raise AssertionError(
            f"{name}: {len(problems)} tensor(s) differ from the golden recorded at commit "
            f"{meta['commit'][:12]} "
            f"(torch {meta['torch']}, cpu {meta['cpu_capability']}; now torch {torch.__version__}, cpu "
            f"{torch.backends.cpu.get_cpu_capability()}, {'exact' if EXACT else 'tolerant'} comparison):\n  "
            + "\n  ".join(problems[:40])
            + ("\n  …" if len(problems) > 40 else "")
        )


def test_recorded_set_matches_the_configurations():
    """Every configuration is recorded or recorded as refused (configs.py and the data cannot drift apart)."""
    traj = _load("trajectories.pt")
    assert sorted(traj["runs"].keys() | traj["refused"].keys()) == sorted(CASES)
    assert not traj["runs"].keys() & traj["refused"].keys()
    assert sorted(_load("fsdp2.pt")["runs"]) == sorted(C.FSDP_CASES)
    checkpointed = sorted(n for n, c in CASES.items() if c.checkpoint)
    assert sorted(_load("checkpoints.pt")["checkpoints"]) == checkpointed


@pytest.mark.parametrize("name", sorted(_load("trajectories.pt")["runs"]))
def test_trajectory(name):
    assert_matches(name, C.run_case(CASES[name]), _load("trajectories.pt")["runs"][name])


@pytest.mark.parametrize("name", sorted(_load("trajectories.pt")["refused"]))
def test_still_refused(name):
    recorded = _load("trajectories.pt")["refused"][name]
    kind = recorded.split(":", 1)[0]
    try:
        C.setup(CASES[name])
    except Exception as exc:
        assert type(exc).__name__ == kind, f"recorded {recorded!r}, got {exc!r}"
    else:
        pytest.fail(f"{name} is no longer refused (recorded: {recorded!r})")


@pytest.mark.parametrize("name", sorted(_load("checkpoints.pt")["checkpoints"]))
def test_old_checkpoint_resumes(name):
    """A ``state_dict()`` saved by the recording code after 6 steps, loaded into a fresh optimizer (with the
    model's parameters at that point), continues for 6 steps to the recorded result."""
    saved = _load("checkpoints.pt")["checkpoints"][name]
    assert_matches(f"{name} (resumed)", C.resume(CASES[name], saved), saved["after"])


@pytest.fixture(scope="module", autouse=True)
def _fsdp_background(request):
    """The FSDP2 ranks start with this module's first test and run while the single-process goldens replay
    (3 processes on the 2 cores); bounded: killed, and RuntimeError raised, FSDP_TIMEOUT seconds after
    the start. Not started when no FSDP2 test is selected."""
    wanted = any(item.name.startswith("test_fsdp2_trajectory") for item in request.session.items)
    run = C.FsdpRun(timeout=C.FSDP_TIMEOUT).start() if wanted else None
    yield run
    if run is not None:
        run.close()


@pytest.fixture(scope="module")
def fsdp_runs(_fsdp_background):
    return _fsdp_background.result()


@pytest.mark.parametrize("name", sorted(C.FSDP_CASES))
def test_fsdp2_trajectory(name, fsdp_runs):
    assert_matches(name, fsdp_runs[name], _load("fsdp2.pt")["runs"][name])
