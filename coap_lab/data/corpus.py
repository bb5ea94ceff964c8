"""Byte-level text corpora with a fixed, deterministic train/validation split.

The default corpus is the ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), read in sorted relative-path order.
It is always available, needs no download and is the same on every machine with the same Python
version. A user corpus is a text file or a folder of text files (``.txt``, ``.md``, ``.py``, … or any
file when ``suffixes`` is None).

Split rule (deterministic, independent of file order on disk):

* several files: a file goes to validation iff the first byte of ``sha256(relative path)`` is
  ``< 256 · val_fraction`` (≈5 % of files by default); if that selects none, the last file
  in sorted order is used, and if it selects all, the first one goes back to training;
* one file: its last ``val_fraction`` of bytes (cut at a newline when possible) is validation.

Tokens are raw bytes (vocab 256). Batches are drawn from a seeded ``torch.Generator``, so two runs
with the same seed see exactly the same data in the same order.

Size needed for a sequence length ``T`` (:func:`required_bytes`): ``T + 2`` training bytes (at least two
distinct windows of ``T + 1`` bytes) and ``T + 1`` validation bytes (one window). The batch size does not
enter: windows are drawn with replacement. A folder's files whose suffix is not read are counted per
suffix in :attr:`Corpus.skipped` so a caller can say what was left out.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "TEXT_SUFFIXES",
    "Corpus",
    "CorpusError",
    "BatchSampler",
    "default_corpus_root",
    "list_corpus_files",
    "load_corpus",
    "min_single_file_bytes",
    "required_bytes",
    "scan_corpus_folder",
    "suffix_label",
    "validation_windows",
]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".json", ".csv", ".tex", ".html")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """The corpus is missing, empty, or too small for the requested sequence length."""


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into training and validation streams.

    Attributes:
        train: uint8 tensor of training bytes (files joined by a newline).
        val: uint8 tensor of validation bytes.
        source: where the corpus came from (path, or ``"stdlib:<dir>"``).
        num_files: files read; ``num_val_files`` of them went to validation.
        sha256: digest of the train stream followed by the val stream (identifies the data exactly).
        skipped: ``((suffix, files), ...)`` of a folder's files not read because of their suffix
            (``""`` for files without one), sorted by suffix; empty for a single file.
        empty_files: files skipped because they hold only whitespace.
        suffixes: the suffixes read from a folder (None: every file).
    """

    train: Tensor
    val: Tensor
    source: str
    num_files: int
    num_val_files: int
    sha256: str
    skipped: tuple[tuple[str, int], ...] = ()
    empty_files: int = 0
    suffixes: tuple[str, ...] | None = TEXT_SUFFIXES

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary for result files."""
        return {
            "source": self.source,
            "files": self.num_files,
            "val_files": self.num_val_files,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "sha256": self.sha256,
            "skipped_by_suffix": dict(self.skipped),
            "empty_files": self.empty_files,
        }

    def skipped_note(self) -> str | None:
        """One sentence naming the suffixes skipped in a folder and how many files each, or None."""
        if not self.skipped:
            return None
        total = sum(n for _, n in self.skipped)
        parts = ", ".join(f"{suffix_label(s)} ({n})" for s, n in self.skipped)
        read = "every suffix" if self.suffixes is None else " ".join(self.suffixes)
        return f"skipped {total} file{'s' * (total != 1)} by suffix: {parts}; read suffixes: {read}"


def default_corpus_root() -> Path:
    """The standard-library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def suffix_label(suffix: str) -> str:
    """``".bin"`` as is, ``""`` as ``"(no suffix)"``."""
    return suffix or "(no suffix)"


def scan_corpus_folder(
    root: Path, suffixes: tuple[str, ...] | None = TEXT_SUFFIXES
) -> tuple[list[Path], dict[str, int]]:
    """``(files with one of suffixes sorted by relative path, {other suffix: files skipped})``.

    Hidden files and folders, ``site-packages``, ``dist-packages`` and ``__pycache__`` are not walked
    and not counted. Suffixes compare in lower case.
    """
    found: list[Path] = []
    skipped: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffixes is None or suffix in suffixes:
                found.append(Path(dirpath, name))
            else:
                skipped[suffix] = skipped.get(suffix, 0) + 1
    return sorted(found, key=lambda q: q.relative_to(root).as_posix()), dict(sorted(skipped.items()))


def list_corpus_files(root: Path, suffixes: tuple[str, ...] | None = TEXT_SUFFIXES) -> list[Path]:
    """Files under ``root`` with one of ``suffixes``, sorted by relative path; skips site-packages/caches."""
    return scan_corpus_folder(root, suffixes)[0]


def required_bytes(seq_len: int) -> tuple[int, int]:
    """``(training, validation)`` bytes that :class:`BatchSampler` and :func:`validation_windows` need."""
    return seq_len + 2, seq_len + 1


