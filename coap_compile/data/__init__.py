"""Data for the demo and the quality benchmark: byte-level corpora with a deterministic split."""

from __future__ import annotations

from coap_compile.data.corpus import (
    BatchSampler,
    Corpus,
    CorpusError,
    load_corpus,
    min_single_file_bytes,
    required_bytes,
    validation_windows,
)

__all__ = [
    "BatchSampler",
    "Corpus",
    "CorpusError",
    "load_corpus",
    "min_single_file_bytes",
    "required_bytes",
    "validation_windows",
]
