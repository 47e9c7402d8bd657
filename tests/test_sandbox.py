"""The HumanEval sandbox against hostile programs: early exits, killing the evaluator, escaping the
timeout, writing outside its directory, reading the evaluator's environment, bad limits, fork bombs.

Each attack runs against the real sandbox (lorapar/sandbox.py). The isolation tests need the
namespace setup and ask for it explicitly (sandbox="namespaces"), so they can never fall back to the
process mode, where a program that kills every process it sees would do exactly that; where the
kernel refuses user namespaces they skip with the probe's reason.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from test_evaluate import processes_with

from lorapar import sandbox
from lorapar.evaluate import EvalArgs
from lorapar.humaneval_exec import program_text, run_many, run_program

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def program(completion: str) -> str:
    return program_text(PROMPT, completion, TEST, "add")


def needs_namespaces() -> None:
    mode, reason = sandbox.probe()
    if mode != "namespaces":
        pytest.skip(f"the namespace sandbox is not available here: {reason}")


# ----------------------------------------------------------------------------- 1. passing needs the marker


def test_a_correct_program_passes_and_a_wrong_one_fails():
    assert run_program(program("    return a + b\n")).passed
    assert run_program(program("    return a - b\n")).status == "failed"


@pytest.mark.parametrize(
    "escape",
    [
        "raise SystemExit(0)",
        "import os\nos._exit(0)",
        "import sys\nsys.exit()",
        "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "import os\nos.write(1, b'passed\\n')\nos.write(3, b'0' * 32)\nos._exit(0)",  # forged output, guessed marker
    ],
)
def test_a_program_that_exits_before_its_tests_is_not_passed(escape):
    # A wrong body, then a top-level exit after the function (truncate_completion keeps such lines).
    result = run_program(program("    return a - b\n\n" + escape + "\n"))
    assert result.status == "failed", (escape, result)


# ----------------------------------------------------------------------------- 2. the evaluator survives


def test_killing_the_parent_or_every_visible_process_leaves_the_evaluator_running(tmp_path):
    needs_namespaces()
    killers = [
        program("    return a + b\n\nimport os\nos.kill(os.getppid(), 9)\n"),
        program(
            "    return a + b\n\nimport os, signal\n"
            "for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    if pid != os.getpid():\n        try:\n            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n            pass\n"
        ),
        program("    return a + b\n"),
    ]
    path = tmp_path / "results.jsonl"
    results = run_many(killers, workers=1, timeout=5.0, progress=False, results_path=str(path), sandbox="namespaces")
    assert [r.status for r in results][2] == "passed"  # we are still here, and so is the last program's result
    assert len(path.read_text().splitlines()) == 3  # each result written as it finished


def test_results_are_written_as_they_finish_and_reused_on_resume(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    sources = [program("    return a + b\n"), program("    return a * b\n")]
    first = run_many(sources, workers=1, progress=False, results_path=str(path))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["failed", "passed"]
    with open(path, "a") as handle:
        handle.write('{"key": "torn')  # a kill in the middle of a line: ignored, that program reruns
    import lorapar.humaneval_exec as he

    monkeypatch.setattr(he, "run_program", lambda *a, **k: pytest.fail("a finished program ran again"))
    again = run_many(sources, workers=1, progress=False, results_path=str(path))
    assert [r.status for r in again] == [r.status for r in first] == ["passed", "failed"]


# ----------------------------------------------------------------------------- 3. nothing outlives the timeout


def test_a_descendant_that_leaves_the_session_is_killed_at_the_timeout():
    needs_namespaces()
    tag = f"lorapar-test-{uuid.uuid4().hex}"
    hostile = (
        "import os, signal, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)', {tag!r}])\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "while True:\n    pass\n"
    )
    start = time.perf_counter()
    result = run_program(hostile, timeout=2.0, sandbox="namespaces")
    elapsed = time.perf_counter() - start
    assert result.status == "timeout" and elapsed < 6.0, (result, elapsed)
    for _ in range(30):
        if not processes_with(tag):
            break
        time.sleep(0.1)
    assert not processes_with(tag), "a setsid() descendant outlived the timeout"


def test_a_capped_fork_bomb_is_stopped_and_leaves_nothing_behind():
    needs_namespaces()
    tag = f"lorapar-test-{uuid.uuid4().hex}"
    # Capped by the test (at most 200 processes) so a broken sandbox cannot take the machine down.
    bomb = (
        "import os, sys\n"
        "for _ in range(200):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time\\ntime.sleep(60)', {tag!r}])\n"
        "while True:\n    pass\n"
    )
    start = time.perf_counter()
    result = run_program(bomb, timeout=3.0, max_processes=32, sandbox="namespaces")
    assert result.status == "timeout" and time.perf_counter() - start < 10.0
    for _ in range(50):
        if not processes_with(tag):
            break
        time.sleep(0.1)
    assert not processes_with(tag), f"{len(processes_with(tag))} fork-bomb processes survived"


# ----------------------------------------------------------------------------- 4. files and environment


def test_the_program_writes_only_its_own_directory_and_cannot_undo_that(tmp_path):
    needs_namespaces()
    victim = tmp_path / "project_file.py"
    victim.write_text("keep me\n")
    outside = f"/tmp/lorapar-test-{uuid.uuid4().hex}"
    hostile = (
        "import ctypes, os, subprocess\n"
        "results = []\n"
        f"for action in (lambda: open({outside!r}, 'w').write('x'), lambda: os.unlink({str(victim)!r}),\n"
        f"               lambda: open({str(victim)!r}, 'w').write('gone')):\n"
        "    try:\n        action()\n        results.append('done')\n    except OSError as e:\n"
        "        results.append(e.errno)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "remount = libc.mount(None, b'/', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND, i.e. read-write again
        "again = subprocess.run(['unshare', '-Urm', 'sh', '-c', 'mount -o remount,bind,rw / && touch "
        f"{outside}'], capture_output=True)\n"
        "open('mine.txt', 'w').write('ok')\n"  # its own directory stays writable
        "assert results == [30, 30, 30] and remount != 0, (results, remount)\n"
    )
    result = run_program(hostile, sandbox="namespaces")
    assert result.passed, result.stderr
    assert victim.read_text() == "keep me\n" and not os.path.exists(outside)


def test_the_program_cannot_read_the_evaluators_environment(monkeypatch):
    needs_namespaces()
    secret = uuid.uuid4().hex
    monkeypatch.setenv("LORAPAR_TEST_API_KEY", secret)
    hostile = (
        "import glob, os\n"
        "seen = []\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        f"        if {secret!r}.encode() in open(path, 'rb').read():\n            seen.append(path)\n"
        "    except OSError:\n        pass\n"
        f"assert not seen and {secret!r} not in str(os.environ), seen\n"
        f"assert os.getppid() == 0 and len([p for p in os.listdir('/proc') if p.isdigit()]) < 5\n"
    )
    result = run_program(hostile, sandbox="namespaces")
    assert result.passed, result.stderr


# ----------------------------------------------------------------------------- 5. limits


@pytest.mark.parametrize(
    "limits",
    [
        dict(timeout=0),
        dict(timeout=-1),
        dict(timeout=float("nan")),
        dict(memory_mb=0),
        dict(memory_mb=-1),
        dict(max_processes=0),
    ],
)
def test_limits_that_are_not_positive_are_refused(limits):
    with pytest.raises(ValueError, match=next(iter(limits))):
        run_program("pass\n", **limits)


@pytest.mark.parametrize("flag, value", [("memory_mb", -1), ("memory_mb", 0), ("timeout", 0.0), ("workers", 0)])
def test_evaluate_refuses_limits_that_are_not_positive(flag, value):
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        EvalArgs(**{flag: value})


def test_an_unknown_or_unavailable_mode_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="sandbox mode"):
        run_program("pass\n", sandbox="docker")
    monkeypatch.setattr(sandbox, "probe", lambda: ("process", "user namespaces are disabled"))
    with pytest.raises(sandbox.SandboxError, match="user namespaces are disabled"):
        run_program("pass\n", sandbox="namespaces")
    assert run_program(program("    return a + b\n"), sandbox="auto").passed  # falls back, with a warning
