"""One-command GPU verification: tests on the GPU, kernel timings, one SFT and one GRPO step, a summary.

    python -m bench.gpu_suite --out DIR            (a CUDA machine; about 6 minutes on one H100/H200)
    python -m bench.gpu_suite --out DIR --dry-run  (CPU, tiny shapes, Triton interpreter: the same code path)

Parts, each in its own subprocess with its own time limit, so a slow or hung part cannot eat the rest:

    tests    pytest on the kernel / model / LoRA / masks tests with LORAPAR_TEST_DEVICE=cuda (the kernels
             natively, not interpreted; fp32 and bf16 cases are the tests' own parametrisations), pass/fail
             per test from a JUnit XML report
    kernels  the fused masked-LoRA linear (forward + backward) against the frozen base GEMM alone and
             against the unfused PyTorch path, at LLaMA-2-7B shapes in bf16, with TFLOP/s and GB/s
    steps    one SFT step and one GRPO step (generation, log-probs, update) of a ~1B-shaped random model
             in bf16: tokens/s and peak memory; the same SFT step in transformers + peft when installed
    fsdp     the --fsdp path on the device (nccl; gloo in the dry run) with one rank: a small model loaded
             shard-wise with a bf16 base and fp32 adapter, three masked SFT steps against the same steps
             without FSDP (losses, adapter difference, frozen elements unchanged)

Every part appends its results to DIR/<part>.json as it goes (a killed part keeps what it measured);
the parent then writes DIR/gpu_suite.json (everything) and DIR/summary.md. Nothing touches the network.

Throughput accounting (kernels): with W frozen, forward + backward of the base is 4 N in out flops
(y = x W^T and dX = dY W); the LoRA branch adds 6 N r (in + out) (xa, y +=, dY B, dX +=, dA, dB).
"Useful" TFLOP/s divides base + LoRA flops by the time; GB/s divides the minimum bytes moved (read x, W
twice, dY, write y, dX) by the time, so it is a floor on the bandwidth actually drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PARTS = ("tests", "kernels", "steps", "fsdp")
# Seconds per part on a GPU: they sum to 340 s, leaving room in the 6-minute budget for start-up.
TIME_LIMITS = {"tests": 140, "kernels": 90, "steps": 80, "fsdp": 30}
DRY_TIME_LIMITS = {"tests": 240, "kernels": 120, "steps": 180, "fsdp": 120}  # the CPU is shared and slow
GPU_TESTS = [
    "tests/test_kernels.py",
    "tests/test_device_paths.py",
    "tests/test_masks.py",
    "tests/test_lora.py",
    "tests/test_model.py",
    "tests/test_swiglu.py",
    "tests/test_loss.py",
]
FSDP_TOLERANCE = 1e-3  # the adapter after three bf16 steps, FSDP against no FSDP (fp32 on the CPU: equal)
DRY_TESTS = ["tests/test_device_paths.py"]  # what the dry run can afford; the full list needs a GPU


# ----------------------------------------------------------------------------- results on disk


class PartLog:
    """Results of one part, rewritten (atomically) after every record so a killed part keeps them."""

    def __init__(self, path: str, part: str):
        self.path, self.data = path, {"part": part, "records": [], "notes": []}

    def add(self, record: dict) -> None:
        self.data["records"].append(record)
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def flush(self) -> None:
        from lorapar.io import atomic_write_json

        atomic_write_json(self.path, self.data)


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    cuda_sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- part: tests


def run_tests(out: str, dry_run: bool, limit: float) -> None:
    log = PartLog(os.path.join(out, "tests.json"), "tests")
    junit = os.path.join(out, "junit.xml")
    env = dict(os.environ, LORAPAR_TEST_DEVICE="cpu" if dry_run else "cuda")
    env.pop("LORAPAR_FORCE_TRITON", None)  # the tests choose their kernel path themselves
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *(DRY_TESTS if dry_run else GPU_TESTS),
    ]
    log.note("command: " + " ".join(command[2:]))
    try:
        completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        log.data["returncode"] = completed.returncode
        log.data["tail"] = (completed.stdout + completed.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        log.note(f"pytest passed its {limit:.0f} s limit; tests without a result are missing below")
    if os.path.exists(junit):
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            log.data["records"].append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "seconds": float(case.get("time", 0.0)),
                }
            )
    log.flush()


# ----------------------------------------------------------------------------- part: kernels


def kernel_cases(dry_run: bool) -> list[dict]:
    """LLaMA-2-7B shapes, the paper's r 8 and 40% active first, so a time limit cuts the least important."""
    if dry_run:
        return [dict(tokens=32, n_in=32, n_out=48, rank=8, active=a) for a in (0.4, 1.0)]
    cases = []
    for rank in (8, 16, 64):
        for n_in, n_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
            for tokens in (2048, 4096, 8192):
                for active in (0.4, 1.0):
                    cases.append(dict(tokens=tokens, n_in=n_in, n_out=n_out, rank=rank, active=active))
    return cases


