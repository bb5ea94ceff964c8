"""Host-side step counts: the refresh schedule decided without reading ``state["step"]`` every step.

The schedule (:mod:`.schedule`) needs ``k``, a parameter's completed steps, for every projected
parameter at every step (``policy.refresh_kind(k)``), and the grouped update compares the members'
``k`` (:func:`.grouped.ready`). ``state["step"]`` stays the truth (a tensor, as torch keeps it: what
checkpoints, ``load_state_dict``, copies and user code see), and :class:`StepCounters` keeps a host
``int`` beside it that is trusted only while that tensor has not been written by anyone else:

* a record is ``(tensor, version, k)``: the very ``state["step"]`` object and its autograd version
  counter (``Tensor._version``, a host-side integer bumped by every in-place write: ``add_``,
  ``copy_``, a compiled graph's write-back, a view's write through its base) when ``k`` was known;
* :meth:`count` returns ``k`` when ``state["step"]`` is the recorded object at the recorded version, and
  otherwise reads it once (``.item()``) and records it: a new tensor (``load_state_dict``, ``deepcopy``,
  unpickling, a re-pack of a matrix group, a fresh ``init``), or one written in place by someone else;
* :meth:`expect` (end of the eager phase) notes for each parameter the update is about to step:
  its step tensor, the version before the update and ``k + 1``; :meth:`settle` (after an eager update
  completed, or at the start of the next step when the update was traced by ``torch.compile``) accepts
  ``k + 1`` for the tensors whose version moved since (a skipped step via ``found_inf`` never gets
  here; an eager update that raised never settles: its expectations are dropped, the old records
  fail their version check, and the counters are read again).

So a steady step reads no counter at all, and the few reads left happen on the steps where the
tensors change identity. What the schedule reads stays consistent with the tensors by construction:
whenever the two could differ (someone else wrote), the tensor is read. The one case not detected is
a foreign in-place write *between* :meth:`expect` and :meth:`settle` of a traced step (inside the same
compiled step as the optimizer's own write): then ``k + 1`` is assumed.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["StepCounters"]


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never trusted
        return -1


class StepCounters:
    """``k`` per parameter, kept beside ``state["step"]`` (module docstring)."""

    def __init__(self) -> None:
        self._known: dict[Tensor, tuple[Tensor, int, int]] = {}
        self._pending: dict[Tensor, tuple[Tensor, int, int]] = {}
        self.reads = 0  # host reads of step tensors so far (tests, diagnostics)

    def count(self, p: Tensor, state: dict) -> int:
        """``k``: ``p``'s completed steps (0 without a ``"step"`` entry); a host read only when
        ``state["step"]`` is not the tensor recorded at its recorded version."""
        step = state.get("step")
        if step is None:
            return 0
        rec = self._known.get(p)
        if rec is not None and rec[0] is step and rec[1] == _version(step) != -1:
            return rec[2]
        k = int(step.item())
        self.reads += 1
        self._known[p] = (step, _version(step), k)
        return k

    def expect(self, p: Tensor, state: dict, k: int) -> None:
        """The update is about to advance ``p`` from ``k`` to ``k + 1`` (``state["step"]`` present)."""
        step = state["step"]
        self._pending[p] = (step, _version(step), k + 1)

    def settle(self, traced: bool = False) -> None:
        """After an update: accept ``k + 1`` for every expected counter written since :meth:`expect`.
        At the start of a step (``traced``: whether the previous update ran inside a compiled region)
        the expectations of an eager update still pending are dropped: that update raised, and the
        step views of a matrix group share one version counter, so a moved version proves nothing."""
        if traced:
            for p, (step, before, k) in self._pending.items():
                now = _version(step)
                if now != before and now != -1:
                    self._known[p] = (step, now, k)
        self._pending.clear()
