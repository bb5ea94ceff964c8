"""The runtime: :class:`~.optimizer.CoapOptimizer` and what its step is made of.

Structure (derived from ``param_groups``, immutable, rebuilt on change): :mod:`.settings` (COAP's
settings and defaults), :mod:`.layout` (one :class:`~.layout.ParamLayout` per parameter), :mod:`.plan`
(the whole optimizer's :class:`~.plan.RuntimePlan`), :mod:`.grouped` (matrix groups), :mod:`.selection`
(which model parameters are projected), :mod:`.precision` (state storage per parameter).

The step (:mod:`.step`): :mod:`.validate` → :mod:`.schedule` → :mod:`.refresh` / :mod:`.tucker` →
one updater per kind (:mod:`.update`, :mod:`.grouped`, :mod:`.tucker`, :mod:`.fullrank`), with the live
scalars of :mod:`.scalars`.

Around it: :mod:`.checkpoint` (state dicts, copies), :mod:`.memory` (exact byte plan),
:mod:`.inbackward` (per-parameter steps inside the backward pass). The optimizer module is imported
lazily by the package (``coap_compile.CoapOptimizer``); this module imports nothing.
"""

__all__: list[str] = []
