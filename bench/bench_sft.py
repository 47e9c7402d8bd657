"""SFT step throughput and peak memory on the CPU: lorapar against Hugging Face transformers + peft.

Both train the same LoRA (r 8, alpha 64, q,k,v,gate,up,down) on the same ~100M-parameter LLaMA
checkpoint (ModelArgs.from_name("llama-100m"), written once as a Hugging Face directory) with the
same batch: B sequences of T tokens, the loss on the last `answer` share of each (an SFT batch: the
prompt carries no loss). One step = forward, backward, gradient clipping, AdamW. Each framework runs
in its own subprocess. "loaded" is its resident set once the model is loaded with every weight paged
in; "peak" is the highest resident set over the training steps (VmHWM, reset after loading so that the
loader's temporaries do not count; ru_maxrss would even inherit the spawning parent's peak); "step"
is peak minus loaded: what the training step itself adds. Goals:
>= 1.3x their tokens/s, <= 0.6x their peak memory.

Resident memory also depends on the allocator: glibc raises its mmap threshold after large frees,
so later tensors come from the heap and freed ones stay resident. `--mmap-threshold 131072` pins the
threshold (MALLOC_MMAP_THRESHOLD_, for both frameworks) so that the figures follow live tensors.

    python bench/bench_sft.py [--batch 4] [--seq 256] [--answer 0.5] [--steps 5] [--threads N] [--mmap-threshold B]
                              [--checkpointing] [--model llama-100m|qwen2-100m]

--model qwen2-100m: the same budget in Qwen2's shape (q/k/v biases, tied 151936-token embedding): its
logits are 4.75x LLaMA-2's per token, which is what the chunked output layer has to keep bounded.

Requires `pip install transformers peft` for the comparison; without them only lorapar is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def make_batch(vocab: int, batch: int, seq: int, answer: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : int(seq * (1 - answer))] = -100
    return input_ids, labels


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # reported in KiB


def lorapar_step_fn(ckpt: str, checkpointing: bool):
    from lorapar.checkpoint import load_model
    from lorapar.lora import LoraArgs, apply_lora
    from lorapar.loss import answer_nll
    from lorapar.optim import MaskedAdamW

    model = load_model(ckpt)
    apply_lora(model, LoraArgs())
    model.gradient_checkpointing = checkpointing
    model.train()
    optimizer = MaskedAdamW.for_model(model, lr=2e-4, weight_decay=0.0)

    def step(input_ids, labels):
        nll, n = answer_nll(model, input_ids, labels)
        (nll / n).backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (nll / n).item()

    return step, model


def hf_step_fn(ckpt: str, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS_HF))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def step(input_ids, labels):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def worker(args) -> None:
    """Run in a subprocess: one warm-up step, then `steps` timed ones; print a JSON line."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lorapar.checkpoint import read_model_args

    vocab = read_model_args(args.ckpt).vocab_size
    input_ids, labels = make_batch(vocab, args.batch, args.seq, args.answer)
    step, model = (lorapar_step_fn if args.worker == "lorapar" else hf_step_fn)(args.ckpt, args.checkpointing)
    with torch.no_grad():  # page in the memory-mapped weights, so that "loaded" counts all of them
        for p in model.parameters():
            p.sum()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS: from here on the peak is the training steps'
    loaded = memory_mb("VmRSS")
    first_loss = step(input_ids, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(input_ids, labels)
    seconds = (time.perf_counter() - start) / args.steps
    peak = memory_mb("VmHWM")
    print(
        json.dumps(
            {
                "tokens_per_s": args.batch * args.seq / seconds,
                "step_s": seconds,
                "first_loss": first_loss,
                "loaded_mb": loaded,
                "peak_mb": peak,
                "step_mb": peak - loaded,
            }
        )
    )


def run_worker(name: str, ckpt: str, args) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, "--ckpt", ckpt]
    for flag in ("batch", "seq", "answer", "steps", "threads"):
        argv += [f"--{flag}", str(getattr(args, flag))]
    argv += ["--checkpointing"] if args.checkpointing else []
    env = {**os.environ, "PYTHONPATH": REPO}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{name} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--answer", type=float, default=0.5, help="share of each sequence that carries the loss")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing per block in both frameworks (non-reentrant)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="pin glibc's mmap threshold (bytes) in both workers; 0 = glibc's dynamic default",
    )
    parser.add_argument(
        "--model",
        default="llama-100m",
        choices=["llama-100m", "qwen2-100m"],
        help="model preset (lorapar.config.MODEL_PRESETS), written once as a Hugging Face directory",
    )
    parser.add_argument("--worker", choices=["lorapar", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from lorapar.checkpoint import save_model
    from lorapar.config import ModelArgs
    from lorapar.model import Transformer

    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        have_hf = True
    except ImportError:
        have_hf = False
        print("transformers / peft not installed: measuring lorapar only (pip install transformers peft)")

    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer(ModelArgs.from_name(args.model))
        model.init_weights(seed=0)
        print(
            f"model: {args.model}, {model.num_params() / 1e6:.1f}M parameters; "
            f"batch {args.batch} x {args.seq} tokens, "
            f"loss on {args.answer:.0%}; {args.threads} threads; torch {torch.__version__}"
        )
        save_model(model, tmp, format="hf")
        del model
        results = {"lorapar": run_worker("lorapar", tmp, args)}
        if have_hf:
            results["transformers+peft"] = run_worker("hf", tmp, args)

    allocator = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "glibc default"
    print(f"allocator: {allocator}; activation checkpointing: {'on' if args.checkpointing else 'off'} in both")
    print(
        f"{'framework':20s} {'tokens/s':>10s} {'step s':>8s} {'loaded MiB':>11s} {'peak MiB':>9s} {'step MiB':>9s} "
        f"{'first loss':>11s}"
    )
    for name, r in results.items():
        print(
            f"{name:20s} {r['tokens_per_s']:10.1f} {r['step_s']:8.2f} {r['loaded_mb']:11.0f} {r['peak_mb']:9.0f} "
            f"{r['step_mb']:9.0f} {r['first_loss']:11.4f}"
        )
    if have_hf:
        ours, theirs = results["lorapar"], results["transformers+peft"]
        print(
            f"lorapar / transformers+peft: tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (goal >= "
            "1.3x), "
            f"peak memory {ours['peak_mb'] / theirs['peak_mb']:.2f}x (goal <= 0.6x), "
            f"step memory {ours['step_mb'] / theirs['step_mb']:.2f}x"
        )


if __name__ == "__main__":
    main()