def run_kernels(out: str, dry_run: bool, limit: float) -> None:
    import torch
    import torch.nn.functional as F

    from kernels import masked_lora_linear
    from kernels.function import use_triton

    log = PartLog(os.path.join(out, "kernels.json"), "kernels")
    deadline = time.monotonic() + limit - 5
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16  # the interpreter's bf16 is emulated; fp32 is its fast case
    repeats = 2 if dry_run else 10
    scale = 2.0
    for case in kernel_cases(dry_run):
        if time.monotonic() > deadline:
            log.note(f"time limit reached: {len(kernel_cases(dry_run)) - len(log.data['records'])} cases not run")
            break
        N, n_in, n_out, r = case["tokens"], case["n_in"], case["n_out"], case["rank"]
        gen = torch.Generator(device).manual_seed(0)
        x = torch.randn(N, n_in, device=device, dtype=dtype, generator=gen).requires_grad_()
        weight = torch.randn(n_out, n_in, device=device, dtype=dtype, generator=gen) / n_in**0.5
        lora_A = (torch.randn(r, n_in, device=device, generator=gen) * 0.01).to(dtype).requires_grad_()
        lora_B = (torch.randn(n_out, r, device=device, generator=gen) * 0.01).to(dtype).requires_grad_()
        mask_A = torch.rand(r, n_in, device=device, generator=gen) < case["active"]
        mask_B = torch.rand(n_out, r, device=device, generator=gen) < case["active"]
        dy = torch.randn(N, n_out, device=device, dtype=dtype, generator=gen)

        def fused():
            y = masked_lora_linear(x, weight, lora_A, lora_B, scale, mask_A, mask_B)
            torch.autograd.grad(y, (x, lora_A, lora_B), dy)

        def unfused():  # plain autograd, masks multiplied into the finished gradients (the hook approach)
            y = F.linear(x, weight) + scale * F.linear(F.linear(x, lora_A), lora_B)
            dx, da, db = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
            return dx, da * mask_A, db * mask_B

        def base():
            torch.autograd.grad(F.linear(x, weight), (x,), dy)

        record = dict(case, dtype=str(dtype).removeprefix("torch."), path="triton" if use_triton(x) else "reference")
        flops_base = 4 * N * n_in * n_out
        flops_lora = 6 * N * r * (n_in + n_out)
        size = x.element_size()
        min_bytes = size * (2 * N * n_in + 2 * N * n_out + 2 * n_in * n_out)
        for name, fn in (("base", base), ("fused", fused), ("unfused", unfused)):
            seconds = time_call(fn, repeats, warmup=2)
            flops = flops_base if name == "base" else flops_base + flops_lora
            record[f"{name}_ms"] = seconds * 1e3
            record[f"{name}_tflops"] = flops / seconds / 1e12
            record[f"{name}_gbps"] = min_bytes / seconds / 1e9
        record["fused_over_base"] = record["fused_ms"] / record["base_ms"]
        record["unfused_over_base"] = record["unfused_ms"] / record["base_ms"]
        log.add(record)


# ----------------------------------------------------------------------------- part: SFT and GRPO steps


def step_model_args(dry_run: bool):
    from lorapar.config import ModelArgs

    if dry_run:
        return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=256)
    # TinyLlama-1.1B's shape: LLaMA-2's vocabulary and head size, grouped-query attention.
    return ModelArgs(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632, max_seq_len=2048
    )


