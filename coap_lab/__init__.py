"""The demo and benchmark side of ``coap-compile``, kept out of the optimizer library.

``coap_compile`` is the library (it imports nothing from here); this package holds what exercises and
measures it:

* :mod:`coap_lab.cli`: the ``coap-compile`` command line (``demo``, ``bench …``, ``optimizers``) and the
  code the ``benchmarks/`` scripts share with it; also ``python -m coap_lab``;
* :mod:`coap_lab.models`: the LLaMA-style LM and the DDPM UNet the demos and benchmarks train;
* :mod:`coap_lab.data`: byte-level text corpora and matplotlib's sample-image patches;
* :mod:`coap_lab.studies`: research scripts whose tables are quoted in the library's docstrings;
* :mod:`coap_lab.launch`: :func:`~coap_lab.launch.run_distributed`, a local multi-process launcher for
  tests and examples.

Plots and the vision data need matplotlib: ``pip install 'coap-compile[demo]'``.
"""

from __future__ import annotations

__all__: list[str] = []
