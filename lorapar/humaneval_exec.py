"""Run HumanEval completions against their tests, each in its own limited subprocess; pass@k.

Every program (prompt + completion + the problem's `test` + `check(entry_point)`) runs as
`python -I program.py` in a fresh temporary directory that is its working directory and HOME, with
an environment holding nothing of the parent's. Before the program starts, a bootstrap sets resource
limits (address space, CPU seconds, size of written files, no core dumps). A wall-clock timeout kills
the whole process group, so a program that forks or loops forever is stopped with its children.

What this sandbox does and does not do. `-I` keeps the project's files off `sys.path` (no script
directory, no PYTHONPATH, no user site-packages) and the working directory is empty, so the code
cannot import or clobber the project by relative paths. It is NOT a security boundary: the program
runs as the same user, can read and write any file that user can through an absolute path, can use
the network and can start processes (bounded only by the timeout). Run untrusted model output inside
a container or a VM (as the HumanEval authors advise) when that matters.

The limits are applied by the bootstrap inside the child rather than by `preexec_fn`, because
`preexec_fn` may deadlock when the parent has threads, and the runner calls subprocesses from a
thread pool.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

BOOTSTRAP = """\
import resource, runpy, sys
memory, cpu, fsize = (int(v) for v in sys.argv[1:4])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass
class ExecResult:
    status: str  # "passed", "failed" (an exception or a non-zero exit) or "timeout"
    seconds: float
    stderr: str  # the tail of the program's stderr, for the per-item record

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def program_text(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval's check program: the prompt and completion define the function, `test` defines check()."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_program(source: str, timeout: float = 5.0, memory_mb: int = 1024, file_mb: int = 16) -> ExecResult:
    """Run `source` in its own process group and temporary directory; passed = exit status 0 in time."""
    with tempfile.TemporaryDirectory(prefix="lorapar-exec-") as work:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        limits = [str(memory_mb * 2**20), str(math.ceil(timeout) + 1), str(file_mb * 2**20)]
        env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", BOOTSTRAP, *limits], cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(process)
            _, stderr = process.communicate()
            status = "timeout"
        finally:
            _kill_group(process)  # children left behind by a program that exited normally
        tail = stderr.decode("utf-8", "replace")[-2000:]
        return ExecResult(status, time.perf_counter() - start, tail)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session made the child its group's leader
    except (ProcessLookupError, PermissionError):
        pass


def run_many(
    sources: Sequence[str], workers: int = 2, timeout: float = 5.0, memory_mb: int = 1024, progress: bool = True
) -> list[ExecResult]:
    """run_program over many programs with `workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda s: run_program(s, timeout=timeout, memory_mb=memory_mb), sources)
        return list(tqdm(jobs, total=len(sources), desc="humaneval exec", disable=not progress))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the large binomials.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's: a new top-level statement


def truncate_completion(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut a generated function body where the model starts a new top-level statement."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> Optional[float]:
    """Mean pass@k over problems, or None when k exceeds the samples per problem."""
    if k > n or not correct_counts:
        return None
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
