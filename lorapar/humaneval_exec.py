"""Run HumanEval completions against their tests, each contained by lorapar/sandbox.py; pass@k.

Every program (prompt + completion + the problem's `test` + `check(entry_point)`) runs in a fresh
temporary directory that is its working directory and HOME, with an environment holding nothing of
the parent's, under resource limits (address space, CPU seconds, written file size, processes, no core
dumps). A program passes only when the harness's marker arrives after `check(entry_point)` returned;
its exit status alone never counts. sandbox.py says what is isolated on which setup (namespaces where
the kernel allows them, else a process with limits and a warning).

Results are appended to `results_path` (JSON lines keyed by position and the program's hash) as each
program finishes, so an evaluation that is killed resumes without rerunning what was done.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from lorapar.sandbox import ExecResult, check_limits, load_records, resolve_mode, result_record, run_contained

__all__ = [
    "ExecResult",
    "program_text",
    "run_program",
    "run_many",
    "pass_at_k",
    "mean_pass_at_k",
    "truncate_completion",
]


def program_text(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """HumanEval's check program: the prompt and completion define the function, `test` defines check()."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_program(
    source: str,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    file_mb: int = 16,
    max_processes: int = 64,
    sandbox: str = "auto",
) -> ExecResult:
    """Run `source` contained; passed = the harness marker after the whole program ran, in time."""
    return run_contained(
        source, timeout=timeout, memory_mb=memory_mb, file_mb=file_mb, max_processes=max_processes, mode=sandbox
    )


def run_many(
    sources: Sequence[str],
    workers: int = 2,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    progress: bool = True,
    results_path: Optional[str] = None,
    sandbox: str = "auto",
    max_processes: int = 64,
) -> list[ExecResult]:
    """run_program over many programs with `workers` at a time; results in input order.

    With `results_path`, each result is appended there as it finishes and results already there (from a
    run that was killed) are reused for the same program at the same position.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: expected an integer >= 1")
    check_limits(timeout, memory_mb, 16, max_processes)
    sandbox = resolve_mode(sandbox)  # probe (and warn) once, before the pool starts
    keys = [f"{i}:{hashlib.sha256(s.encode()).hexdigest()[:16]}" for i, s in enumerate(sources)]
    done = load_records(results_path)
    results: list[Optional[ExecResult]] = [done.get(k) for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    handle = open(results_path, "a", encoding="utf-8") if results_path else None
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = {
                pool.submit(run_program, sources[i], timeout, memory_mb, 16, max_processes, sandbox): i for i in todo
            }
            bar = tqdm(
                total=len(sources), initial=len(sources) - len(todo), desc="humaneval exec", disable=not progress
            )
            for job in as_completed(jobs):
                i = jobs[job]
                results[i] = job.result()
                if handle is not None:  # only this thread writes
                    handle.write(result_record(keys[i], results[i]) + "\n")
                    handle.flush()  # in the kernel's hands: survives the evaluator being killed
                bar.update(1)
            bar.close()
    finally:
        if handle is not None:
            handle.close()
    return results  # type: ignore[return-value]


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
