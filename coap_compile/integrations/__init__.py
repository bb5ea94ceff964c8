"""Integrations with training frameworks; each imports its framework lazily, only when used.

* :mod:`coap_compile.integrations.transformers`: Hugging Face ``Trainer`` / ``TrainingArguments``
  (``Trainer(..., optimizer_cls_and_kwargs=coap_optimizer_cls_and_kwargs(args))``).

**Other drop-in surfaces** (no adapter needed; each is tested against a reference in
``tests/test_integration_surfaces.py``):

* ``torch.optim.swa_utils``: ``AveragedModel(model)`` averages the COAP-trained weights (equal to the
  running mean of the weight snapshots); ``SWALR(opt, swa_lr=…)`` drives the lr of every group, projected
  or not (it adds ``swa_lr``/``initial_lr`` keys to the groups, which the compiled base ignores).
  ``update_bn`` touches only the model and works unchanged.
* ``torch.amp.GradScaler`` (``"cpu"``, and ``"cuda"`` under ``@pytest.mark.cuda``): ``scaler.step(opt)``
  unscales the gradients (``unscale_`` walks ``opt.param_groups``) and skips the step on inf/NaN, so
  COAP never sees a non-finite gradient; with a power-of-two scale the trained weights equal the unscaled
  run bit for bit. COAP does not set ``_step_supports_amp_scaling``: it takes the ordinary path
  (unscale, then ``step()``), which costs one ``.item()`` per step as for every torch optimizer.
* ``accelerate.Accelerator.prepare(model, opt)`` wraps the optimizer in ``AcceleratedOptimizer``;
  ``accelerator.accumulate`` skips the inner ``step()`` on non-sync micro-batches, and
  ``save_state``/``load_state`` round-trip the (tensors-only) COAP state dict bit-identically.

What does not work, and why:

* ``accelerate`` with DeepSpeed or FSDP1 plugins: those engines replace the optimizer (DeepSpeed builds
  its own from the config, or wraps ours in ZeRO partitioning that flattens parameters into 1-D buffers,
  so no 2-D weight is left to project). FSDP2 (``fully_shard``) keeps ``DTensor`` parameters and is the
  distributed path COAP supports (``coap_compile.distributed``).
* The layer-wise (in-backward) Trainer variant is not here yet (see the placeholder in
  :mod:`.transformers`).
"""

from __future__ import annotations

__all__: list[str] = ["transformers"]


def __getattr__(name: str):
    if name == "transformers":  # lazy: importing coap_compile.integrations never imports transformers
        import importlib

        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
