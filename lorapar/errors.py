"""Expected errors (bad input the user can fix) and the one wrapper every command-line entry point uses.

An expected error prints one line naming the file, line, key or flag and what was expected, and the
process exits with status 2 (argparse's status for a bad command line); anything else is a bug and
keeps its traceback. `LORAPAR_TRACEBACK=1` shows the traceback of an expected error too.

Numeric settings are checked in each config dataclass's `__post_init__` through `check_fields`, so a
command line, the pipeline and a caller in Python all get the same check before anything is written.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Callable, Iterable, Optional


class InputError(ValueError):
    """Bad input (a file, a flag, a run directory): the message says which one and what was expected."""


class FlagError(InputError):
    """A setting outside its range; the message names the flag, the value and the range."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _number(obj: Any, name: str) -> Any:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FlagError(f"{flag_name(name)} {value!r}: expected a number")
    if not math.isfinite(value):
        raise FlagError(f"{flag_name(name)} {value}: expected a finite number")
    return value


def check_fields(
    obj: Any,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    positive_float: Iterable[str] = (),
    unit_interval: Iterable[str] = (),
    open_unit_interval: Iterable[str] = (),
    finite: Iterable[str] = (),
) -> None:
    """Raise FlagError for the first field of `obj` outside its range.

    positive: > 0 (counts, sizes; an integer field stays an integer); non_negative: >= 0;
    positive_float: a finite number > 0; unit_interval: 0 <= x <= 1; open_unit_interval: 0 < x < 1;
    finite: any finite number (a learning rate of nan or inf is refused here).
    """
    for name in positive:
        if _number(obj, name) <= 0:
            raise FlagError(f"{flag_name(name)} {getattr(obj, name)}: expected a value > 0")
    for name in positive_float:
        if _number(obj, name) <= 0:
            raise FlagError(f"{flag_name(name)} {getattr(obj, name)}: expected a number > 0")
    for name in non_negative:
        if _number(obj, name) < 0:
            raise FlagError(f"{flag_name(name)} {getattr(obj, name)}: expected a value >= 0")
    for name in unit_interval:
        if not 0 <= _number(obj, name) <= 1:
            raise FlagError(f"{flag_name(name)} {getattr(obj, name)}: expected a value in [0, 1]")
    for name in open_unit_interval:
        if not 0 < _number(obj, name) < 1:
            raise FlagError(f"{flag_name(name)} {getattr(obj, name)}: expected a value in (0, 1)")
    for name in finite:
        _number(obj, name)


def check_output_file(path: str, flag: str, overwrite: bool = False) -> None:
    """Refuse an output file path that cannot be written, before the work that produces it."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; expected a file path")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{flag} {path}: exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot create files in {existing}")


EXPECTED = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


def run_main(main: Callable[[], Any], cleanup: Optional[Callable[[], Any]] = None) -> None:
    """Run a script's main(): an expected error is one line on stderr and exit status 2."""
    try:
        main()
    except EXPECTED as error:
        if os.environ.get("LORAPAR_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if cleanup is not None:
            cleanup()
