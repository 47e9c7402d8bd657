"""Run one untrusted Python program contained: its own namespaces, a read-only filesystem, a harness marker.

The process tree for one program:

    evaluator --Popen--> supervisor (SUPERVISOR: a new session; pure Python, never runs untrusted code)
                            unshare(user, mount, pid); fork
                         -> setup, PID 1 of a new PID namespace (INIT_SETUP): makes every mount read-only
                            except the program's temporary directory, mounts a /proc that shows only the
                            namespace, enters a second user namespace, then execs
                         -> harness (HARNESS): resource limits, runs program.py, writes the marker

What each setup isolates (`probe()` tells which one this machine gives; the README has the table):

- "namespaces" (Linux with unprivileged user namespaces, or root): the program cannot signal, trace or
  see any process outside its PID namespace (so not the evaluator, nor read `/proc/<pid>/environ`);
  every mount is read-only except its temporary directory (which is its cwd, HOME and TMPDIR); its
  uid is unprivileged inside a nested user namespace, so it cannot remount anything back (mounts it
  inherits there are locked by the kernel). When the supervisor is killed at the timeout, PID 1 dies
  (PR_SET_PDEATHSIG) and the kernel kills every process of the namespace, including ones that called
  setsid(). Not isolated: the network, and reading files the user can read.
- "process" (no user namespaces, e.g. an AppArmor policy that forbids them): a new session, rlimits
  (memory, CPU, file size, process count) and a clean environment only. The program can write what
  the user can, read other processes' environments, and signal the evaluator; a descendant that
  leaves the session survives the timeout kill. Results are written as they finish, so an evaluator
  killed this way resumes where it stopped.

Passing is decided by the marker, never by the exit status: the supervisor's parent sends a random
nonce on stdin, the harness reads it and closes stdin before the program starts, and writes it to a
pipe of its own only after `exec` of the whole program (which ends with `check(entry_point)`) has
returned. A program that exits early (`SystemExit(0)`, `os._exit(0)`, a signal to itself) or prints
text of its choosing never produces it. What it cannot stop: code that deliberately inspects the
harness's memory runs in the same interpreter as the tests, and such code can defeat the tests
themselves anyway (an object whose __eq__ is always true); this sandbox contains programs, it does not
make a cheating program's score honest.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

MODES = ("auto", "namespaces", "process")

# Runs in the harness process: limits first, then the program; the marker only after it returned.
HARNESS = """\
import os, resource, sys


def run(result_fd, memory, cpu, fsize, nproc):
    nonce = sys.stdin.buffer.read(64)  # a local, so the program's globals and __main__ never hold it
    sys.stdin.close()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
        resource.setrlimit(limit, (value, value))
    sys.argv = ["program.py"]
    with open("program.py", encoding="utf-8") as handle:
        code = compile(handle.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
    os.write(result_fd, nonce)


run(*(int(v) for v in sys.argv[1:6]))
"""

# Runs in the supervisor, a fresh interpreter that only forks, waits and kills.
SUPERVISOR = r"""
import ctypes, os, signal, sys
mode, work, as_nobody, harness = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
libc = ctypes.CDLL(None, use_errno=True)
NOBODY = 65534
if as_nobody:  # root: become nobody first, so the program is an ordinary user to the kernel (rlimits hold)
    os.chown(work, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    PR_SET_DUMPABLE = 4
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change makes /proc/self root-owned; the maps live there
uid, gid = os.getuid(), os.getgid()
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
SETUP_FAILED = 125

def check(ok, what):
    if not ok:
        err = ctypes.get_errno()
        os.write(2, f"sandbox setup: {what} failed: {os.strerror(err)}\n".encode())
        os._exit(SETUP_FAILED)

def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)

def mount(source, target, fstype, flags):
    check(libc.mount(source, target, fstype, flags, None) == 0, f"mount {target}")

def own_user_namespace(inner_uid, outer_uid, outer_gid):
    check(libc.unshare(CLONE_NEWUSER) == 0, "unshare(user)")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1")
    write("/proc/self/gid_map", f"{inner_uid} {outer_gid} 1")

def read_only_everywhere_but(work):
    mount(None, b"/", None, MS_REC | MS_PRIVATE)  # nothing we do leaks back to the evaluator's mounts
    mount(work.encode(), work.encode(), None, MS_BIND | MS_REC)
    mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # only this PID namespace
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].encode().decode("unicode_escape")
            inside = (work, "/proc")  # the work dir stays writable; the new /proc hides the old one's submounts
            if not any(point == top or point.startswith(top + "/") for top in inside):
                points.append(point)
    for point in sorted(set(points), key=len):
        stats = os.statvfs(point)
        # A remount inside a user namespace must keep the flags the kernel locked (nosuid, nodev, ...).
        kept = sum(flag for st, flag in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                                         (os.ST_NOEXEC, MS_NOEXEC)) if stats.f_flag & st)
        if libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None) != 0:
            check(stats.f_flag & os.ST_RDONLY, f"read-only remount of {point}")

if mode == "namespaces":
    own_user_namespace(0, uid, gid)
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID) == 0, "unshare(mount, pid)")
child = os.fork()
if child == 0:
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the supervisor's death ends the namespace
    if mode == "namespaces":
        read_only_everywhere_but(work)
        os.chdir(work)  # the old cwd is the directory under the writable bind mount, now read-only
        own_user_namespace(1000, 0, 0)  # unprivileged from here: no remount, no new mount over ours
    os.execv(sys.executable, [sys.executable, "-I", "-c", *harness])
