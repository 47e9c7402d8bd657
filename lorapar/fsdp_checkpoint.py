"""Sharded checkpoints for --fsdp: every rank writes its share, rank 0 the gathered adapter; resume reads it back.

Same directory scheme as lorapar/run.py (OUT/checkpoints/step-NNNNNN, renamed into place, `latest`),
so prepare_run_dir and --resume find these checkpoints unchanged.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn

from lorapar import dist
from lorapar.fsdp import full_adapter

COMPLETE_MARKER = "COMPLETE"  # written last into a sharded checkpoint: its absence means "not finished"


def shard_state(model: nn.Module, optimizer) -> dict:
    """This rank's share of the training state: its rows of each LoRA factor and its optimizer state."""
    from lorapar.lora import named_lora_parameters

    return {
        "adapter": {key: p.detach().to_local().cpu().clone() for key, p in named_lora_parameters(model)},
        "optimizer": optimizer.state_dict(),
    }


def save_sharded_checkpoint(
    out: str, step: int, info: dist.DistInfo, model: nn.Module, optimizer, state: dict, write_files, keep: int = 1
) -> str:
    """Checkpoint `step` as OUT/checkpoints/step-NNNNNN: shard-rank{r}.pt per rank (adapter rows, optimizer,
    RNG), rank 0's trainer state and adapter files (gathered, peft layout), then COMPLETE, then the rename
    into place and `latest` (as run.save_checkpoint, so prepare_run_dir / --resume find it)."""
    from lorapar.io import atomic_torch_save
    from lorapar.run import begin_checkpoint, publish_checkpoint, rng_state

    tmp, name = begin_checkpoint(out, step, info)
    atomic_torch_save(
        os.path.join(tmp, f"shard-rank{info.rank}.pt"),
        {**shard_state(model, optimizer), "rng": rng_state(), "rank": info.rank},
    )
    with full_adapter(model):
        if info.is_main:
            atomic_torch_save(
                os.path.join(tmp, "trainer_state.pt"), {**state, "world_size": info.world_size, "fsdp": True}
            )
            write_files(tmp)
    return publish_checkpoint(tmp, name, info, keep, marker=COMPLETE_MARKER)  # every shard on disk first


def restore_sharded_checkpoint(path: str, model: nn.Module, optimizer, config: dict, info: dist.DistInfo) -> int:
    """Load this rank's shard of checkpoint `path` (adapter rows, optimizer, RNG); returns its step."""
    from lorapar.lora import named_lora_parameters
    from lorapar.run import check_resumable, set_rng_state

    if not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
        raise FileNotFoundError(f"{path}: no {COMPLETE_MARKER} marker; the checkpoint was not finished")
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    if not state.get("fsdp"):
        raise ValueError(f"{path} was written without --fsdp; resume it without --fsdp")
    if state["world_size"] != info.world_size:
        raise ValueError(
            f"{path} was written by {state['world_size']} rank(s) but this run has {info.world_size}; "
            "resume with the same number of processes"
        )
    check_resumable(state["config"], config, path)
    shard_path = os.path.join(path, f"shard-rank{info.rank}.pt")
    shard = torch.load(shard_path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for key, p in named_lora_parameters(model):
            local = p.to_local()
            if key not in shard["adapter"] or shard["adapter"][key].shape != local.shape:
                raise ValueError(
                    f"{shard_path}: {key} missing or of another shape than this rank's {tuple(local.shape)}"
                )
            local.copy_(shard["adapter"][key])
    optimizer.load_state_dict(shard["optimizer"])
    set_rng_state(shard["rng"])
    return state["step"]


def make_sharded_checkpointer(
    train,
    info: dist.DistInfo,
    model: nn.Module,
    optimizer,
    total_steps: int,
    steps_per_epoch: int,
    config: dict,
    save_files,
):
    """checkpoint(step) for --fsdp: as run.make_checkpointer, written by every rank."""
    from lorapar.io import atomic_write_json

    def checkpoint(step: int) -> None:
        def write_files(directory: str) -> None:
            save_files(directory)
            atomic_write_json(os.path.join(directory, "config.json"), config)

        state = {
            "step": step,
            "schedule": {"step": step, "total_steps": total_steps},
            "data": {"epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch},
            "config": config,
        }
        save_sharded_checkpoint(
            train.out, step, info, model, optimizer, state, write_files, keep=train.keep_checkpoints
        )

    return checkpoint


def save_final(model: nn.Module, save_files: Callable[[str], None], out: str, info: dist.DistInfo) -> None:
    """The final adapter (and masks) gathered to rank 0 and written in peft's layout (collective)."""
    with full_adapter(model):
        if info.is_main:
            save_files(out)
