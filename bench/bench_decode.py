"""Greedy decoding speed on the CPU: lorapar's generate vs Hugging Face transformers' generate.

Goals (issue 2): >= 1.4x transformers at batch 8 and >= 1.2x at batch 1 (with the KV cache), and a
batch-8 decode step within 1.3x of the time it takes to stream the weights once from memory (the floor
for a memory-bound step; bandwidth is measured in this run). `generate(..., prepack=True)` is timed
too: MKL's small-batch sgemm re-packs every weight on every call, which prepacking removes.

The model is `llama-100m` (random weights, LLaMA-2's vocabulary and head size); transformers loads the
very same weights from an HF checkpoint written by lorapar, and the two must agree on the logits.
Without transformers installed the comparison is skipped. Other processes on a shared machine add
noise: each figure is the best of `repeats`, with every variant interleaved so that all see the same
conditions.

    python bench/bench_decode.py [--batch-sizes 1,8 --prompt-len 16 --new-tokens 32 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lorapar.checkpoint import save_model  # noqa: E402
from lorapar.config import ModelArgs, add_dataclass_args, dataclass_from_args  # noqa: E402
from lorapar.generate import generate  # noqa: E402
from lorapar.model import Transformer  # noqa: E402


@dataclass
class BenchArgs:
    model: str = field(default="llama-100m", metadata={"help": "ModelArgs preset"})
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 16
    new_tokens: int = field(default=32, metadata={"help": "greedy tokens per row with the KV cache"})
    uncached_new_tokens: int = field(default=8, metadata={"help": "tokens per row without it (quadratic cost)"})
    repeats: int = field(default=5, metadata={"help": "timings per configuration; the best is reported"})
    clock: str = field(
        default="wall",
        metadata={
            "choices": ("wall", "cpu"),
            "help": "wall time, or this process's CPU time (robust to preemption by other processes; with --threads 1)",
        },
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "torch threads for both libraries (0: torch's default); "
            "1 avoids thread-barrier stalls on an oversubscribed machine"
        },
    )


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def weight_stream(model: Transformer) -> tuple[int, Callable[[], torch.Tensor]]:
    """(bytes, pass): the weights one decode step reads (all but the embedding table, of which it reads a
    row), and a matrix-vector product over a matrix of that size, which reads each element once: the
    memory-bound floor of a decode step. It is timed among the decoding runs, under the same load."""
    embedding = 0 if model.args.tie_embeddings else model.tok_embeddings.weight.numel()
    step_params = model.num_params() - embedding
    matrix = torch.randn(step_params // model.args.dim, model.args.dim)
    vector = torch.randn(1, model.args.dim)
    return matrix.numel() * 4, lambda: F.linear(vector, matrix)


def gemm_gflops(repeats: int, clock) -> float:
    """Measured fp32 matrix-multiply throughput: a decode step cannot beat 2 * batch * params FLOPs at this
    rate."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / best_time(lambda: a @ b, repeats, clock) / 1e9


