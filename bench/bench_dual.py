"""Cost of a DM-LoRA training step next to plain LoRA of the same total rank, on the CPU.

One optimizer step = forward + backward on answer tokens + MaskedAdamW step. DM-LoRA adds the
orthogonality regulariser (once per step), the concatenation of both modules before the fused kernel,
and the screener's EMA update (every step until the final phase). Reported: seconds per step (best of
`repeats`, the two adapters interleaved so that both see the same machine load) and their ratio, plus
the screener and regulariser alone. The model is `llama-100m` cut to a few layers (random weights).

    python bench/bench_dual.py [--layers 2 --batch 2 --seq-len 128 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lorapar.config import ModelArgs, add_dataclass_args, dataclass_from_args  # noqa: E402
from lorapar.dmlora.args import DualArgs  # noqa: E402
from lorapar.dmlora.training import DualTraining, orthogonality_loss  # noqa: E402
from lorapar.lora import LoraArgs, apply_lora  # noqa: E402
from lorapar.model import Transformer  # noqa: E402
from lorapar.optim import MaskedAdamW  # noqa: E402


@dataclass
class BenchArgs:
    model: str = field(default="llama-100m", metadata={"help": "ModelArgs preset"})
    layers: int = field(default=2, metadata={"help": "keep this many transformer blocks"})
    batch: int = 2
    seq_len: int = 128
    rank: int = field(default=128, metadata={"help": "total rank (DM-LoRA: 32 shared + the rest expert)"})
    repeats: int = 5


def build(cfg: BenchArgs, adapter: str):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name(cfg.model, n_layers=cfg.layers))
    model.init_weights(seed=0)
    dual = None
    if adapter == "dual":
        args = DualArgs(
            dual_rank=cfg.rank,
            dual_alpha=float(cfg.rank),
            dual_target_rank=(cfg.rank - 32) * 0.8,
            dual_t_init=0,
            dual_t_final=1,
            dual_delta_t=10**9,
        )
        dual = DualTraining(model, args)
    else:
        # the same projections as DM-LoRA's (its default targets include o, LoRA-PAR's do not)
        apply_lora(model, LoraArgs(r=cfg.rank, alpha=float(cfg.rank), init="gaussian", targets=DualArgs().dual_targets))
    optimizer = MaskedAdamW.for_model(model, lr=1e-4, weight_decay=0.0)
    if dual is not None:
        dual.start(optimizer, total_steps=10**9)
    return model.train(), optimizer, dual


def step(model, optimizer, dual, tokens: torch.Tensor, number: int) -> None:
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    if dual is not None:
        loss = loss + dual.regulariser()
    loss.backward()
    optimizer.step()
    if dual is not None:
        dual.after_step(number)
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_args(parser, BenchArgs)
    cfg = dataclass_from_args(BenchArgs, parser.parse_args())
    tokens = torch.randint(32000, (cfg.batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    runs = {name: build(cfg, name) for name in ("lora", "dual")}
    best = {name: float("inf") for name in runs}
    for name, run in runs.items():  # warm-up (allocations, first optimizer state)
        step(*run, tokens, 1)
    for i in range(cfg.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            step(*run, tokens, i + 2)
            best[name] = min(best[name], time.perf_counter() - start)
    model, _, dual = runs["dual"]
    model(tokens[:, :-1]).logsumexp(-1).mean().backward()  # gradients for the screener to read
    screen, regular = float("inf"), float("inf")
    for i in range(cfg.repeats):
        start = time.perf_counter()
        dual.screener.step(i + 2)
        screen = min(screen, time.perf_counter() - start)
        start = time.perf_counter()
        orthogonality_loss(model).backward()
        regular = min(regular, time.perf_counter() - start)
    print(
        f"{cfg.model} x {cfg.layers} layers, batch {cfg.batch} x {cfg.seq_len} tokens, total rank {cfg.rank}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"  LoRA r={cfg.rank} step      {best['lora'] * 1e3:8.1f} ms")
    print(
        f"  DM-LoRA 32+{cfg.rank - 32} step   {best['dual'] * 1e3:8.1f} ms   ({best['dual'] / best['lora']:.2f}x LoRA)"
    )
    print(f"    screener EMA update  {screen * 1e3:8.1f} ms   ({screen / best['dual']:.1%} of its step)")
    print(f"    orthogonality f+b    {regular * 1e3:8.1f} ms   ({regular / best['dual']:.1%} of its step)")


if __name__ == "__main__":
    main()
