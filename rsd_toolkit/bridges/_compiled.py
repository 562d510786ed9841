"""The bridge's per-push bookkeeping, compiled where the install could: which modules run compiled.

``setup.py`` builds :data:`MODULES` with Cython when it can (their ``.py`` is the only source; the ``.pxd``
beside each gives C types to attributes and a few locals) and records the SHA-256 of each source it built in
:data:`MANIFEST`. The ``.py`` stays a plain Python module: without a compiler the package runs it as is. A
compiled module built from other source than the ``.py`` beside it (an edited checkout not rebuilt) must
not run: then, or under ``RSD_PURE_PYTHON=1``, every one of them is imported from its source instead.

Standard library only: ``setup.py`` reads :data:`MODULES` and :func:`source_digest` from this file.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

MODULES = ("incremental", "pair", "batch")  # in import order: each imports only those before it
MANIFEST = "_compiled.json"  # beside the compiled modules: module -> SHA-256 of the source it was built from
PURE_ENV = "RSD_PURE_PYTHON"


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def built_modules(folder: Path) -> list[str]:
    """The modules of :data:`MODULES` with a compiled build in ``folder``."""
    return [m for m in MODULES if any((folder / f"{m}{s}").exists() for s in importlib.machinery.EXTENSION_SUFFIXES)]


def stale_modules(folder: Path) -> list[str]:
    """Compiled modules in ``folder`` whose recorded source differs from the ``.py`` beside them (or is not
    recorded)."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    # (an install that ships no source beside a build cannot run the source instead: its build is taken as is)
    return [m for m in built_modules(folder)
            if (folder / f"{m}.py").exists() and recorded.get(m) != source_digest(folder / f"{m}.py")]  # fmt: skip


def import_sources_if_needed(package: str, folder: Path) -> None:
    """Before the package imports them: import every module of :data:`MODULES` from its ``.py`` when any
    compiled one is stale or ``RSD_PURE_PYTHON=1`` asks for it (all or none, so ``compiled()`` is one fact)."""
    built = built_modules(folder)
    if not built:
        return
    stale = stale_modules(folder)
    if os.environ.get(PURE_ENV) != "1":
        if not stale:
            return
        warnings.warn(
            f"rsd_toolkit: the compiled bridge modules ({', '.join(stale)}) were built from other source than "
            f"{folder}; running the Python source instead (rebuild: pip install -e .)",
            RuntimeWarning,
            stacklevel=3,
        )
    parent = sys.modules[package]
    for name in MODULES:
        spec = importlib.util.spec_from_file_location(f"{package}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(parent, name, module)


def compiled(modules) -> bool:
    """Whether every given module object runs from a compiled build."""
    return all(str(getattr(m, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) for m in modules)
