"""Data for the demo and the quality benchmark: byte-level corpora with a deterministic split."""

from __future__ import annotations

from coap_compile.data.corpus import (
    BatchSampler,
    Corpus,
    CorpusError,
    load_corpus,
    validation_windows,
)

__all__ = ["BatchSampler", "Corpus", "CorpusError", "load_corpus", "validation_windows"]