def peak_memory_gb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux; a process-wide peak


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def masked_sft_step(model, optimizer, ids, labels, device):
    """One SFT optimizer step (answer-token mean NLL, clip 1.0, MaskedAdamW); returns the loss tensor."""
    from lorapar.loss import answer_nll
    from lorapar.precision import autocast

    with autocast(device):
        nll, n = answer_nll(model, ids, labels)
    loss = nll / n
    loss.backward()
    optimizer.clip_grad_norm_(1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_steps(out: str, dry_run: bool, limit: float) -> None:
    import torch

    from lorapar import dist
    from lorapar.grpo import GRPOArgs, derive_seed, grpo_update, make_rollouts
    from lorapar.lora import LoraArgs, apply_lora, disable_adapter, named_lora_parameters, set_masks
    from lorapar.model import Transformer
    from lorapar.optim import MaskedAdamW
    from lorapar.precision import autocast

    log = PartLog(os.path.join(out, "steps.json"), "steps")
    deadline = time.monotonic() + limit - 5
    device = torch.device("cpu" if dry_run else "cuda")
    args = step_model_args(dry_run)
    batch, length = (2, 64) if dry_run else (8, 512)
    prompts_n, generations, prompt_len, completion_len = (1, 2, 8, 8) if dry_run else (4, 8, 128, 128)
    repeats = 1 if dry_run else 3

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    model.to(torch.float32 if dry_run else torch.bfloat16)
    lora_args = LoraArgs(r=8, alpha=64, init="gaussian")
    apply_lora(model, lora_args)
    gen = torch.Generator().manual_seed(1)
    set_masks(model, {key: torch.rand(p.shape, generator=gen) < 0.4 for key, p in named_lora_parameters(model)})
    optimizer = MaskedAdamW.for_model(model, lr=2e-4, weight_decay=0.0)
    common = {"params_M": model.num_params() / 1e6, "dtype": "fp32" if dry_run else "bf16", "lora_r": 8, "active": 0.4}
    ids = torch.randint(3, args.vocab_size, (batch, length), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : length // 4] = -100  # a prompt without loss, as in SFT

    def sft_step():
        masked_sft_step(model, optimizer, ids, labels, device)

    model.train()
    reset_peak()
    seconds = time_call(sft_step, repeats, warmup=1)
    log.add(
        {
            **common,
            "step": "sft",
            "batch": batch,
            "length": length,
            "seconds": seconds,
            "tokens_per_s": batch * length / seconds,
            "peak_memory_gb": peak_memory_gb(),
        }
    )

    if time.monotonic() < deadline:
        grpo = GRPOArgs(
            num_generations=generations, max_completion_len=completion_len, beta=0.04, reference="base", micro_batch=8
        )
        prompts = [
            [1] + torch.randint(3, args.vocab_size, (prompt_len - 1,), generator=gen).tolist() for _ in range(prompts_n)
        ]

        def score(_, completions):  # any reward with spread: the share of even token ids
            return torch.tensor([[sum(t % 2 == 0 for t in c) / max(len(c), 1)] for c in completions])

        def grpo_step(step: int) -> dict:
            seeds = [derive_seed(step, i) for i in range(prompts_n)]
            started = time.perf_counter()
            with autocast(device):
                rollouts = make_rollouts(model, prompts, score, torch.ones(1), grpo, seeds=seeds, eos_id=None, pad_id=0)
            stats = grpo_update(
                model,
                optimizer,
                rollouts,
                grpo,
                dist.DistInfo(device=device),
                lrs=[5e-6],
                max_grad_norm=0.1,
                autocast=lambda: autocast(device),
                reference=lambda: disable_adapter(model),
            )
            cuda_sync()
            total = time.perf_counter() - started
            return {
                "seconds": total,
                "generation_s": rollouts.generation_seconds,
                "logprob_s": stats["logprob_seconds"],
                "update_s": total - rollouts.generation_seconds - stats["logprob_seconds"],
            }

        grpo_step(0)  # warm-up
        reset_peak()
        timed = grpo_step(1)
        completions = prompts_n * generations
        log.add(
            {
                **common,
                "step": "grpo",
                "prompts": prompts_n,
                "generations": generations,
                "prompt_len": prompt_len,
                "completion_len": completion_len,
                **timed,
                "generated_tokens_per_s": completions * completion_len / timed["generation_s"],
                "peak_memory_gb": peak_memory_gb(),
            }
        )
    # Dropped (not `del`, which the closures above still name) so the HF step below has the memory.
    model = optimizer = None
    if time.monotonic() < deadline:
        hf_sft_step(log, args, batch, length, device, dry_run, repeats)


def hf_sft_step(log: PartLog, args, batch: int, length: int, device, dry_run: bool, repeats: int) -> None:
    """The same SFT step in transformers + peft (dense AdamW, no masks: their best case)."""
    try:
        import peft
        import torch
        import transformers
    except ImportError as error:
        log.note(f"transformers + peft not installed ({error}); no comparison")
        return
    config = transformers.LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_seq_len,
        attn_implementation="sdpa",
    )
    dtype = torch.float32 if dry_run else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # built in place: no fp32 copy on the host first
        model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab_size, (batch, length), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : length // 4] = -100

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak()
    seconds = time_call(step, repeats, warmup=1)
    log.add(
        {
            "step": "sft (transformers+peft)",
            "batch": batch,
            "length": length,
            "seconds": seconds,
            "tokens_per_s": batch * length / seconds,
            "peak_memory_gb": peak_memory_gb(),
            "versions": f"transformers {transformers.__version__}, peft {peft.__version__}",
        }
    )


# ----------------------------------------------------------------------------- part: --fsdp on the device


def run_fsdp(out: str, dry_run: bool, limit: float) -> None:
    import socket

    import torch
    import torch.distributed as torch_dist

    from lorapar.checkpoint import load_model, save_model
    from lorapar.config import ModelArgs
    from lorapar.fsdp import full_adapter, init_sharded_lora, load_sharded_model
    from lorapar.lora import LoraArgs, apply_lora, named_lora_parameters, replace_linears, set_masks
    from lorapar.model import Transformer
    from lorapar.optim import MaskedAdamW

    log = PartLog(os.path.join(out, "fsdp.json"), "fsdp")
    device = torch.device("cpu" if dry_run else "cuda")
    with socket.socket() as probe:  # a free port for the one-rank process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch_dist.init_process_group(
        "gloo" if dry_run else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=256, max_seq_len=128)
        torch.manual_seed(0)
        model = Transformer(args)
        model.init_weights(seed=0)
        ckpt = os.path.join(out, "fsdp-base")
        save_model(model, ckpt)
        base_dtype = torch.float32 if dry_run else torch.bfloat16
        lora = LoraArgs(r=8, alpha=16, init="gaussian")
        plain = load_model(ckpt, device=device, dtype=base_dtype)
        apply_lora(plain, lora)
        gen = torch.Generator().manual_seed(1)
        masks = {key: torch.rand(p.shape, generator=gen) < 0.4 for key, p in named_lora_parameters(plain)}
        ids = torch.randint(3, args.vocab_size, (4, 64), generator=gen).to(device)
        sharded = load_sharded_model(ckpt, base_dtype, device, 0, with_adapter=lambda m: replace_linears(m, lora))
        init_sharded_lora(sharded, lora)
        results = {}
        for name, net in (("plain", plain), ("fsdp", sharded)):
            set_masks(net, masks)
            with full_adapter(net) if name == "fsdp" else contextlib.nullcontext():
                start = {k: p.detach().float().cpu().clone() for k, p in named_lora_parameters(net)}
            optimizer = MaskedAdamW.for_model(net, lr=1e-2, weight_decay=0.1)
            net.train()
            losses = []
            for _ in range(3):
                losses.append(float(masked_sft_step(net, optimizer, ids, ids, device)))
            with full_adapter(net) if name == "fsdp" else contextlib.nullcontext():
                end = {k: p.detach().float().cpu().clone() for k, p in named_lora_parameters(net)}
            frozen = all(torch.equal(end[k][~m], start[k][~m]) for k, m in masks.items())
            results[name] = (losses, end, frozen)
        difference = max(float((results["fsdp"][1][k] - results["plain"][1][k]).abs().max()) for k in masks)
        log.add(
            {
                "base_dtype": str(base_dtype).removeprefix("torch."),
                "backend": torch_dist.get_backend(),
                "losses_plain": results["plain"][0],
                "losses_fsdp": results["fsdp"][0],
                "max_adapter_difference": difference,
                "frozen_unchanged_plain": results["plain"][2],
                "frozen_unchanged_fsdp": results["fsdp"][2],
            }
        )
    finally:
        torch_dist.destroy_process_group()