_, status = os.waitpid(child, 0)
os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


class SandboxError(RuntimeError):
    """The sandbox asked for cannot be set up on this machine."""


@dataclass
class ExecResult:
    status: str  # "passed" (the harness marker arrived), "failed" or "timeout"
    seconds: float
    stderr: str  # the tail of the program's stderr, for the per-item record

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def check_limits(timeout: float, memory_mb: int, file_mb: int, max_processes: int) -> None:
    for name, value in (
        ("timeout", timeout),
        ("memory_mb", memory_mb),
        ("file_mb", file_mb),
        ("max_processes", max_processes),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"sandbox limit {name}={value!r}: expected a finite number > 0")


def run_contained(
    source: str,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    max_processes: int = 64,
    mode: str = "auto",
) -> ExecResult:
    """Run `source` as program.py in a fresh temporary directory inside the sandbox `mode` (see the module doc)."""
    check_limits(timeout, memory_mb, file_mb, max_processes)
    resolved = resolve_mode(mode)
    with tempfile.TemporaryDirectory(prefix="lorapar-exec-") as work:
        work = os.path.realpath(work)
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        return _run(work, timeout, memory_mb, file_mb, max_processes, resolved)


def _run(work: str, timeout: float, memory_mb: int, file_mb: int, max_processes: int, mode: str) -> ExecResult:
    nonce = secrets.token_hex(16).encode()
    result_read, result_write = os.pipe()
    limits = [str(memory_mb * 2**20), str(math.ceil(timeout) + 1), str(file_mb * 2**20), str(max_processes)]
    harness = [HARNESS, str(result_write), *limits]
    env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    try:  # -S: the supervisor needs no site-packages, and skipping them halves its start-up
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", SUPERVISOR, mode, work, "1" if _drop_root() else "0", *harness],
            cwd=work,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=(result_write,),
        )
    finally:
        os.close(result_write)
    try:
        timed_out = False
        try:
            _, stderr = process.communicate(nonce, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(process)
            stderr = _drain(process)
        finally:
            _kill(process)
        os.set_blocking(result_read, False)
        try:
            marker = os.read(result_read, 256)
        except BlockingIOError:
            marker = b""
    finally:
        os.close(result_read)
    tail = stderr.decode("utf-8", "replace")[-2000:]
    passed = marker == nonce and process.returncode == 0
    status = "passed" if passed else "timeout" if timed_out else "failed"
    return ExecResult(status, time.perf_counter() - start, tail)


@functools.lru_cache(maxsize=None)
def _drop_root() -> bool:
    """Run as nobody when root and nobody can execute this interpreter (not so when it lives under /root)."""
    if os.getuid() != 0:
        return False
    path = os.path.realpath(sys.executable)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def _drain(process: subprocess.Popen) -> bytes:
    """stderr after the kill; a descendant that left the group (process mode) may hold the pipe: stop waiting."""
    try:
        return process.communicate(timeout=2.0)[1]
    except subprocess.TimeoutExpired:
        process.stderr.close()  # type: ignore[union-attr]
        process.wait()
        return b"(stderr not read: a process that left the sandbox's group holds it open)"


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the supervisor's group; in a PID namespace its death takes every descendant with it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@functools.lru_cache(maxsize=None)
def probe() -> tuple[str, str]:
    """(mode, reason): "namespaces" when a contained trivial program runs here, else "process" and why not."""
    if not sys.platform.startswith("linux"):
        return "process", f"user namespaces are Linux-only (platform {sys.platform})"
    with tempfile.TemporaryDirectory(prefix="lorapar-probe-") as work:
        work = os.path.realpath(work)
        with open(os.path.join(work, "program.py"), "w") as handle:
            handle.write("pass\n")
        result = _run(work, 20.0, 512, 1, 16, "namespaces")
    if not result.passed:
        return "process", f"the namespace probe did not pass ({result.status}: {result.stderr.strip()[-300:]})"
    return "namespaces", "user, mount and PID namespaces"


_warned: set = set()


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r}: expected one of {MODES}")
    if mode == "process":
        return mode
    found, reason = probe()
    if found == "namespaces":
        return found
    if mode == "namespaces":
        raise SandboxError(f"the namespace sandbox is not available here: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        log.warning(
            "HumanEval sandbox: no namespaces (%s). Programs run with rlimits and a new session only: "
            "they can write what this user can, read other processes' environments and signal the "
            "evaluator. Use --sandbox namespaces to require isolation.",
            reason,
        )
    return "process"


def result_record(key: str, result: ExecResult) -> str:
    return json.dumps({"key": key, "status": result.status, "seconds": result.seconds, "stderr": result.stderr})


def load_records(path: Optional[str]) -> dict[str, ExecResult]:
    """Results already written by an interrupted run (a torn last line is ignored: it is rerun)."""
    done: dict[str, ExecResult] = {}
    if not path or not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
                done[row["key"]] = ExecResult(row["status"], row["seconds"], row["stderr"])
            except (ValueError, KeyError, TypeError):
                continue
    return done
