"""Atomic file writes: every output and checkpoint goes to a temporary file first, then `os.replace`.

A crash mid-write leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the same directory; on success it replaces `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the data must be on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def named_errors(path: str, expected: str) -> Iterator[None]:
    """Re-raise a reader's error about a broken file (a truncated safetensors or gzip, bad JSON) as one that
    names `path` and what it should hold; a missing file stays FileNotFoundError."""
    import zlib

    from safetensors import SafetensorError

    from lorapar.errors import InputError

    try:
        yield
    except (SafetensorError, EOFError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(
            f"{path}: not readable as {expected} ({type(error).__name__}: {error}); "
            "is it truncated or another kind of file?"
        ) from None
    except OSError as error:
        if isinstance(error, FileNotFoundError) or error.filename:
            raise
        raise InputError(f"{path}: not readable as {expected} ({error})") from None  # gzip.BadGzipFile and co.


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(path: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, tmp, metadata=metadata)


def atomic_torch_save(path: str, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