# ----------------------------------------------------------------------------- the parent


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def summary_markdown(result: dict) -> str:
    lines = [
        f"# GPU suite{' (dry run: CPU, tiny shapes, interpreter)' if result['dry_run'] else ''}",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()),
        "",
    ]
    for part in PARTS:
        data = result["parts"].get(part, {})
        status = data.get("status", "not run")
        lines += [f"## {part} ({status}, {data.get('seconds', 0.0):.0f} s)", ""]
        records = data.get("records", [])
        if part == "tests" and records:
            counts = {o: sum(r["outcome"] == o for r in records) for o in ("passed", "failed", "skipped")}
            lines.append(", ".join(f"{n} {o}" for o, n in counts.items()))
            lines += [""] + [f"- FAILED {r['test']}" for r in records if r["outcome"] == "failed"]
        elif part == "kernels" and records:
            lines += [
                "| tokens | in x out | r | active | path | base ms | fused ms | unfused ms | fused/base "
                "| fused TFLOP/s | fused GB/s |",
                "|" + "---|" * 11,
            ]
            for r in records:
                lines.append(
                    f"| {r['tokens']} | {r['n_in']}x{r['n_out']} | {r['rank']} | {r['active']:.0%} | "
                    f"{r['path']} | {r['base_ms']:.3f} | {r['fused_ms']:.3f} | {r['unfused_ms']:.3f} | "
                    f"{r['fused_over_base']:.2f} | {r['fused_tflops']:.1f} | {r['fused_gbps']:.0f} |"
                )
        elif part == "steps" and records:
            for r in records:
                rate = r.get("tokens_per_s", r.get("generated_tokens_per_s"))
                what = "tokens/s" if "tokens_per_s" in r else "generated tokens/s"
                lines.append(
                    f"- {r['step']}: {r['seconds']:.3f} s, {rate:.0f} {what}, "
                    f"peak {r['peak_memory_gb']:.2f} GB"
                    + (
                        f" (generation {r['generation_s']:.2f} s, log-probs {r['logprob_s']:.2f} s, "
                        f"update {r['update_s']:.2f} s)"
                        if r["step"] == "grpo"
                        else ""
                    )
                )
        elif part == "fsdp" and records:
            r = records[0]
            lines.append(
                f"- {r['backend']}, {r['base_dtype']} base: losses {r['losses_fsdp']} vs "
                f"{r['losses_plain']} without FSDP; adapter difference {r['max_adapter_difference']:.2e}; "
                f"frozen unchanged: {r['frozen_unchanged_fsdp']}"
            )
        lines += [f"- note: {n}" for n in data.get("notes", [])]
        if data.get("error"):
            lines += ["", "```", data["error"][-1500:], "```"]
        lines.append("")
    return "\n".join(lines)


