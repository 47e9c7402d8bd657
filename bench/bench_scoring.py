"""Importance-scoring throughput on the ~100M-parameter LLaMA (ModelArgs.from_name("llama-100m")).

Random weights and tokens (throughput does not depend on them): each example has --tokens tokens, the
last half of them answer tokens. Reports examples/s and answer tokens/s of one system's scoring, with
the paper's adapter (r 8, q,k,v,gate,up,down, gaussian init), one example per backward pass against
batched per-example gradients.

    python bench/bench_scoring.py [--examples 8 --tokens 256 --batch-size 4 --threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lorapar.config import ModelArgs  # noqa: E402
from lorapar.importance import ImportanceArgs, accumulate_moments, importance_from_moments  # noqa: E402
from lorapar.lora import apply_lora  # noqa: E402
from lorapar.loss import IGNORE_INDEX  # noqa: E402
from lorapar.model import Transformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="the batched path's batch size (compared with 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_args = ModelArgs.from_name("llama-100m")
    model = Transformer(model_args)
    model.init_weights(seed=0)
    apply_lora(model, ImportanceArgs().lora_args())
    n_adapter = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if hasattr(m, "lora_A"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.examples + 1):
        ids = torch.randint(3, model_args.vocab_size, (args.tokens,), generator=g).tolist()
        rows.append((ids, [IGNORE_INDEX] * (args.tokens // 2) + ids[args.tokens // 2 :]))

    print(
        f"llama-100m ({model.num_params() / 1e6:.0f}M parameters, adapter {n_adapter / 1e6:.2f}M elements), "
        f"{args.threads} threads, {args.examples} examples x {args.tokens} tokens"
    )
    accumulate_moments(model, rows[:1])  # warm-up (allocator, lazy inits)
    rates, results = {}, {}
    for batch_size in (1, args.batch_size):
        start, cpu_start = time.perf_counter(), time.process_time()
        results[batch_size] = moments = accumulate_moments(model, rows[1:], batch_size=batch_size)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        importance_from_moments(model, moments)
        rates[batch_size] = args.examples / seconds
        print(
            f"  batch {batch_size}: {rates[batch_size]:.2f} examples/s   {moments.tokens / seconds:.0f} answer "
            "tokens/s   "
            f"{seconds / args.examples * 1000:.0f} ms wall, {cpu_seconds / args.examples * 1000:.0f} ms CPU per example"
        )
    loop, batched = results[1].sum_grad_sq, results[args.batch_size].sum_grad_sq
    print(
        f"  batched / loop speed: {rates[args.batch_size] / rates[1]:.2f}x   "
        f"max relative difference of sum g^2: {float((batched - loop).abs().max() / loop.abs().max()):.1e}"
    )


if __name__ == "__main__":
    main()
