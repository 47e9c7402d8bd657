"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the frozen base sharded over the ranks, not replicated.

    torchrun --nproc_per_node=8 train_sft.py --fsdp ...     (also train_rl.py, score.py; gloo on CPU, nccl on CUDA)

What `--fsdp` changes, and why:
- Units. One `fully_shard` unit per transformer block plus the root (embeddings, final norm, output head).
  FSDP2 shards every parameter separately along dim 0, so one unit may hold frozen base weights and
  trainable LoRA factors (FSDP1 refuses mixed requires_grad). Each rank keeps 1/N of every tensor; a
  block's full weights exist only while that block runs forward or backward. The root is kept gathered
  after its forward (`reshard_after_forward=False`): the loss reads `model.output.weight` outside the
  forward (lorapar/loss.py), and the root holds only the embedding, the norm and the head.
- Loading. The model is built on the meta device (no storage), sharded, then materialised rank-locally;
  each rank reads only the rows of its shards from the checkpoint (safetensors slices, memory-mapped
  Meta shards and llama2.c files, GGUF rows dequantized rank by rank), so the full model never exists in
  one process.
- Gradients. FSDP reduce-scatters the gradients as a mean over the ranks; `dist.all_reduce_grads` scales
  them by the world size into the sum it forms without FSDP (the trainers already divide the loss by the
  global token count).
- Optimizer. MaskedAdamW sees DTensor parameters and updates each rank's local shard with the matching
  rows of the (replicated) mask; clipping all-reduces the squared norm (lorapar/masks.py).
- Collectives in lockstep. Every forward all-gathers, so all ranks must run the same number of forwards.
  Generation and evaluation run a rank-dependent number (early stops, uneven example counts); `lockstep`
  keeps the ranks together by a vote before each forward and idle forwards for ranks that finished.
- Checkpoints (lorapar/fsdp_checkpoint.py). Each rank writes its adapter shard, optimizer state and RNG;
  rank 0 the trainer state and the adapter gathered into peft's layout (so a checkpoint and the final
  adapter read as without FSDP); a completion marker is written last.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from lorapar import dist