def run_all(out: str, dry_run: bool, parts: tuple[str, ...]) -> dict:
    import torch

    from lorapar.io import atomic_write_json, atomic_write_text

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; run with --dry-run for the CPU rehearsal")
    os.makedirs(out, exist_ok=True)
    limits = DRY_TIME_LIMITS if dry_run else TIME_LIMITS
    result = {"dry_run": dry_run, "environment": environment(), "limits_s": limits, "parts": {}}
    for part in parts:
        env = dict(os.environ)
        if dry_run:
            env["TRITON_INTERPRET"] = "1"  # before any Triton import in the child
            if part == "kernels":  # the interpreted kernels are the dry run's stand-in for the GPU's
                env["LORAPAR_FORCE_TRITON"] = "1"
        started = time.monotonic()
        command = [sys.executable, "-m", "bench.gpu_suite", "--part", part, "--out", out] + (["--dry-run"] * dry_run)
        status, error = "ok", ""
        try:
            child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limits[part])
            if child.returncode != 0:
                status, error = f"exit {child.returncode}", child.stderr[-4000:]
        except subprocess.TimeoutExpired:
            status = f"stopped at its {limits[part]} s limit (partial results kept)"
        part_file = os.path.join(out, f"{part}.json")
        data = json.load(open(part_file, encoding="utf-8")) if os.path.exists(part_file) else {"records": []}
        data.update(status=status, seconds=time.monotonic() - started, error=error)
        result["parts"][part] = data
        atomic_write_json(os.path.join(out, "gpu_suite.json"), result)  # partial results as it goes
    atomic_write_text(os.path.join(out, "summary.md"), summary_markdown(result))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_suite.json, summary.md and each part's JSON")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    ns = parser.parse_args(argv)
    limits = DRY_TIME_LIMITS if ns.dry_run else TIME_LIMITS
    if ns.part:
        runners = {"tests": run_tests, "kernels": run_kernels, "steps": run_steps, "fsdp": run_fsdp}
        runners[ns.part](ns.out, ns.dry_run, limits[ns.part])
        return
    parts = tuple(p for p in ns.parts.split(",") if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; expected among {list(PARTS)}")
    result = run_all(ns.out, ns.dry_run, parts)
    print(summary_markdown(result))
    failed = [p for p, d in result["parts"].items() if d["status"] != "ok"]
    failed += ["tests"] * any(r["outcome"] == "failed" for r in result["parts"].get("tests", {}).get("records", []))
    failed += ["fsdp"] * any(
        not r["frozen_unchanged_fsdp"] or r["max_adapter_difference"] > FSDP_TOLERANCE
        for r in result["parts"].get("fsdp", {}).get("records", [])
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
