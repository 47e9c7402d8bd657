"""dist.all_reduce_grads on a real two-process gloo group: sums, and a gradient no rank has stays None."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from lorapar import dist
from lorapar.optim import MaskedAdamW


def reduce_on_rank(rank: int, store: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        info = dist.DistInfo(rank=rank, world_size=2)
        both, only_rank1, nobody = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
        both.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            only_rank1.grad = torch.tensor([1.0, 2.0, 3.0])
        dist.all_reduce_grads([both, only_rank1, nobody], info)
        assert torch.equal(both.grad, torch.full((3,), 3.0)), both.grad
        assert torch.equal(only_rank1.grad, torch.tensor([1.0, 2.0, 3.0])), only_rank1.grad
        assert nobody.grad is None, nobody.grad  # a zero gradient would let weight decay move it
        MaskedAdamW([(nobody, None)], lr=0.1, weight_decay=0.1).step()
        assert torch.equal(nobody.detach(), torch.ones(3))
    finally:
        torch_dist.destroy_process_group()


def test_all_reduce_grads_sums_and_keeps_missing_gradients_none(tmp_path):
    mp.spawn(reduce_on_rank, args=(str(tmp_path / "store"),), nprocs=2, join=True)
