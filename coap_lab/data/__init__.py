"""Data for the demo and the benchmarks: byte-level corpora with a deterministic split, and image patches
of matplotlib's sample images for the vision task (:mod:`coap_lab.data.images`)."""

from __future__ import annotations

from coap_lab.data.corpus import (
    BatchSampler,
    Corpus,
    CorpusError,
    load_corpus,
    min_single_file_bytes,
    required_bytes,
    validation_windows,
)
from coap_lab.data.images import (
    SAMPLE_IMAGES,
    ImageDataError,
    PatchSet,
    image_grid,
    load_patches,
    load_sample_image,
)

__all__ = [
    "SAMPLE_IMAGES",
    "BatchSampler",
    "Corpus",
    "CorpusError",
    "ImageDataError",
    "PatchSet",
    "image_grid",
    "load_corpus",
    "load_patches",
    "load_sample_image",
    "min_single_file_bytes",
    "required_bytes",
    "validation_windows",
]
