"""A training run on disk: its directory (claimed, refused, resumed or replaced), its checkpoints, its
metrics log and the random state that makes a resumed run continue exactly.

A checkpoint is a directory `OUT/checkpoints/step-NNNNNN/` holding the adapter (peft layout, usable
on its own), the masks, `trainer_state.pt` (adapter tensors, optimizer, schedule position, data
position, resolved config) and one `rng-rank{r}.pt` per rank. It is written under a temporary name and
renamed into place, then `OUT/checkpoints/latest` is atomically pointed at it, so a crash at any moment
leaves the previous checkpoint intact. lorapar/fsdp_checkpoint.py writes --fsdp's sharded checkpoints
with the same begin / publish steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from typing import Any, Callable, Optional

import numpy as np
import torch

from lorapar import dist, runlock
from lorapar.errors import InputError
from lorapar.io import atomic_torch_save, atomic_write_json, atomic_write_text
from lorapar.lora import named_lora_parameters

CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINTS)  # what marks a directory as holding a run
# Settings that may differ between a run and its continuation without changing the result: the training
# scripts' --resume / --overwrite / --halt-at, the pipeline's --overwrite / --threads / --workers.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "halt_at", "threads", "workers"})


# ----------------------------------------------------------------------------- random state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- run directory


def claim_out_dir(out: str, info: dist.DistInfo, decide: Callable[[], Any]) -> Any:
    """The output-directory guard of every script that writes a directory: rank 0 locks `out` (a second
    process into it is refused, naming the holder) and calls `decide()` (which checks what `out` already
    holds against --resume / --overwrite); its answer, or its error, reaches every rank, so all raise."""
    outcome: Any = None
    if info.is_main:
        try:
            runlock.acquire(out)
            outcome = decide()
        except Exception as error:  # every rank must raise, not only rank 0
            outcome = error
    outcome = dist.broadcast_object(outcome, info)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def prepare_run_dir(args, info: dist.DistInfo) -> Optional[str]:
    """Lock --out and check it against --resume / --overwrite; return the checkpoint to resume from (or None).

    Rank 0 decides; the other ranks receive its answer. --overwrite deletes nothing here: the old run is
    removed by `clear_previous_run` once every input has loaded, so a bad input never costs a finished run.
    """
    if not args.out:
        raise ValueError("--out is required: the run directory for the adapter, checkpoints and metrics")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one")
    return claim_out_dir(args.out, info, lambda: _decide_run_dir(args))


def _decide_run_dir(args) -> Optional[str]:
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if args.resume:
        checkpoint = latest_checkpoint(args.out)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: {args.out} holds no checkpoint ({args.out}/{CHECKPOINTS}/latest missing)"
            )
        return checkpoint
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{args.out} already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to replace it"
        )
    os.makedirs(args.out, exist_ok=True)
    return None


def clear_previous_run(args, info: dist.DistInfo) -> None:
    """--overwrite, after the inputs loaded: empty --out (but its lock), so no stale file of the old run survives."""
    if args.overwrite and info.is_main:
        for name in os.listdir(args.out):
            path = os.path.join(args.out, name)
            if name != runlock.LOCK_NAME:
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    dist.barrier(info)


def latest_checkpoint(out: str) -> Optional[str]:
    pointer = os.path.join(out, CHECKPOINTS, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as handle:
        path = os.path.join(out, CHECKPOINTS, handle.read().strip())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {path}, which does not exist")
    return path


def check_resumable(saved_config: dict, config: dict, checkpoint: str) -> None:
    """A resumed run must use the configuration it was started with (except RESUMABLE_CHANGES)."""
    changed = []
    for section, fields in config.items():
        for key, value in fields.items() if isinstance(fields, dict) else []:
            if key in RESUMABLE_CHANGES:
                continue
            before = saved_config.get(section, {}).get(key)
            if json.loads(json.dumps(before, default=str)) != json.loads(json.dumps(value, default=str)):
                changed.append(f"{section}.{key}: {before!r} -> {value!r}")
    if changed:
        raise ValueError(f"--resume from {checkpoint}: the configuration changed ({'; '.join(changed)})")


def begin_checkpoint(out: str, step: int, info: dist.DistInfo) -> tuple[str, str]:
    """The temporary directory that checkpoint `step` is written into (made by rank 0), and its name."""
    name = f"step-{step:06d}"
    tmp = os.path.join(out, CHECKPOINTS, f".{name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(info)
    return tmp, name


def publish_checkpoint(tmp: str, name: str, info: dist.DistInfo, keep: int = 1, marker: Optional[str] = None) -> str:
    """Once every rank has written into `tmp`: rank 0 writes `marker` (a completion file) if given, renames
    the directory into place, points `latest` at it and removes all but the `keep` newest checkpoints."""
    dist.barrier(info)
    root = os.path.dirname(tmp)
    final = os.path.join(root, name)
    if info.is_main:
        if marker is not None:
            atomic_write_text(os.path.join(tmp, marker), f"{info.world_size} shards\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), name + "\n")
        older = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, old))
    dist.barrier(info)
    return final


def save_checkpoint(
    out: str,
    step: int,
    info: dist.DistInfo,
    state: dict[str, Any],
    write_files,
    keep: int = 1,
) -> str:
    """Write checkpoint `step`: rank 0 saves `state` and calls `write_files(directory)` (adapter, masks),
    every rank saves its RNG state; then the directory is renamed into place and `latest` updated."""
    tmp, name = begin_checkpoint(out, step, info)
    atomic_torch_save(os.path.join(tmp, f"rng-rank{info.rank}.pt"), rng_state())
    if info.is_main:
        atomic_torch_save(os.path.join(tmp, "trainer_state.pt"), {**state, "world_size": info.world_size})
        write_files(tmp)
    return publish_checkpoint(tmp, name, info, keep)


def load_checkpoint(path: str, info: dist.DistInfo) -> dict[str, Any]:
    """The trainer state of checkpoint `path`, with this rank's RNG state restored."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    if state["world_size"] != info.world_size:
        raise ValueError(
            f"{path} was written by {state['world_size']} rank(s) but this run has {info.world_size}; "
            "resume with the same number of processes"
        )
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{info.rank}.pt"), weights_only=False))
    return state


