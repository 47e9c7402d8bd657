"""What both training scripts do before and after their loop: read the command line with its presets,
load the base with its adapter, and `start_run` / `finish_run` around the loop.

start_run claims nothing and loads nothing itself: the scripts call `prepare_run_dir` (lock --out,
decide resume / overwrite) before reading their data, build the model, then hand both to start_run,
which gathers the trainable parameters, makes the optimizer, clears an overwritten run, resumes or
writes config.json, opens the metrics log and returns the `Run` the loop steps through.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from lorapar import dist, fsdp, fsdp_checkpoint, runlock
from lorapar.adapter import load_adapter, save_adapter
from lorapar.checkpoint import load_model
from lorapar.config import config_to_dict, dataclass_from_args, save_config
from lorapar.lora import apply_lora, get_masks
from lorapar.masks import install_masks, save_masks
from lorapar.optim import MaskedAdamW
from lorapar.precision import resolve_base_dtype
from lorapar.run import MetricsLog, check_finite, clear_previous_run, make_checkpointer, restore_training_state
from lorapar.script_args import InputArgs, TrainArgs

# ----------------------------------------------------------------------------- the command line


def script_parser(doc: str, presets: dict) -> argparse.ArgumentParser:
    """A training script's parser: its docstring's first paragraph and --preset (paper hyper-parameters)."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(presets), default=None, help="paper hyper-parameters")
    return parser


def from_preset(cls: type, ns: argparse.Namespace, preset: dict, **defaults: Any) -> Any:
    """`cls`'s settings: the flags given over the preset's values (its section named `cls.__name__`) over
    `defaults` over the dataclass's own."""
    return dataclass_from_args(cls, ns, cls(**{**defaults, **preset.get(cls.__name__, {})}))


# ----------------------------------------------------------------------------- inputs


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


def load_base_model(ckpt: str, base_dtype: str, device: torch.device, vocab_size: int):
    """The frozen base in fp32 on the CPU, bf16 on CUDA ("auto"); its vocabulary must cover the tokenizer's."""
    model = load_model(ckpt, device=device, dtype=resolve_base_dtype(base_dtype, device))
    if vocab_size > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} pieces but {ckpt} only {model.args.vocab_size} embeddings")
    return model


def lora_file_writer(model: torch.nn.Module, lora_args, with_masks: bool) -> Callable[[str], None]:
    """save(directory): the LoRA adapter (peft layout) and, when the run installed element masks, masks.safetensors."""

    def save(directory: str) -> None:
        save_adapter(model, directory, lora_args)
        if with_masks:
            save_masks(os.path.join(directory, "masks.safetensors"), get_masks(model))

    return save


def load_lora_model(
    inputs: InputArgs, lora_args, adapter_dir: str, info: dist.DistInfo, vocab_size: int, sharded: bool
) -> tuple[torch.nn.Module, Any, Callable[[str], None]]:
    """The frozen base with a LoRA adapter, loaded from `adapter_dir` or fresh from `lora_args`, and the
    --masks of --stage installed; `sharded`: over the ranks with FSDP2 (lorapar/fsdp.py).

    Returns (model, the adapter's LoraArgs, save(directory) writing the adapter and its masks)."""
    if sharded:  # each rank reads only its rows of the base
        return fsdp.build_lora_model(
            inputs.ckpt,
            inputs.base_dtype,
            inputs.masks,
            inputs.stage,
            lora_args,
            info,
            vocab_size,
            adapter_dir=adapter_dir,
        )
    model = load_base_model(inputs.ckpt, inputs.base_dtype, info.device, vocab_size)
    if adapter_dir:  # the very tensors it holds (and, for pissa/olora, its residual base)
        lora_args = load_adapter(model, adapter_dir, dropout=None if lora_args is None else lora_args.dropout)
    else:
        apply_lora(model, lora_args)
    if inputs.masks:
        install_masks(model, inputs.masks, inputs.stage)
    return model, lora_args, lora_file_writer(model, lora_args, bool(inputs.masks))


# ----------------------------------------------------------------------------- around the training loop