from lorapar.model import Transformer
from lorapar.shard_reader import ShardReader


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_rows(rows: int, ranks: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the rows that rank `rank` of `ranks` holds of a `rows`-row tensor (torch.chunk's split,
    as FSDP2's: ceil(rows / ranks) each, the last ranks fewer or none)."""
    per_rank = math.ceil(rows / ranks)
    start = min(rows, rank * per_rank)
    return start, min(rows, start + per_rank)


def local_rows(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, stop) of the dim-0 rows this rank holds of a DTensor sharded by FSDP2 (torch.chunk's split)."""
    from torch.distributed.tensor import Shard

    placements = tensor.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"expected a tensor sharded along dim 0 on a 1-D mesh, got placements {placements}")
    start, stop = shard_rows(tensor.shape[0], tensor.device_mesh.size(), tensor.device_mesh.get_local_rank())
    if stop - start != tensor.to_local().shape[0]:
        raise RuntimeError(f"FSDP's local shard has {tensor.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


# ----------------------------------------------------------------------------- building the sharded model


def shard_model(model: Transformer) -> Transformer:
    """fully_shard each block, then the root (kept gathered after forward: see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model, reshard_after_forward=False)  # gradients come back as a mean over ranks: see dist
    return model


def load_sharded_model(
    ckpt: str,
    dtype: torch.dtype,
    device: torch.device,
    vocab_size: int,
    with_adapter: Optional[Callable[[nn.Module], None]] = None,
) -> Transformer:
    """The base of `ckpt`, FSDP2-sharded, each rank holding (and having read) only its rows.

    with_adapter(model) is called on the meta-device model before sharding, so LoRA factors are sharded
    in the same units as their base weights (it must not initialise anything: there is no storage yet;
    see `init_sharded_lora`).
    """
    if not torch_dist.is_initialized() and "MASTER_ADDR" in os.environ:  # torchrun --nproc_per_node=1
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if not torch_dist.is_initialized():
        raise RuntimeError("--fsdp needs torch.distributed: launch with torchrun (--nproc_per_node=1 for one process)")
    reader = ShardReader(ckpt)
    if vocab_size > reader.args.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} pieces but {ckpt} only {reader.args.vocab_size} embeddings")
    with torch.device("meta"):
        model = Transformer(reader.args).to(dtype)
        if with_adapter is not None:
            with_adapter(model)
    from lorapar.checkpoint.common import CheckpointError
    from lorapar.lora import named_lora_parameters

    adapter = {id(p) for _, p in named_lora_parameters(model)}
    base_names = {name for name, p in model.named_parameters() if id(p) not in adapter}
    unexpected, missing = sorted(reader.names() - base_names), sorted(base_names - reader.names())
    if unexpected or missing:
        raise CheckpointError(
            f"{ckpt}: keys do not match the model configuration (Meta names): unexpected "
            f"{unexpected[:3]}, missing {missing[:3]}"
        )
    for name, p in model.named_parameters():
        if name in base_names and reader.shape(name) != tuple(p.shape):
            raise CheckpointError(
                f"{ckpt}: {name!r} has shape {reader.shape(name)}, expected {tuple(p.shape)} from the config"
            )
    shard_model(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in base_names:
                continue
            start, stop = local_rows(p)
            rows = reader.rows(name, start, stop)
            local = p.to_local()
            if tuple(rows.shape[1:]) != tuple(p.shape[1:]) or rows.shape[0] != local.shape[0]:
                raise ValueError(
                    f"{ckpt}: {name} rows [{start}, {stop}) have shape {tuple(rows.shape)}, "
                    f"expected {tuple(local.shape)} of a {tuple(p.shape)} tensor"
                )
            local.copy_(rows)
    return model.eval()


def init_sharded_lora(model: nn.Module, lora_args) -> None:
    """apply_lora's initialisation on a sharded adapter: the same values as one process, this rank's rows.

    A and B are drawn in full (they are small) with apply_lora's generator, walking the modules in the
    same order; each rank keeps its rows. pissa / olora need each full base weight (an SVD) and are refused.
    """
    from lorapar.lora import LoRALinear, lora_modules

    if lora_args.init in ("pissa", "olora"):
        raise ValueError(
            f"--fsdp: --init {lora_args.init} takes an SVD of each full base weight; "
            "use lora or gaussian, or run without --fsdp"
        )
    generator = torch.Generator().manual_seed(lora_args.seed)
    for module in lora_modules(model).values():
        out_features, in_features = module.weight.shape
        stand_in = LoRALinear(torch.empty(1).expand(out_features, in_features), module.r, module.alpha)
        stand_in.reset_lora(lora_args.init, generator, lora_args.init_std, lora_args.pissa_niter)
        with torch.no_grad():
            for sharded, full in ((module.lora_A, stand_in.lora_A), (module.lora_B, stand_in.lora_B)):
                start, stop = local_rows(sharded)
                sharded.to_local().copy_(full[start:stop])
        module.init = lora_args.init


@contextlib.contextmanager
def full_adapter(model: nn.Module, write_back: bool = False) -> Iterator[None]:
    """Every rank's LoRA factors gathered into plain tensors for the block (collective: all ranks enter).

    Inside, save_adapter / get_masks / named_lora_parameters read the whole adapter as without FSDP;
    the sharded parameters come back afterwards, with write_back=True holding this rank's rows of
    whatever was written into the gathered tensors (load_adapter).
    """
    from lorapar.lora import lora_modules

    saved = []
    for module in lora_modules(model).values():
        for attr in ("lora_A", "lora_B"):
            sharded = getattr(module, attr)
            saved.append((module, attr, sharded))
            module._parameters[attr] = nn.Parameter(sharded.detach().full_tensor(), requires_grad=False)
    try:
        yield
        if write_back:
            with torch.no_grad():
                for module, attr, sharded in saved:
                    start, stop = local_rows(sharded)
                    sharded.to_local().copy_(module._parameters[attr][start:stop])
    finally:
        for module, attr, sharded in saved:
            module._parameters[attr] = sharded


# ----------------------------------------------------------------------------- lockstep forwards


class lockstep:
    """Keep every rank's forwards paired while ranks run different numbers of them (generation, eval).

    Before each forward a rank votes 1 ("I run a forward") in an all-reduce; a rank that has left the
    block votes 0 and runs an idle one-token forward whenever someone voted 1, until nobody does. The
    vote runs before FSDP's own pre-forward all-gather (prepend=True), so collectives always pair up.
    Outside FSDP (or with one rank) it does nothing.
    """

    def __init__(self, model: nn.Module, info: dist.DistInfo, enabled: bool = True):
        self.model, self.info = model, info
        self.enabled = enabled and info.enabled
        self.draining, self.handle = False, None

    def _vote(self, value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int64, device=self.info.device)
        torch_dist.all_reduce(flag)
        return int(flag.item())

    def _before_forward(self, module, args):
        if not self.draining:
            self._vote(1)

    def __enter__(self) -> "lockstep":
        if self.enabled:
            self.handle = self.model.register_forward_pre_hook(self._before_forward, prepend=True)
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self.draining = True
        try:
            if exc[0] is None:  # after an error the other ranks hang in any case; do not add a second one
                idle = torch.ones(1, 1, dtype=torch.long, device=self.info.device)
                while self._vote(0) > 0:
                    with torch.no_grad():
                        self.model(idle)
                # The root stays gathered after a forward; gathered under inference_mode (generation) it
                # could not take part in a later backward, so drop it here and let training gather afresh.
                self.model.reshard()
        finally:
            self.handle.remove()
            self.draining = False


def build_lora_model(
    ckpt: str,
    base_dtype: str,
    masks: str,
    stage: Optional[int],
    lora_args,
    info: dist.DistInfo,
    vocab_size: int,
    adapter_dir: str = "",
) -> tuple[Transformer, Any, Callable[[str], None]]:
    """--fsdp's replacement for load_base_model + apply_lora (or load_adapter) + install_masks: the sharded
    base with a LoRA adapter initialised as apply_lora would, or loaded from `adapter_dir`, masks installed.

    Returns (model, lora_args, save_files(directory)).
    """
    from lorapar.adapter import load_adapter
    from lorapar.launch import lora_file_writer
    from lorapar.lora import replace_linears
    from lorapar.masks import install_masks

    dtype = {
        "auto": torch.bfloat16 if info.device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[base_dtype]
    loaded = {}

    def with_adapter(meta_model: nn.Module) -> None:
        if adapter_dir:  # on the meta device this builds the modules and checks the files; no values yet
            loaded["args"] = load_adapter(meta_model, adapter_dir)
        else:
            replace_linears(meta_model, lora_args)

    if not adapter_dir and lora_args.init in ("pissa", "olora"):
        init_sharded_lora(None, lora_args)  # raises the explanation before anything is read
    model = load_sharded_model(ckpt, dtype, info.device, vocab_size, with_adapter=with_adapter)
    if adapter_dir:
        lora_args = loaded["args"]
        if lora_args.init in ("pissa", "olora"):
            raise ValueError(
                f"--fsdp: {adapter_dir} is a {lora_args.init} adapter, whose residual base needs "
                "each full base weight; run without --fsdp"
            )
        with full_adapter(model, write_back=True):
            load_adapter(model, adapter_dir)
    else:
        init_sharded_lora(model, lora_args)
    if masks:
        install_masks(model, masks, stage)
    return model, lora_args, lora_file_writer(model, lora_args, bool(masks))
