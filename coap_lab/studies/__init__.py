"""Research scripts whose measurements are quoted in the core's docstrings.

* :mod:`.projection`: how far each projection policy moves ``P`` per refresh and how well it then fits
  the gradients (the table in :mod:`coap_compile.projection.coap`, behind ``DEFAULT_ANGLE``).

The storage study (bf16/int8 states) is the script ``benchmarks/storage_study.py``.
"""
