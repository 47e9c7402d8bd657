"""An exclusive lock on a run directory (or an output file), so two runs never write into one place.

The lock is `flock` on a file `.lorapar.lock` inside the directory (or `<file>.lock` beside a file
output) holding the holder's PID. The kernel drops an flock when its process ends, however it ends,
so a lock file left by a killed run is stale by construction: the next run takes it over. A second
live run is refused with an error naming the holder's PID.

Within one process the lock is re-entrant (a test or the pipeline may call a script's main() again
on the same directory); `release` drops it when the run is done.
"""

from __future__ import annotations

import fcntl
import os

from lorapar.errors import InputError

LOCK_NAME = ".lorapar.lock"

_held: dict[str, int] = {}  # lock file path -> open descriptor holding the flock


class RunLocked(InputError):
    """Another live process holds the run directory."""


def lock_path(target: str, is_dir: bool = True) -> str:
    target = os.path.abspath(target)
    return os.path.join(target, LOCK_NAME) if is_dir else target + ".lock"


def acquire(target: str, is_dir: bool = True) -> str:
    """Take the lock of `target` (created if missing) or raise RunLocked naming the holder's PID."""
    path = lock_path(target, is_dir)
    if path in _held:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(
            f"{target} is in use by process {holder} (lock {path}); wait for that run to end or choose another output"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return path


def release(target: str, is_dir: bool = True) -> None:
    """Drop this process's lock of `target` (a no-op when it does not hold it)."""
    fd = _held.pop(lock_path(target, is_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock; the file stays, harmless and reusable
