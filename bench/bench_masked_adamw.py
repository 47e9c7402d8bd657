"""MaskedAdamW against torch.optim.AdamW on a LLaMA-2-7B-shaped LoRA adapter set (CPU).

Adapter: q, k, v, gate, up, down at r = 8 over 32 layers (17.9M elements), 40% of the elements
active (LoRA-PAR's theta = 0.9 keeps about that many). AdamW updates every element; MaskedAdamW
only the active ones. Reports optimizer-state memory (exp_avg + exp_avg_sq) and step time (best
of interleaved steps), both as ratios measured in this run. Goal: state memory <= 0.45x.

    python bench/bench_masked_adamw.py [--active 0.4] [--steps 5] [--layers 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorapar.optim import MaskedAdamW  # noqa: E402

DIM, HIDDEN, RANK = 4096, 11008, 8
# (in, out) of each adapted projection of one LLaMA-2-7B layer
SHAPES = {
    "q": (DIM, DIM),
    "k": (DIM, DIM),
    "v": (DIM, DIM),
    "gate": (DIM, HIDDEN),
    "up": (DIM, HIDDEN),
    "down": (HIDDEN, DIM),
}


def adapter(layers: int, active: float, seed: int = 0):
    """[(A or B parameter, mask)] with random gradients attached."""
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for _ in range(layers):
        for fan_in, fan_out in SHAPES.values():
            for shape in ((RANK, fan_in), (fan_out, RANK)):
                p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01)
                p.grad = torch.randn(shape, generator=gen)
                entries.append((p, torch.rand(shape, generator=gen) < active))
    return entries


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def time_interleaved(optimizers: dict[str, torch.optim.Optimizer], steps: int) -> dict[str, float]:
    """Best step time of each optimizer over `steps` rounds; the optimizers alternate within a round
    so that load from other processes on the machine hits them alike."""
    for optimizer in optimizers.values():
        optimizer.step()  # creates the state; not timed
    best = {name: float("inf") for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--active", type=float, default=0.4, help="fraction of active elements")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hyper = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

    entries = adapter(args.layers, args.active)
    params = [p for p, _ in entries]
    n_total = sum(p.numel() for p in params)
    n_active = sum(int(m.sum()) for _, m in entries)
    print(
        f"adapter: {len(params)} tensors, {n_total / 1e6:.2f}M elements, {n_active / n_total:.1%} active; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    optimizers = {"MaskedAdamW": MaskedAdamW(entries, **hyper)}
    for foreach in (False, True):
        optimizers[f"torch AdamW foreach={foreach}"] = torch.optim.AdamW(params, foreach=foreach, **hyper)
    times = time_interleaved(optimizers, args.steps)
    results = {name: (times[name], state_bytes(optimizer)) for name, optimizer in optimizers.items()}
    m_masked = results["MaskedAdamW"][1]

    reference_time, reference_bytes = results["torch AdamW foreach=False"]
    print(
        f"{'optimizer (best of ' + str(args.steps) + ' steps)':32s} {'step ms':>9s} {'time x':>7s} {'state MB':>9s} "
        f"{'memory x':>9s}"
    )
    for name, (seconds, nbytes) in results.items():
        print(
            f"{name:32s} {seconds * 1e3:9.1f} {seconds / reference_time:7.2f} {nbytes / 2**20:9.1f} "
            f"{nbytes / reference_bytes:9.3f}"
        )
    mask_mb = n_total / 2**20
    print(
        f"masks (bool, held by the LoRA modules and shared with the kernel): {mask_mb:.1f} MB; "
        f"state + masks = {(m_masked + n_total) / reference_bytes:.3f}x of AdamW's state"
    )
    print(
        f"goal state memory <= 0.45x: {'met' if m_masked / reference_bytes <= 0.45 else 'NOT met'} "
        f"({m_masked / reference_bytes:.3f}x)"
    )


if __name__ == "__main__":
    main()