def lorapar_uncached(model: Transformer, prompts: torch.Tensor, steps: int) -> None:
    """Greedy decoding by a full forward over the whole sequence for every new token (logits of the last
    position only, as transformers does)."""
    seq = prompts
    with torch.inference_mode():
        for _ in range(steps):
            last = model(seq, return_hidden=True)[:, -1:]
            seq = torch.cat([seq, model.output(last).argmax(-1)], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchArgs)
    cfg = dataclass_from_args(BenchArgs, parser.parse_args())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clock = time.perf_counter if cfg.clock == "wall" else time.process_time
    torch.manual_seed(0)
    args = ModelArgs.from_name(cfg.model)
    model = Transformer(args)
    model.init_weights(seed=0)
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"model {cfg.model}: {model.num_params() / 1e6:.1f}M params, {weight_bytes / 1e6:.0f} MB fp32; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    try:
        import transformers
    except ImportError:
        transformers = None
        print("transformers is not installed: the comparison is skipped (pip install transformers)")
    hf = None
    if transformers is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tmp, format="hf")
            hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
            hf.eval()
        probe = torch.randint(0, args.vocab_size, (2, cfg.prompt_len), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            diff = (hf(probe).logits - model(probe)).abs().max().item()
        print(f"transformers {transformers.__version__}: same weights, max |logit difference| = {diff:.2e}")
        assert diff < 1e-3, "transformers and lorapar disagree on the same checkpoint"

    step_bytes, stream_pass = weight_stream(model)
    gflops = gemm_gflops(cfg.repeats, clock)
    print(f"a decode step reads {step_bytes / 1e6:.0f} MB of weights; fp32 GEMM {gflops:.1f} GFLOP/s")

    print(
        f"\ngreedy decoding, prompt {cfg.prompt_len} tokens, tokens/s over all rows "
        f"(best of {cfg.repeats}, {cfg.clock} clock)"
    )
    for batch in cfg.batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, args.vocab_size, (batch, cfg.prompt_len), generator=generator)
        rows = prompts.tolist()
        n, n_uncached = cfg.new_tokens, cfg.uncached_new_tokens
        timings = {
            "weights, one pass": (0, stream_pass),
            "lorapar, KV cache": (n, lambda: generate(model, rows, n)),
            "lorapar, KV cache, 1 token": (1, lambda: generate(model, rows, 1)),
            "lorapar, KV cache, prepacked": (n, lambda: generate(model, rows, n, prepack=True)),
            "lorapar, no cache": (n_uncached, lambda: lorapar_uncached(model, prompts, n_uncached)),
        }
        if hf is not None:

            def hf_generate(steps: int, use_cache: bool):
                with torch.inference_mode():
                    hf.generate(
                        prompts,
                        attention_mask=torch.ones_like(prompts),
                        max_new_tokens=steps,
                        min_new_tokens=steps,
                        do_sample=False,
                        use_cache=use_cache,
                        pad_token_id=0,
                    )

            timings["transformers, KV cache"] = (n, lambda: hf_generate(n, True))
            timings["transformers, no cache"] = (n_uncached, lambda: hf_generate(n_uncached, False))
        for _, fn in timings.values():  # warm-up: first calls pay for allocations and kernel selection
            fn()
        best = {name: float("inf") for name in timings}
        for _ in range(cfg.repeats):  # interleaved, so that load from other processes hits every variant alike
            for name, (_, fn) in timings.items():
                best[name] = min(best[name], best_time(fn, 1, clock))
        rate = {name: timings[name][0] * batch / best[name] for name in timings}
        print(f"batch {batch}:")
        for name in timings:
            if timings[name][0] > 1:
                print(f"  {name:<30} {rate[name]:8.1f} tok/s")
        stream = best["weights, one pass"]
        roofline = max(stream, 2 * batch * (step_bytes / 4) / (gflops * 1e9))
        print(f"  streaming the weights once     {stream * 1e3:6.1f} ms ({step_bytes / stream / 1e9:.1f} GB/s)")
        for variant in ("lorapar, KV cache", "lorapar, KV cache, prepacked"):  # the prefill is the same in both
            step = (best[variant] - best["lorapar, KV cache, 1 token"]) / (n - 1)
            print(
                f"  decode step, {variant.removeprefix('lorapar, KV cache').strip(', ') or 'default':<16} "
                f"{step * 1e3:6.1f} ms = {step / stream:.2f}x the weight-streaming time, "
                f"{step / roofline:.2f}x the roofline max(streaming, FLOPs at the GEMM rate)"
            )
        if hf is not None:
            cached = rate["transformers, KV cache"]
            print(
                f"  speed-up vs transformers: {rate['lorapar, KV cache'] / cached:.2f}x with the cache "
                f"({rate['lorapar, KV cache, prepacked'] / cached:.2f}x prepacked), "
                f"{rate['lorapar, no cache'] / rate['transformers, no cache']:.2f}x without"
            )


if __name__ == "__main__":
    main()
