"""On-disk cache of generated kernel modules.

A real ``@triton.jit`` function must live in a Python *file* (Triton reads its source with
``inspect.getsourcelines``; a function ``exec``'d from a string only works under the interpreter), so every
generated source is written to ``<cache dir>/<name>_<sha256(src)[:16]>.py`` (temporary file +
``os.replace``, safe with parallel workers) and imported with :mod:`importlib`. Each source is imported
once per process (an in-process dict keyed by the source hash); Triton's own cache then keys the compiled
binaries on source + argument specialization.

The directory is ``$COAP_COMPILE_CACHE_DIR`` if set, else ``~/.cache/coap_compile/kernels``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

__all__ = [
    "cache_dir",
    "clear_memory_cache",
    "interpreting",
    "load_module",
    "loaded_modules",
    "source_path",
]

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    """The kernel cache directory (created on demand by :func:`load_module`)."""
    env = os.environ.get("COAP_COMPILE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "coap_compile" / "kernels"


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def source_path(name: str, source: str) -> Path:
    """Where ``source`` is (or will be) written: ``cache_dir()/<name>_<sha256[:16]>.py``."""
    return cache_dir() / f"{name}_{_digest(source)}.py"


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on (``triton.jit`` reads it when a module is imported)."""
    # A module imported in one mode is not reused in the other.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == source:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_module(name: str, source: str) -> ModuleType:
    """Write ``source`` to the cache directory (if needed) and import it, once per process."""
    key = (_digest(source), interpreting())
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        path = source_path(name, source)
        _write(path, source)
        mod_name = f"coap_compile_generated_{path.stem}{'_interp' if key[1] else ''}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import generated kernel module {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[mod_name]
            raise
        _MODULES[key] = mod
        return mod


def loaded_modules() -> dict[str, ModuleType]:
    """The modules imported so far in this process, keyed by their file path."""
    with _LOCK:
        return {m.__file__ or "": m for m in _MODULES.values()}


def clear_memory_cache() -> None:
    """Forget the in-process modules (files stay on disk). For tests."""
    with _LOCK:
        _MODULES.clear()