@dataclass
class Run:
    """A started training run: what its loop reads and calls."""

    info: dist.DistInfo
    train: TrainArgs
    params: list[torch.nn.Parameter]  # the trainable parameters (the adapter), in the optimizer's order
    optimizer: MaskedAdamW
    start_step: int  # 0, or the step of the checkpoint resumed from
    last_step: int  # total_steps, or --halt-at
    total_steps: int
    metrics: MetricsLog
    checkpoint: Callable[[int], None]  # checkpoint(step): the adapter, optimizer, RNG and data position
    save_files: Callable[[str], None]  # save(directory): the adapter files
    start_adapter: Optional[list[torch.Tensor]] = None  # the adapter as loaded, before any resume

    bar: Optional[tqdm] = None  # the progress bar (rank 0)

    def end_step(self, record: dict, force_log: bool = False, **shown: str) -> None:
        """After optimizer step record["step"]: stop on a non-finite loss or grad norm (before anything of
        the step is logged or saved), log the record every --log-every steps (and at the last, or when
        `force_log`), show `shown` on the bar, checkpoint after the last step and every --save-every."""
        done = record["step"]
        check_finite(done, self.train.out, loss=record["loss"], grad_norm=record.get("grad_norm"))
        if done % self.train.log_every == 0 or force_log or done == self.last_step:
            self.metrics.log(record)
        self.bar.update(1)
        self.bar.set_postfix(**shown)
        if done == self.last_step or (self.train.save_every and done % self.train.save_every == 0):
            self.checkpoint(done)


def start_run(
    model: torch.nn.Module,
    train: TrainArgs,
    info: dist.DistInfo,
    resume_from: Optional[str],
    configs: tuple,
    save_files: Callable[[str], None],
    total_steps: int,
    steps_per_epoch: int,
    first_record: dict,
    extra: dict,
    desc: str,
    adapter_hooks: Any = None,
    keep_start_adapter: bool = False,
) -> Run:
    """Everything between the loaded model and the first step, the same for both training scripts.

    The adapter is broadcast from rank 0 (FSDP's ranks initialise identically from the seed and hold
    different rows), the optimizer is MaskedAdamW over it, an --overwrite run's old files go only now
    (every input has loaded), then the run resumes from `resume_from` or writes config.json (`configs`
    and `extra`), and `first_record` opens a fresh metrics log as step 0. `adapter_hooks` (DM-LoRA's
    DualTraining) lays its state out by the optimizer (`start`) and restores it before the optimizer's
    state is (`resume`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not train.fsdp:
        dist.broadcast_params(params, info)
    start_adapter = [p.detach().clone() for p in params] if keep_start_adapter else None
    optimizer = MaskedAdamW.for_model(
        model, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay
    )
    if adapter_hooks is not None:
        adapter_hooks.start(optimizer, total_steps)
    config = config_to_dict(*configs)
    clear_previous_run(train, info)
    start_step = 0
    if resume_from is not None:
        if adapter_hooks is not None:  # its masks and EMAs, before the optimizer state laid out by them
            adapter_hooks.resume(resume_from, optimizer)
        restore = fsdp_checkpoint.restore_sharded_checkpoint if train.fsdp else restore_training_state
        start_step = restore(resume_from, model, optimizer, config, info)
    elif info.is_main:
        save_config(
            os.path.join(train.out, "config.json"),
            *configs,
            extra={"world_size": info.world_size, **extra, "total_steps": total_steps},
        )
    metrics = MetricsLog(
        os.path.join(train.out, "metrics.jsonl"), info.is_main, resume_step=start_step if resume_from else None
    )
    if start_step == 0:
        metrics.log(
            {
                "step": 0,
                **first_record,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "world_size": info.world_size,
            }
        )
    checkpointer = fsdp_checkpoint.make_sharded_checkpointer if train.fsdp else make_checkpointer
    checkpoint = checkpointer(train, info, model, optimizer, total_steps, steps_per_epoch, config, save_files)
    last_step = min(total_steps, train.halt_at) if train.halt_at else total_steps
    bar = tqdm(total=total_steps, initial=start_step, disable=not info.is_main, desc=desc, dynamic_ncols=True)
    return Run(
        info,
        train,
        params,
        optimizer,
        start_step,
        last_step,
        total_steps,
        metrics,
        checkpoint,
        save_files,
        start_adapter,
        bar,
    )


def finish_run(run: Run, model: torch.nn.Module) -> bool:
    """After the loop: a finished run (not stopped by --halt-at) writes its final adapter into --out (under
    FSDP gathered to rank 0); then --out is unlocked. Returns whether the run finished."""
    run.bar.close()
    finished = run.last_step == run.total_steps
    if finished and run.train.fsdp:
        fsdp_checkpoint.save_final(model, run.save_files, run.train.out, run.info)
    elif finished and run.info.is_main:
        run.save_files(run.train.out)
    dist.barrier(run.info)
    runlock.release(run.train.out)
    return finished
