"""Per-rank resident memory of an FSDP2-sharded base on the CPU (gloo) for 1, 2 and 4 ranks.

The ~100M LLaMA (ModelArgs.from_name("llama-100m"), random weights, fp32) is written once as a Hugging
Face safetensors directory; each run spawns N ranks that build it with lorapar.fsdp.load_sharded_model
(meta device, each rank reading only its rows) plus a LoRA r 8 adapter, then run one SFT step (forward,
backward, MaskedAdamW) on a short batch, then score.py's importance accumulation (fsdp.score_rows_sharded)
over one row per rank. Per rank it reports the base bytes it holds, the anonymous resident set (the
process's own tensors; file pages of the memory-mapped checkpoint are counted apart as RssFile) after
loading, the peak in the step, and the importance moments it holds (sum g and sum g^2 of its rows).

    python bench/bench_fsdp_memory.py [--ranks 1,2,4] [--tokens 64]

The machine this was written on has 2 cores shared with others: 4 ranks oversubscribe it, so read the
memory columns, not the time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorapar.checkpoint import save_model  # noqa: E402
from lorapar.config import ModelArgs  # noqa: E402
from lorapar.lora import LoraArgs, apply_lora, named_lora_parameters  # noqa: E402
from lorapar.model import Transformer  # noqa: E402


def status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs), so the peak counts from here."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")


def rank_main(rank: int, world: int, store: str, ckpt: str, tokens: int, results) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from lorapar.dist import DistInfo
        from lorapar.fsdp import init_sharded_lora, load_sharded_model, score_rows_sharded
        from lorapar.lora import LoraArgs, replace_linears
        from lorapar.loss import answer_nll
        from lorapar.optim import MaskedAdamW

        lora = LoraArgs(r=8, init="gaussian")
        before = status_kb("RssAnon")
        model = load_sharded_model(
            ckpt, torch.float32, torch.device("cpu"), 0, with_adapter=lambda m: replace_linears(m, lora)
        )
        init_sharded_lora(model, lora)
        base_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        loaded = status_kb("RssAnon") - before
        file_pages = status_kb("RssFile")
        optimizer = MaskedAdamW.for_model(model, lr=1e-4)
        reset_peak()
        ids = torch.randint(3, model.args.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        model.train()
        nll, n = answer_nll(model, ids, ids)
        (nll / n).backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        peak = status_kb("VmHWM") / 1024
        rows = [(ids[0].tolist(), ids[0].tolist())] * world  # one scored row per rank
        _, moments = score_rows_sharded(model, rows, info=DistInfo(rank=rank, world_size=world))
        moment_bytes = (moments.sum_grad.numel() + moments.sum_grad_sq.numel()) * moments.sum_grad.element_size()
        results.put((rank, base_bytes / 2**20, loaded / 1024, file_pages / 1024, peak, moment_bytes / 2**20))
    finally:
        torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_args = ModelArgs.from_name("llama-100m")
        model = Transformer(model_args)
        model.init_weights(seed=0)
        ckpt = os.path.join(tmp, "llama-100m")
        save_model(model, ckpt)
        n_params = model.num_params()
        total_mb = n_params * 4 / 2**20
        apply_lora(model, LoraArgs(r=8))
        moments_mb = 2 * sum(p.numel() for _, p in named_lora_parameters(model)) * 4 / 2**20  # sum g, sum g^2
        del model
        print(
            f"llama-100m: {n_params / 1e6:.0f}M parameters, {total_mb:.0f} MiB in fp32; "
            f"LoRA r 8 on q,k,v,gate,up,down; one step of {args.tokens} tokens; "
            f"importance moments of the whole adapter {moments_mb:.2f} MiB"
        )
        print(
            f"{'ranks':>5} {'rank':>4} {'base MiB held':>13} {'base/total':>10} {'RssAnon after load':>18} "
            f"{'RssFile':>8} {'VmHWM in step':>13} {'moments MiB':>11} {'moments/whole':>13}"
        )
        context = mp.get_context("spawn")
        for world in (int(r) for r in args.ranks.split(",")):
            results = context.SimpleQueue()
            store = os.path.join(tmp, f"store-{world}")
            mp.spawn(rank_main, args=(world, store, ckpt, args.tokens, results), nprocs=world, join=True)
            for rank, base, loaded, file_pages, peak, moments in sorted(results.get() for _ in range(world)):
                print(
                    f"{world:5d} {rank:4d} {base:13.1f} {base / total_mb:10.3f} {loaded:16.0f} M {file_pages:6.0f} M "
                    f"{peak:11.0f} M {moments:11.2f} {moments / moments_mb:13.3f}"
                )


if __name__ == "__main__":
    main()
