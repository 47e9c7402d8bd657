"""torch.distributed helpers: found from torchrun's environment, inert under plain `python script.py`.

Training reduces the adapter gradients itself (`all_reduce_grads`) instead of wrapping the model in
DistributedDataParallel: the adapter is a few million parameters, so one flat all-reduce per optimizer
step (after all micro-batches) costs little, it is a sum rather than DDP's mean (the losses are already
divided by the global token count, see train_sft.py), and the library's helpers keep calling the bare
model (`model.output`, `lora_modules(model)`) without unwrapping it. With --fsdp the base is sharded
instead (lorapar/fsdp.py) and FSDP2 reduces the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), or run alone.

    device: "cpu", "cuda" or None (CUDA when available). NCCL on CUDA, gloo on the CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `value` over ranks (in place, also returned); identity when running alone."""
    if info.enabled:
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value


def all_reduce_grads(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum the gradients of `params` over ranks with one flat all-reduce.

    A rank without a gradient for a parameter adds zeros; a parameter no rank has a gradient for keeps
    grad None, as it would in one process (so the optimizer skips it: no weight decay, no moment update).
    Whether a rank has the gradient travels in the same buffer, one flag per parameter.
    """
    if not info.enabled:
        return
    from torch.distributed.tensor import DTensor  # lazy: a second's import that only --fsdp runs need

    # FSDP's parameters (DTensors) have had their gradients reduce-scattered already, as a mean over the
    # ranks (its default: torch 2.13 applies a divide factor set on the root to the root's own parameters
    # only, and gloo has no pre-multiplied sum); the losses are divided by the global token count, so the
    # step needs the sum: scale by the world size. Summing them again would add different ranks' rows.
    params = list(params)
    for p in params:
        if isinstance(p, DTensor) and p.grad is not None:
            p.grad.mul_(info.world_size)
    params = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
    if not params:
        return
    grads = [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        for p in params
    ]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat(grads + [has_grad])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    ranks_with_grad = flat[-len(params) :].tolist()
    offset = 0
    for p, ranks in zip(params, ranks_with_grad):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if ranks > 0 else None
        offset += n


def broadcast_params(params: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Make every rank start from rank 0's values (DDP's construction-time broadcast)."""
    if info.enabled:
        for p in params:
            torch_dist.broadcast(p.data, src=0)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. a decision only rank 0 can make, such as 'this run exists')."""
    if not info.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list, info: DistInfo) -> list:
    """This rank's contiguous share of a list whose length is a multiple of the world size."""
    if len(items) % info.world_size:
        raise ValueError(f"{len(items)} items cannot be split evenly over {info.world_size} ranks")
    per_rank = len(items) // info.world_size
    return items[info.rank * per_rank : (info.rank + 1) * per_rank]
