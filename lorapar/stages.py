"""The pipeline's stage machinery: run-once stages with completion records, the scripts run as a user
runs them, resumable run directories, and the small readers the stages share.

A stage is complete when its record OUT/stages/NAME.json exists (written last, atomically, with its
wall and CPU seconds, the command lines it ran and its JSON result); a run skips it then, unless
--overwrite. Training stages resume from their latest checkpoint (`run_dir_state`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from safetensors.torch import load_file

from lorapar.errors import InputError
from lorapar.io import atomic_write_json
from lorapar.run import RESUMABLE_CHANGES, RUN_FILES, latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train_sft.py and the others live
STDERR_TAIL = 4000  # characters of a failed script's stderr quoted in the error


class StageFailed(InputError):
    """A script a stage ran exited with an error; the message names the stage, the exit code and stderr's end."""


class Stages:
    """Runs named stages once: a stage whose record OUT/stages/NAME.json exists is skipped (unless
    --overwrite); otherwise it runs with a banner and its record (seconds, commands, result) is written last.

    `threads` (the pipeline's --threads; 0 = torch's default) is every launched script's thread count."""

    def __init__(self, out: str, overwrite: bool, total: int, threads: int = 0):
        self.dir, self.overwrite, self.total, self.number = os.path.join(out, "stages"), overwrite, total, 0
        self.threads = threads
        self.records: dict[str, dict] = {}
        self.current: Optional[str] = None
        self.commands: list[str] = []

    def run(self, name: str, title: str, fn: Callable[[bool], dict]) -> dict:
        """fn(redo) -> JSON-able result; redo is True when the stage's own outputs must be replaced."""
        self.number += 1
        path = os.path.join(self.dir, name + ".json")
        if os.path.exists(path) and not self.overwrite:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
            print(
                f"==== [{self.number}/{self.total}] {title}: done in an earlier run ({record['seconds']:.1f}s), "
                "skipped",
                flush=True,
            )
        else:
            print(f"\n==== [{self.number}/{self.total}] {title}", flush=True)
            self.current, self.commands = name, []
            started, cpu = time.perf_counter(), cpu_seconds()
            result = fn(self.overwrite)
            record = {
                "name": name,
                "title": title,
                "finished_at": time.time(),
                "seconds": time.perf_counter() - started,
                "cpu_seconds": cpu_seconds() - cpu,
                "result": result,
            }
            if self.commands:
                record["commands"] = self.commands
            atomic_write_json(path, record)
            print(f"==== {title}: {record['seconds']:.1f}s", flush=True)
        self.records[name] = record
        return record

    def launch(self, script: str, argv: list[str]) -> None:
        """Run ROOT/script with `argv` as a user would (`python script ARGV`, in a process of its own),
        its output streamed through this process's; a failure raises StageFailed."""
        command = [sys.executable, os.path.join(ROOT, script), *argv]
        self.commands.append(shlex.join(command))
        env = dict(os.environ)
        if self.threads:  # torch's intra-op pool follows OMP_NUM_THREADS at start-up
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        tail: collections.deque = collections.deque()
        pumps = [
            threading.Thread(target=_pump, args=(process.stdout, sys.stdout, None)),
            threading.Thread(target=_pump, args=(process.stderr, sys.stderr, tail)),
        ]
        for pump in pumps:
            pump.start()
        try:
            code = process.wait()
        except BaseException:  # SIGTERM (SystemExit, see exit_on_sigterm) or Ctrl-C: the stage goes down with us
            process.terminate()
            process.wait()
            raise
        finally:
            for pump in pumps:
                pump.join()
        if code != 0:
            text = "".join(tail)[-STDERR_TAIL:]
            raise StageFailed(
                f"stage {self.current}: {script} exited with code {code}\n"
                f"command: {shlex.join(command)}\nstderr (end):\n{text}"
            )


def exit_on_sigterm() -> None:
    """SIGTERM exits through SystemExit rather than at once, so that `finally` and `with` blocks run: the
    pipeline's pool terminates its workers, and Stages.launch terminates the script each one is running
    (by default SIGTERM would leave both running, writing into a run directory no one holds)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def _pump(source, sink, tail: Optional[collections.deque]) -> None:
    """Copy a child's output to `sink` as it comes (tqdm's bars redraw without newlines), keeping its end."""
    kept = 0
    for chunk in iter(lambda: source.read1(4096), b""):
        text = chunk.decode("utf-8", errors="replace")
        sink.write(text)
        sink.flush()
        if tail is not None:
            tail.append(text)
            kept += len(text)
            while kept - len(tail[0]) > STDERR_TAIL:
                kept -= len(tail.popleft())
    source.close()


def cpu_seconds() -> float:
    """CPU seconds of this process and of the scripts it has run (waited-for children)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def check_same_config(path: str, cfg) -> None:
    """Completed stages are only reused by a run with the same configuration (or --overwrite)."""
    if cfg.overwrite or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle).get("PipelineConfig", {})
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in current.items()
        if k not in RESUMABLE_CHANGES and saved.get(k) != v
    ]
    if changed:
        raise SystemExit(
            f"{path}: this run directory was made with another configuration ({'; '.join(changed)}); "
            "pass --overwrite to redo it or choose another --out"
        )


def run_dir_state(out: str, redo: bool) -> dict[str, bool]:
    """A training stage's TrainArgs resume / overwrite: resume when a checkpoint of an interrupted run
    exists, overwrite when the directory holds anything else of an earlier run (or the stage is redone)."""
    if os.path.isdir(out) and not redo and latest_checkpoint(out) is not None:
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES)}


def read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def active_fraction(adapter_dir: str) -> float:
    """Share of the adapter's elements its masks let train (1.0 without a masks file)."""
    path = os.path.join(adapter_dir, "masks.safetensors")
    if not os.path.exists(path):
        return 1.0
    masks = load_file(path)
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
