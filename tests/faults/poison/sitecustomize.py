"""Test-only: a decoder that segfaults on a marked file, without the product knowing.

Put this folder first on a worker's PYTHONPATH (the chaos run, :mod:`tests.chaos.procs`): every Python process of the worker, its spawned decoding processes included, imports this
module at start. It wraps :func:`pipeline.stages.audio.decode` and ``decode_excerpts`` as the
module is first imported, so that a decoding *child* process given audio whose first bytes are
:data:`MARKER` kills itself with SIGSEGV, as a crashing native decoder would. The main process
(and any process that is not a multiprocessing child) decodes the marked file as usual, which
fails: it is not audio.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import io
import multiprocessing
import os
import signal
import sys
from typing import Any

MARKER = b"MOODSTREAM-TEST-SEGV"
_TARGET = "pipeline.stages.audio"


def _head(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data[: len(MARKER)])
    if isinstance(data, io.IOBase) or hasattr(data, "read"):
        at = data.tell()
        try:
            data.seek(0)
            return data.read(len(MARKER))
        finally:
            data.seek(at)
    return b""


def _crashing(function: Any) -> Any:
    def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
        if multiprocessing.parent_process() is not None and _head(data) == MARKER:
            os.kill(os.getpid(), signal.SIGSEGV)
        return function(data, *args, **kwargs)

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.decode = _crashing(module.decode)
        module.decode_excerpts = _crashing(module.decode_excerpts)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _Finder())
