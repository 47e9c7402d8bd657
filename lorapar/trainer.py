"""What train_sft.py and train_rl.py share: optimisation flags, the learning-rate schedule, the run
directory (refuse to clobber, atomic checkpoints, exact resume) and the metrics log.

A checkpoint is a directory `OUT/checkpoints/step-NNNNNN/` holding the adapter (peft layout, usable
on its own), the masks, `trainer_state.pt` (adapter tensors, optimizer, schedule position, data
position, resolved config) and one `rng-rank{r}.pt` per rank. It is written under a temporary name and
renamed into place, then `OUT/checkpoints/latest` is atomically pointed at it, so a crash at any moment
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lorapar import dist, runlock
from lorapar.config import add_dataclass_args, field
from lorapar.data import FORMATS
from lorapar.templates import TEMPLATES
from lorapar.errors import FlagError, InputError, check_fields
from lorapar.io import atomic_torch_save, atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINTS)  # what marks a directory as holding a run
# Fields that may differ between a run and its resumption without changing the result.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "halt_at"})


@dataclass
class InputArgs:
    """Where both training scripts read the base model, tokenizer, data and element masks from."""

    ckpt: str = field(default="", metadata={"help": "base model (Meta dir, HF dir or llama2.c .bin)"})
    tokenizer: str = field(default="", metadata={"help": "SentencePiece tokenizer.model"})
    data: str = field(default="", metadata={"help": "training data (.jsonl / .jsonl.gz)"})
    format: str = field(default="gsm8k", metadata={"choices": list(FORMATS)})
    template: str = field(default="reasoning", metadata={"choices": list(TEMPLATES), "help": "prompt/response template"})
    system: Optional[int] = field(default=None, metadata={"help": "keep only examples of this system (1 or 2)"})
    masks: str = field(default="", metadata={"help": "element masks (safetensors); none = every element trains"})
    stage: Optional[int] = field(default=None, metadata={"help": "which stage's mask in a two-stage mask file"})
    max_examples: int = field(default=0, metadata={"help": "use the first N examples (0 = all)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip malformed data lines (counted) instead of failing"})
    base_dtype: str = field(
        default="auto", metadata={"choices": ["auto", "float32", "bfloat16"], "help": "auto: bf16 on CUDA, fp32 on CPU"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})

    def __post_init__(self) -> None:
        check_fields(self, non_negative=("max_examples",))
        if self.system not in (None, 1, 2):
            raise FlagError(f"--system {self.system}: expected 1 or 2")
        if self.stage is not None and self.stage < 1:
            raise FlagError(f"--stage {self.stage}: expected a stage number >= 1")


def require_inputs(parser: argparse.ArgumentParser, args: InputArgs) -> None:
    for name in ("ckpt", "tokenizer", "data"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")


@dataclass
class TrainArgs:
    """Optimisation and bookkeeping flags shared by both training scripts."""

    out: str = field(default="", metadata={"help": "run directory (adapter, checkpoints, metrics.jsonl, config.json)"})
    seed: int = 0
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = field(default="cosine", metadata={"choices": ["cosine", "linear", "constant"]})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of the steps spent warming up linearly"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr as a share of --lr (cosine / linear)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (0 = off)"})
    epochs: int = 1
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0 = as many as --epochs give)"})
    batch_size: int = field(default=4, metadata={"help": "micro-batch per rank"})
    grad_accum: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step (ignored with --global-batch)"}
    )
    global_batch: int = field(
        default=0, metadata={"help": "examples per optimizer step over all ranks; sets grad_accum (0 = off)"}
    )
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=1, metadata={"help": "how many recent checkpoints to keep"})
    eval_every: int = field(default=0, metadata={"help": "held-out evaluation every N steps (0 = only at the end)"})
    log_every: int = 1
    halt_at: int = field(
        default=0, metadata={"help": "stop after this step with a checkpoint, as if preempted (0 = run to the end)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run in --out"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    fsdp: bool = field(default=False, metadata={"help": "shard the base over the ranks with FSDP2 (lorapar/fsdp.py)"})

    def __post_init__(self) -> None:
        check_fields(self, positive=("epochs", "batch_size", "grad_accum", "keep_checkpoints", "log_every"),
                     positive_float=("lr", "eps"), unit_interval=("warmup_ratio", "min_lr_ratio"),
                     non_negative=("seed", "max_steps", "global_batch", "save_every", "eval_every", "halt_at",
                                   "weight_decay", "max_grad_norm"))
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise FlagError(f"--betas {','.join(map(str, betas))}: expected two numbers in [0, 1), e.g. 0.9,0.999")


def add_lora_flags(parser: argparse.ArgumentParser) -> None:
    """LoraArgs' flags, with --rank / --lora-alpha for r / alpha (clearer beside the optimizer's flags);
    the LoRA seed is --seed."""
    from lorapar.lora import LoraArgs

    add_dataclass_args(parser, LoraArgs, skip=("r", "alpha", "seed"))
    parser.add_argument("--rank", dest="r", type=int, default=None, help="LoRA rank r (default: 8)")
    parser.add_argument(
        "--lora-alpha", dest="alpha", type=float, default=None, help="lora_alpha; the update is scaled by alpha/r (default: 64)"
    )


def resolve_grad_accum(args: TrainArgs, world_size: int) -> int:
    """Micro-batches per optimizer step so that batch_size * grad_accum * world_size == global_batch."""
    if not args.global_batch:
        return args.grad_accum
    per_pass = args.batch_size * world_size
    if args.global_batch % per_pass:
        raise ValueError(
            f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} x "
            f"{world_size} rank(s) = {per_pass}"
        )
    return args.global_batch // per_pass


# ----------------------------------------------------------------------------- learning-rate schedule


def lr_at(step: int, total_steps: int, args: TrainArgs) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over ceil(warmup_ratio * total) steps from lr/warmup to lr, then cosine (or linear)
    decay towards min_lr_ratio * lr, reached at step total_steps (one past the last), or constant.
    """
    warmup = math.ceil(args.warmup_ratio * total_steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1.0 - progress
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device):
    """bf16 autocast on CUDA; the CPU runs in fp32 (bf16 matmuls there are slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def prepare_run_dir(args: TrainArgs, info: dist.DistInfo) -> Optional[str]:
    """Lock --out and check it against --resume / --overwrite; return the checkpoint to resume from (or None).

    Rank 0 decides; the other ranks receive its answer. --overwrite deletes nothing here: the old run is
    removed by `clear_previous_run` once every input has loaded, so a bad input never costs a finished run.
    """
    if not args.out:
        raise ValueError("--out is required: the run directory for the adapter, checkpoints and metrics")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one")
    outcome: Any = None
    if info.is_main:
        try:
            runlock.acquire(args.out)
            outcome = _decide_run_dir(args)
        except Exception as error:  # every rank must raise, not only rank 0
            outcome = error
    outcome = dist.broadcast_object(outcome, info)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _decide_run_dir(args: TrainArgs) -> Optional[str]:
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


def clear_previous_run(args: TrainArgs, info: dist.DistInfo) -> None:
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
    from lorapar.lora import named_lora_parameters

    return {
        "step": step,
        "adapter": {key: p.detach().cpu().clone() for key, p in named_lora_parameters(model)},
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": step, "total_steps": total_steps},
        "data": {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch},
        "config": config,
    }


def make_checkpointer(
    train: TrainArgs, info: dist.DistInfo, model: torch.nn.Module, optimizer, total_steps: int, steps_per_epoch: int,
    config: dict, save_files,
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


def lora_file_writer(model: torch.nn.Module, lora_args, with_masks: bool):
    """save(directory): the LoRA adapter (peft layout) and, when the run installed element masks, masks.safetensors."""
    from lorapar.adapter import save_adapter
    from lorapar.lora import get_masks
    from lorapar.masks import save_masks

    def save(directory: str) -> None:
        save_adapter(model, directory, lora_args)
        if with_masks:
            save_masks(os.path.join(directory, "masks.safetensors"), get_masks(model))

    return save


def restore_training_state(path: str, model: torch.nn.Module, optimizer, config: dict, info: dist.DistInfo) -> int:
    """Load checkpoint `path` into the model's adapter, the optimizer and this rank's RNG; returns its step."""
    from lorapar.lora import named_lora_parameters

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


# ----------------------------------------------------------------------------- inputs both scripts read


def select_system(examples: list, system: Optional[int], path: str) -> list:
    """The examples labelled `system` (all when None); none left is an error naming the file."""
    if system is None:
        return list(examples)
    kept = [e for e in examples if e.system == system]
    if not kept:
        unlabelled = sum(e.system is None for e in examples)
        raise ValueError(
            f"{path}: no example of system {system} among {len(examples)} ({unlabelled} carry no system label; "
            "label them with classify.py or drop --system)"
        )
    return kept


def install_masks(model: torch.nn.Module, path: str, stage: Optional[int]) -> None:
    """Load the element masks of `stage` from `path` onto the model's adapter, naming the file on mismatch."""
    from lorapar.lora import set_masks
    from lorapar.masks import load_masks

    masks = load_masks(path, stage=None if stage is None else f"stage{stage}")
    staged = sorted(k for k, v in masks.items() if isinstance(v, dict))
    if staged:
        raise ValueError(f"{path} holds masks for several stages ({', '.join(staged)}); pick one with --stage N")
    try:
        set_masks(model, masks)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: the masks do not match the adapter ({error})") from None


def resolve_base_dtype(base_dtype: str, device: torch.device) -> torch.dtype:
    """--base-dtype as a torch dtype: "auto" is bf16 on CUDA, fp32 on the CPU."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[base_dtype]  # fmt: skip


def load_base_model(ckpt: str, base_dtype: str, device: torch.device, vocab_size: int):
    """The frozen base in fp32 on the CPU, bf16 on CUDA ("auto"); its vocabulary must cover the tokenizer's."""
    from lorapar.checkpoint import load_model

    model = load_model(ckpt, device=device, dtype=resolve_base_dtype(base_dtype, device))
    if vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} pieces but {ckpt} only {model.args.vocab_size} embeddings")
    return model
