"""Importance scoring (score.py --fsdp) on an FSDP-sharded model: each rank keeps the gradient moments of its
own rows of every LoRA tensor, and rank 0 gathers the whole scores once (lorapar/fsdp.py shards the model).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from lorapar import dist
from lorapar.fsdp import local_rows, shard_rows


class ShardedMomentSums:
    """sum_i g_i and sum_i g_i^2 over every rank's examples, for this rank's rows of each LoRA tensor only.

    accumulate_batch's hooks see the gathered A and B, so they form each tensor's per-example gradients of
    this rank's batch whole; `add` sums them over the batch and reduce-scatters the two sums at once (a
    DTensor Partial -> Shard(0) redistribution: the sum over the ranks, each rank receiving its own rows,
    split unevenly as FSDP2 splits the parameter). So what lives through the scoring is 1/N of the
    adapter's two moments on each rank, and only one tensor's batch sums exist whole, for one collective.
    Every rank must add the same tensors in the same order: the same number of batches (score_rows_sharded).
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], device: torch.device):
        self.keys = [key for key, _ in named]
        self.rows = [local_rows(p) for _, p in named]
        self.shapes = [torch.Size((stop - start, *p.shape[1:])) for (start, stop), (_, p) in zip(self.rows, named)]
        self.mesh = named[0][1].device_mesh
        sizes = [shape.numel() for shape in self.shapes]
        self.sum_grad = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        self.sum_grad_sq = torch.zeros_like(self.sum_grad)
        self.views = {
            key: (total.view(shape), total_sq.view(shape))
            for key, shape, total, total_sq in zip(
                self.keys, self.shapes, self.sum_grad.split(sizes), self.sum_grad_sq.split(sizes)
            )
        }

    def add(self, key: str, g: torch.Tensor, counted: bool = True) -> None:
        """Add the per-example gradients g (b, *shape) of this rank's batch; counted=False adds zeros (a stand-in
        batch, which joins the collective all the same)."""
        from torch.distributed.tensor import DTensor, Partial, Shard

        sums = torch.stack([g.sum(0), g.square().sum(0)], dim=1)  # (rows, 2, ...): dim 0 is the sharded one
        if not counted:
            sums.zero_()
        mine = DTensor.from_local(sums, self.mesh, [Partial()], run_check=False).redistribute(self.mesh, [Shard(0)])
        mine = mine.to_local()
        total, total_sq = self.views[key]
        if mine.shape[0] != total.shape[0]:  # a (1, ...) block would broadcast silently into more rows
            raise RuntimeError(f"{key}: reduce-scatter gave {mine.shape[0]} rows, the shard has {total.shape[0]}")
        total.add_(mine[:, 0])
        total_sq.add_(mine[:, 1])

    def add_zeros(self, key: str, g: torch.Tensor) -> None:
        self.add(key, g, counted=False)


def gather_to_main(
    local: torch.Tensor, named: list[tuple[str, torch.Tensor]], info: dist.DistInfo
) -> Optional[dict[str, torch.Tensor]]:
    """{peft key: whole tensor} on rank 0 (on the CPU) from every rank's flat rows of each tensor in `named`
    order (`local`), in one gather padded to the largest rank's share; None on the other ranks."""
    shapes = [p.shape for _, p in named]

    def held(rank: int) -> list[int]:  # the elements of each tensor that `rank` holds
        spans = [shard_rows(shape[0], info.world_size, rank) for shape in shapes]
        return [(stop - start) * shape[1:].numel() for (start, stop), shape in zip(spans, shapes)]

    sizes = [held(rank) for rank in range(info.world_size)]
    if sum(sizes[info.rank]) != local.numel():
        raise RuntimeError(f"rank {info.rank} holds {local.numel()} elements, its rows are {sum(sizes[info.rank])}")
    padded = torch.zeros(max(map(sum, sizes)), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)] if info.is_main else None
    torch_dist.gather(padded, parts, dst=0)
    if not info.is_main:
        return None
    pieces = [part[: sum(own)].cpu().split(own) for part, own in zip(parts, sizes)]
    return {
        key: torch.cat([rank_pieces[j].view(-1, *shape[1:]) for rank_pieces in pieces])
        for j, ((key, _), shape) in enumerate(zip(named, shapes))
    }


def score_rows_sharded(
    model: nn.Module,
    rows,
    order: str = "second",
    info: dist.DistInfo = dist.DistInfo(),
    progress: Optional[str] = None,
    batch_size: int = 1,
):
    """importance.score_rows for an FSDP-sharded model: (scores {peft key: whole tensor} on rank 0, None on
    the other ranks; this rank's moments, which hold its rows of each tensor).

    Each rank takes every world_size-th row. The per-example gradients are formed by
    lorapar.importance.accumulate_batch's output-gradient hooks, which under FSDP see the gathered A and B of
    the block being differentiated; each rank keeps the moments of its own rows of every tensor, summed over
    all ranks' examples (ShardedMomentSums), and the importance of those rows, an element-wise formula, from
    its local adapter rows. The whole scores are gathered to rank 0 once, at the end: the partition sees the
    whole vector and rank 0 writes the files. torch.autograd.grad cannot reach FSDP's sharded parameters, so
    the hooks run through loss.backward() and FSDP's reduce-scattered gradients are dropped. Every rank runs
    the same number of batches (collectives pair up); a rank with fewer rows runs its last batches on a
    stand-in row whose gradients add zeros.
    """
    from lorapar.importance import GradientMoments, accumulate_batch, importance_scores
    from lorapar.lora import named_lora_parameters
    from lorapar.model import eval_mode

    named = named_lora_parameters(model)
    sums = ShardedMomentSums(named, info.device)
    share = list(rows[info.rank :: info.world_size])
    n_batches = -(-(-(-len(rows) // info.world_size)) // batch_size)  # the largest share's batches

    def backward(loss: torch.Tensor) -> None:  # runs the hooks; FSDP's reduce-scattered gradients are dropped
        loss.backward()
        model.zero_grad(set_to_none=True)

    tokens = 0
    with eval_mode(model):
        for index in range(n_batches):
            batch = share[index * batch_size : (index + 1) * batch_size]
            if batch:
                tokens += accumulate_batch(model, batch, sums.add, backward)
            else:  # a stand-in so that every rank joins the same collectives; adds zeros
                accumulate_batch(model, [rows[0]], sums.add_zeros, backward)
            if progress and info.is_main:
                print(f"{progress}: batch {index + 1}/{n_batches}", flush=True)
    totals = dist.all_reduce_sum(torch.tensor([len(share), tokens], dtype=torch.float64, device=info.device), info)
    moments = GradientMoments(
        sums.keys, sums.shapes, sums.sum_grad, sums.sum_grad_sq, int(totals[0]), int(totals[1]), rows=sums.rows
    )
    phi = torch.cat([p.to_local().detach().float().reshape(-1) for _, p in named])  # this rank's rows, in `named` order
    local_scores = importance_scores(moments.sum_grad, moments.sum_grad_sq, moments.count, phi, order)
    return gather_to_main(local_scores, named, info), moments
