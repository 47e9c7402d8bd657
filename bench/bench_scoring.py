"""Importance-scoring throughput on the ~100M-parameter LLaMA (ModelArgs.from_name("llama-100m")).

Random weights and tokens (throughput does not depend on them): each example has --tokens tokens, the
last half of them answer tokens. Reports examples/s and answer tokens/s of one system's scoring, with
the paper's adapter (r 8, q,k,v,gate,up,down, gaussian init).

    python bench/bench_scoring.py [--examples 6 --tokens 256 --threads N]
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
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=256)
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

    accumulate_moments(model, rows[:1])  # warm-up (allocator, lazy inits)
    start = time.perf_counter()
    moments = accumulate_moments(model, rows[1:])
    seconds = time.perf_counter() - start
    importance_from_moments(model, moments)
    print(f"llama-100m ({model.num_params() / 1e6:.0f}M parameters, adapter {n_adapter / 1e6:.2f}M elements), "
          f"{args.threads} threads, {args.examples} examples x {args.tokens} tokens")  # fmt: skip
    print(f"  {args.examples / seconds:.2f} examples/s   {moments.tokens / seconds:.0f} answer tokens/s   "
          f"{seconds / args.examples * 1000:.0f} ms per example (forward + backward + moment update)")  # fmt: skip


if __name__ == "__main__":
    main()