def training_state(
    step: int, model: torch.nn.Module, optimizer, total_steps: int, steps_per_epoch: int, config: dict
) -> dict:
    """Everything rank 0 saves to continue exactly at `step` (RNG states are saved per rank)."""
    return {
        "step": step,
        "adapter": {key: p.detach().cpu().clone() for key, p in named_lora_parameters(model)},
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": step, "total_steps": total_steps},
        "data": {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch},
        "config": config,
    }


def make_checkpointer(
    train,
    info: dist.DistInfo,
    model: torch.nn.Module,
    optimizer,
    total_steps: int,
    steps_per_epoch: int,
    config: dict,
    save_files,
):
    """checkpoint(step): save_checkpoint with the trainer state, the adapter files (`save_files(directory)`)
    and the run's resolved config."""

    def checkpoint(step: int) -> None:
        def write_files(directory: str) -> None:
            save_files(directory)
            atomic_write_json(os.path.join(directory, "config.json"), config)

        state = training_state(step, model, optimizer, total_steps, steps_per_epoch, config)
        save_checkpoint(train.out, step, info, state, write_files, keep=train.keep_checkpoints)

    return checkpoint


def restore_training_state(path: str, model: torch.nn.Module, optimizer, config: dict, info: dist.DistInfo) -> int:
    """Load checkpoint `path` into the model's adapter, the optimizer and this rank's RNG; returns its step."""
    state = load_checkpoint(path, info)
    check_resumable(state["config"], config, path)
    with torch.no_grad():
        for key, p in named_lora_parameters(model):
            p.copy_(state["adapter"][key])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """Append-only JSON lines (rank 0 only). On resume, lines past the checkpoint's step are dropped:
    they were logged by the interrupted run after its last checkpoint and will be logged again."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int] = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as handle:  # strict JSON: a NaN is written as null
            handle.write(json.dumps(clean, sort_keys=True, allow_nan=False) + "\n")


class DivergedError(InputError):
    """A non-finite loss or gradient norm: the run stops before that step is logged or saved."""


def check_finite(step: int, out: str, **values: Optional[float]) -> None:
    """Stop the run at `step` when a loss or grad norm is nan/inf; the last checkpoint on disk stays the good one."""
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(float(v))}
    if bad:
        found = ", ".join(f"{k} {v}" for k, v in bad.items())
        latest = latest_checkpoint(out) if out and os.path.isdir(os.path.join(out, CHECKPOINTS)) else None
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise DivergedError(f"step {step}: {found}; stopped before saving ({kept}); lower --lr or check the data")
