"""Where a GRPO step's time goes on the CPU: generation, reference log-probs, optimisation.

One step of lorapar.grpo on the ~100M-parameter LLaMA (ModelArgs.from_name("llama-100m"), random
weights, LoRA r 8 on q,k,v,gate,up,down): P prompts x G completions sampled with the KV cache to a
fixed length (no early stop, so every step does the same work), a reward, the reference policy's
log-probs (beta > 0, base model = adapter disabled) and mu optimizer passes. Prints each part's
seconds and share of the step, averaged over the timed steps after one warm-up step.

    python bench/bench_grpo.py [--prompts 2] [--generations 8] [--prompt-len 64] [--completion-len 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorapar import dist  # noqa: E402
from lorapar.config import ModelArgs  # noqa: E402
from lorapar.grpo import GRPOArgs, derive_seed, grpo_update, make_rollouts  # noqa: E402
from lorapar.lora import LoraArgs, apply_lora, disable_adapter  # noqa: E402
from lorapar.model import Transformer  # noqa: E402
from lorapar.optim import MaskedAdamW  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-100m")
    parser.add_argument("--prompts", type=int, default=2, help="P")
    parser.add_argument("--generations", type=int, default=8, help="G (paper: 8)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--mu", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name(args.model))
    model.init_weights(seed=0)
    apply_lora(model, LoraArgs())
    optimizer = MaskedAdamW.for_model(model, lr=5e-6, betas=(0.9, 0.99), weight_decay=0.1)
    grpo = GRPOArgs(
        num_generations=args.generations,
        max_completion_len=args.completion_len,
        beta=args.beta,
        reference="base",
        mu=args.mu,
        micro_batch=args.micro_batch,
    )
    gen = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    prompts = [
        [1] + torch.randint(3, vocab, (args.prompt_len - 1,), generator=gen).tolist() for _ in range(args.prompts)
    ]

    def score(_, completions):  # any reward with spread will do: the share of even token ids
        return torch.tensor([[sum(t % 2 == 0 for t in c) / max(len(c), 1)] for c in completions])

    print(
        f"model: {args.model}, {model.num_params() / 1e6:.1f}M parameters; {args.prompts} prompts x {args.generations} "
        f"completions, {args.prompt_len} + {args.completion_len} tokens; beta {args.beta}, mu {args.mu}; "
        f"{torch.get_num_threads()} threads"
    )
    totals = {"generation": 0.0, "log-probs (old/reference)": 0.0, "optimisation": 0.0}
    for step in range(args.steps + 1):
        seeds = [derive_seed(step, i) for i in range(len(prompts))]
        rollouts = make_rollouts(model, prompts, score, torch.ones(1), grpo, seeds=seeds, eos_id=None, pad_id=0)
        start = time.perf_counter()
        stats = grpo_update(
            model,
            optimizer,
            rollouts,
            grpo,
            dist.DistInfo(),
            lrs=[5e-6] * args.mu,
            max_grad_norm=0.1,
            reference=lambda: disable_adapter(model),
        )
        update_seconds = time.perf_counter() - start
        if step == 0:
            continue  # warm-up
        totals["generation"] += rollouts.generation_seconds
        totals["log-probs (old/reference)"] += stats["logprob_seconds"]
        totals["optimisation"] += update_seconds - stats["logprob_seconds"]

    step_seconds = sum(totals.values()) / args.steps
    completion_tokens = args.prompts * args.generations * args.completion_len
    print(f"{'part':28s} {'seconds':>8s} {'share':>7s}")
    for name, seconds in totals.items():
        print(f"{name:28s} {seconds / args.steps:8.2f} {seconds / args.steps / step_seconds:7.1%}")
    print(f"{'step':28s} {step_seconds:8.2f}   ({completion_tokens / step_seconds:.1f} completion tokens/s)")


if __name__ == "__main__":
    main()
