"""CPU cost of a masked LoRA linear (forward + backward) over the frozen base linear alone.

    fused   kernels.masked_lora_linear: y = x W^T + s (x A^T) B^T, dX, masked dA and dB
    layer   lorapar.lora.LoRALinear as it runs off CUDA: the equation in PyTorch, autograd's backward
    naive   plain autograd over the unfused expression; masks applied by multiplying the finished
            gradients (what hook-based implementations do)
    base    F.linear(x, W) with W frozen: forward + dX, the floor every LoRA layer pays

Goal (issue 3): fused / base <= 1.15 at 2048 tokens, 4096 x 4096, r 8, 40% active, fp32. The three
variants run round-robin in one process; on a shared CPU the load drifts between rounds, so the
headline is the median over rounds of each round's own ratio (variants timed seconds apart), next to
the plain medians.

    python bench/bench_masked_lora.py [--tokens 2048 --in-features 4096 --out-features 4096 --rank 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import masked_lora_linear  # noqa: E402
from lorapar.config import add_dataclass_args, dataclass_from_args  # noqa: E402
from lorapar.lora import LoRALinear  # noqa: E402


@dataclass
class BenchArgs:
    tokens: int = 2048
    in_features: int = 4096
    out_features: int = 4096
    rank: int = 8
    active: float = field(default=0.4, metadata={"help": "fraction of trainable LoRA elements"})
    scale: float = field(default=8.0, metadata={"help": "alpha / r (paper: 64 / 8)"})
    repeats: int = field(default=7, metadata={"help": "timed rounds per variant (after one warm-up)"})
    seed: int = 0


def make_problem(args: BenchArgs):
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, args.in_features, generator=gen).requires_grad_()
    weight = torch.randn(args.out_features, args.in_features, generator=gen) / args.in_features**0.5
    # Parameters, so that the layer variant can hold these very tensors (and the loop resets one .grad)
    lora_A = torch.nn.Parameter(torch.randn(args.rank, args.in_features, generator=gen) * 0.01)
    lora_B = torch.nn.Parameter(torch.randn(args.out_features, args.rank, generator=gen) * 0.01)
    mask_A = torch.rand(lora_A.shape, generator=gen) < args.active
    mask_B = torch.rand(lora_B.shape, generator=gen) < args.active
    dy = torch.randn(args.tokens, args.out_features, generator=gen)
    return x, weight, lora_A, lora_B, mask_A, mask_B, dy


def variants(args: BenchArgs, x, weight, lora_A, lora_B, mask_A, mask_B, dy):
    def base():
        F.linear(x, weight).backward(dy)

    def fused():
        masked_lora_linear(x, weight, lora_A, lora_B, args.scale, mask_A, mask_B).backward(dy)

    layer_module = LoRALinear(weight, args.rank, args.scale * args.rank)  # alpha = s r
    layer_module.lora_A, layer_module.lora_B = lora_A, lora_B
    layer_module.set_masks(mask_A, mask_B)

    def layer():
        layer_module(x).backward(dy)

    def naive():
        (F.linear(x, weight) + args.scale * F.linear(F.linear(x, lora_A), lora_B)).backward(dy)
        lora_A.grad.mul_(mask_A)
        lora_B.grad.mul_(mask_B)

    return {"base": base, "fused": fused, "layer": layer, "naive": naive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchArgs)
    args = dataclass_from_args(BenchArgs, parser.parse_args())
    tensors = make_problem(args)
    x, _, lora_A, lora_B = tensors[:4]
    runs = variants(args, *tensors)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.repeats + 1):  # round 0 warms up allocator and thread pool
        for name, run in runs.items():
            x.grad = lora_A.grad = lora_B.grad = None  # every variant allocates its grads afresh
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_index:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    paired = {name: statistics.median(t / b for t, b in zip(values, times["base"])) for name, values in times.items()}
    print(
        f"{args.tokens} tokens, {args.in_features}->{args.out_features}, r {args.rank}, "
        f"{args.active:.0%} active, fp32, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for name, median in medians.items():
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        print(
            f"  {name:6s} {median * 1e3:8.1f} ms  (range {spread} ms)  ratio of medians "
            f"{median / medians['base']:.3f}  median per-round ratio {paired[name]:.3f}"
        )
    print(
        f"fused / base = {paired['fused']:.3f} (goal <= 1.15); layer / base = {paired['layer']:.3f}; "
        f"naive / base = {paired['naive']:.3f}"
    )


if __name__ == "__main__":
    main()
