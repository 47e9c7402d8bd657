"""The pipeline's stage machinery: run-once stages with completion records, resumable run directories,
and the small readers the stages share.

A stage is complete when its record OUT/stages/NAME.json exists (written last, atomically, with its
wall and CPU seconds and its JSON result); a run skips it then, unless --overwrite. Training stages
resume from their latest checkpoint (`run_dir_flags`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Callable

from lorapar.io import atomic_write_json

class Stages:
    """Runs named stages once: a stage whose record OUT/stages/NAME.json exists is skipped (unless
    --overwrite); otherwise it runs with a banner and its record (seconds, result) is written last."""

    def __init__(self, out: str, overwrite: bool, total: int):
        self.dir, self.overwrite, self.total, self.number = os.path.join(out, "stages"), overwrite, total, 0
        self.records: dict[str, dict] = {}

    def run(self, name: str, title: str, fn: Callable[[bool], dict]) -> dict:
        """fn(redo) -> JSON-able result; redo is True when the stage's own outputs must be replaced."""
        self.number += 1
        path = os.path.join(self.dir, name + ".json")
        if os.path.exists(path) and not self.overwrite:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
            print(f"==== [{self.number}/{self.total}] {title}: done in an earlier run ({record['seconds']:.1f}s), skipped", flush=True)
        else:
            print(f"\n==== [{self.number}/{self.total}] {title}", flush=True)
            started, cpu = time.perf_counter(), time.process_time()
            result = fn(self.overwrite)
            record = {"name": name, "title": title, "finished_at": time.time(), "seconds": time.perf_counter() - started,
                      "cpu_seconds": time.process_time() - cpu, "result": result}
            atomic_write_json(path, record)
            print(f"==== {title}: {record['seconds']:.1f}s", flush=True)
        self.records[name] = record
        return record


RESUMABLE_CHANGES = ("overwrite", "threads", "workers")  # fields that may differ between a run and its continuation


def check_same_config(path: str, cfg) -> None:
    """Completed stages are only reused by a run with the same configuration (or --overwrite)."""
    if cfg.overwrite or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle).get("PipelineConfig", {})
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise SystemExit(f"{path}: this run directory was made with another configuration ({'; '.join(changed)}); "
                         "pass --overwrite to redo it or choose another --out")


def run_dir_flags(out: str, redo: bool) -> list[str]:
    """--resume when a checkpoint of an interrupted run exists, --overwrite when the directory holds
    anything else of an earlier run (or the stage is redone), nothing for a fresh directory."""
    from lorapar.trainer import RUN_FILES, latest_checkpoint

    if os.path.isdir(out) and not redo and latest_checkpoint(out) is not None:
        return ["--resume"]
    if any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES):
        return ["--overwrite"]
    return []


def script(name: str):
    """A command-line script of the repository (classify.py, score.py, ...) as a module: they live
    beside the lorapar package, so the pipeline works from any working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(name)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def active_fraction(adapter_dir: str) -> float:
    """Share of the adapter's elements its masks let train (1.0 without a masks file)."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, "masks.safetensors")
    if not os.path.exists(path):
        return 1.0
    masks = load_file(path)
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
