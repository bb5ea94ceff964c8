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

* Full-rank parameters that run their *captured* update (inside ``torch.compile``, or with an explicit
  ``state_precision``) produce NaN at ``lr = 0`` where a gradient entry is exactly zero: the capture is
  torch's capturable Adam arithmetic, which divides by ``-lr / (1 - β₁ᵏ)``. Every transformers warm-up
  starts at ``lr = 0`` (and embedding rows of tokens absent from the batch have zero gradients), so
  ``Trainer`` with ``optim_args="state_precision=bf16"`` and a warm-up fails at its second step
  (``NonFiniteGradientError``); the strict xfail in tests/test_integration_transformers.py tracks it.
  The eager default path (unmodified torch AdamW for full-rank parameters) is not affected.
* Not tested here, and not expected to work: ``accelerate`` with DeepSpeed ZeRO (it partitions the
  optimizer's parameter groups into flat 1-D buffers, so no 2-D weight is left to project) and FSDP1
  without ``use_orig_params`` (its ``FlatParameter`` is 1-D too). FSDP2 (``fully_shard``) keeps
  ``DTensor`` parameters and is the distributed path COAP supports (``coap_compile.distributed``).
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