def min_single_file_bytes(seq_len: int, val_fraction: float = 0.05) -> int:
    """Smallest single-file size whose split always gives both parts :func:`required_bytes`.

    Validation is at least ``max(1, int(L·val_fraction))`` bytes (a newline cut only moves bytes to it);
    training is at least ``cut // 2 + 1`` with ``cut = L − max(1, int(L·val_fraction))`` (the newline cut
    never goes below half of ``cut``). Both bounds grow with ``L``, so the first ``L`` meeting them is it.
    """
    need_train, need_val = required_bytes(seq_len)
    size = max(1, math.ceil(need_val / val_fraction) - 1)
    while True:
        val = max(1, int(size * val_fraction))
        if val >= need_val and (size - val) // 2 + 1 >= need_train:
            return size
        size += 1


def _is_val(rel: str, val_fraction: float) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] < 256 * val_fraction


def _join(chunks: list[bytes]) -> Tensor:
    data = b"\n".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def load_corpus(
    path: str | Path | None = None,
    *,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    suffixes: tuple[str, ...] | None = TEXT_SUFFIXES,
) -> Corpus:
    """Read a corpus and split it (see the module docstring).

    Args:
        path: a text file, a folder of text files, or None for the standard library's ``.py`` files.
        val_fraction: share of files (folder) or bytes (single file) kept for validation, in (0, 0.5].
        max_bytes: stop reading files once this many bytes were read (sorted order, so deterministic).
        suffixes: file suffixes to read from a folder (None: every file). The default corpus uses ``.py``.

    Raises:
        CorpusError: the path does not exist, or holds no non-empty text (the message names the
            suffixes skipped, if any).
    """
    if not 0.0 < val_fraction <= 0.5:
        raise CorpusError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if path is None:
        root, suffixes, source = default_corpus_root(), (".py",), f"stdlib:{default_corpus_root()}"
    else:
        root, source = Path(path), str(path)
        if not root.exists():
            raise CorpusError(f"corpus not found: {root}")
    skipped: dict[str, int] = {}
    files = [root] if root.is_file() else None
    if files is None:
        files, skipped = scan_corpus_folder(root, suffixes)
    texts: list[tuple[str, bytes]] = []
    total = empty = 0
    for f in files:
        data = f.read_bytes()
        if not data.strip():
            empty += 1
            continue
        texts.append((f.name if f == root else f.relative_to(root).as_posix(), data))
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not texts:
        what = f"{empty} empty file{'s' * (empty != 1)}" if empty else "no file"
        read = "any suffix" if suffixes is None else " ".join(suffixes)
        msg = f"corpus is empty: no non-empty text files in {root} ({what} with a suffix read: {read})"
        if skipped:
            n = sum(skipped.values())
            parts = ", ".join(f"{suffix_label(k)} ({v})" for k, v in skipped.items())
            msg += f"; skipped {n} file{'s' * (n != 1)} by suffix: {parts}"
        raise CorpusError(msg)
    if len(texts) == 1:
        data = texts[0][1]
        cut = len(data) - max(1, int(len(data) * val_fraction))
        newline = data.rfind(b"\n", 0, cut)
        cut = newline + 1 if newline > cut // 2 else cut
        train_chunks, val_chunks = [data[:cut]], [data[cut:]]
    else:
        flags = [_is_val(rel, val_fraction) for rel, _ in texts]
        if not any(flags):
            flags[-1] = True
        if all(flags):
            flags[0] = False
        train_chunks = [d for (_, d), v in zip(texts, flags) if not v]
        val_chunks = [d for (_, d), v in zip(texts, flags) if v]
    train, val = _join(train_chunks), _join(val_chunks)
    digest = hashlib.sha256(train.numpy().tobytes() + val.numpy().tobytes()).hexdigest()
    return Corpus(
        train,
        val,
        source,
        len(texts),
        len(val_chunks) if len(texts) > 1 else 0,
        digest,
        skipped=tuple(skipped.items()),
        empty_files=empty,
        suffixes=suffixes,
    )


class BatchSampler:
    """Random ``batch × (seq_len + 1)`` windows of a byte stream, from a seeded generator.

    The i-th batch depends only on ``(seed, i)``'s position in the stream of draws, so two samplers
    with the same seed yield identical batches, whatever happens between the draws.
    """

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int):
        need = required_bytes(seq_len)[0]
        if data.numel() < need:
            raise CorpusError(
                f"training text has {data.numel()} bytes; seq_len={seq_len} needs at least {need}"
            )
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> Tensor:
        """The next ``batch_size × (seq_len + 1)`` int64 batch (CPU)."""
        hi = self.data.numel() - self.seq_len - 1
        starts = torch.randint(0, hi + 1, (self.batch_size,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        return self.data[idx].long()


def validation_windows(data: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """Up to ``max_windows`` evenly spaced, non-overlapping ``(seq_len + 1)`` windows of ``data`` (int64)."""
    n = (data.numel() - 1) // seq_len
    need = required_bytes(seq_len)[1]
    if data.numel() < need:
        raise CorpusError(
            f"validation text has {data.numel()} bytes; seq_len={seq_len} needs at least {need}"
        )
    picks = torch.linspace(0, n - 1, min(n, max_windows)).round().long().unique()
    idx = picks[:, None] * seq_len + torch.arange(seq_len + 1)
    return data[idx].long()
