"""LoRA-PAR's coordinator: importance of every LoRA element per system, then the stage masks.

    python score.py --ckpt BASE --tokenizer tokenizer.model --data labelled.jsonl --out runs/score \
        [--theta 0.9 --alpha 1 --beta 1 --rank 8 --lora-alpha 64 --targets q,k,v,gate,up,down \
         --init gaussian --seed 0 --samples 100 --random-baseline]   (--init pissa [--pissa-niter N]: PiSSA)
    torchrun --nproc_per_node=N score.py ...        (each rank scores a share; the sums are all-reduced)
    torchrun --nproc_per_node=N score.py --fsdp ... (the base sharded; each rank keeps its rows of the sums,
                                                     the whole scores are gathered to rank 0 once)

Writes into --out (each file atomically; report.json last, so its presence means the run finished):
  config.json             the resolved configuration
  adapter_init/           the exact adapter that was scored, in peft's layout (for pissa/olora with the init
                          factors of the residual base): train_sft.py --init-adapter OUT/adapter_init trains it
  importance.safetensors  raw scores, "system1.<peft_key>" and "system2.<peft_key>"
  masks.safetensors       stage masks "stage1.<peft_key>" / "stage2.<peft_key>" (lorapar.masks.load_masks)
  random_masks.safetensors  with --random-baseline: random stage masks of the same sizes and stage overlap,
                          drawn over the whole adapter (--random-scope per_tensor: each tensor's counts)
  report.json             region counts and fractions in total, per layer, per module, per A/B; overlap;
                          active share per stage; what was scored per system (the 1-based lines of --data
                          sampled) and the seed
  importance.png          S1 vs S2 importance on log axes by region (when matplotlib is installed)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from typing import Optional

import torch

from lorapar import dist, fsdp, fsdp_scoring, runlock
from lorapar.adapter import adapter_fingerprint, save_adapter
from lorapar.config import add_dataclass_args, dataclass_from_args, save_config
from lorapar.data import load_examples
from lorapar.errors import run_main
from lorapar.importance import ImportanceArgs, encode_for_scoring, score_rows, select_examples
from lorapar.io import atomic_path, atomic_save_safetensors, atomic_write_json
from lorapar.launch import load_base_model
from lorapar.lora import LoraArgs, apply_lora, lora_modules
from lorapar.masks import save_masks
from lorapar.partition import (
    Partition,
    PartitionArgs,
    partition,
    partition_report,
    random_stage_masks,
    stage_overlap,
)
from lorapar.run import claim_out_dir
from lorapar.script_args import ScoreArgs
from lorapar.tokenizer import Tokenizer

ADAPTER_INIT_DIR = "adapter_init"  # the scored adapter, which train_sft.py --init-adapter starts from
OUTPUTS = (
    "config.json",
    ADAPTER_INIT_DIR,
    "importance.safetensors",
    "masks.safetensors",
    "random_masks.safetensors",
    "report.json",
    "importance.png",
)
PLOT_POINTS = 20_000


def parse_config(argv=None) -> tuple[ScoreArgs, ImportanceArgs, PartitionArgs]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for cls in (ScoreArgs, ImportanceArgs, PartitionArgs):
        add_dataclass_args(parser, cls)
    ns = parser.parse_args(argv)
    try:
        configs = tuple(dataclass_from_args(cls, ns) for cls in (ScoreArgs, ImportanceArgs, PartitionArgs))
    except ValueError as error:
        parser.error(str(error))
    for name in ("ckpt", "tokenizer", "data", "out"):
        if not getattr(configs[0], name):
            parser.error(f"--{name} is required")
    return configs


def prepare_out_dir(cfg: ScoreArgs, info: dist.DistInfo) -> None:
    """Lock --out and refuse to replace earlier results without --overwrite (rank 0 decides, every rank raises).

    Nothing is deleted here: `clear_old_outputs` removes the old results once the new ones are computed."""

    def refuse_earlier_results() -> None:
        existing = [name for name in OUTPUTS if os.path.exists(os.path.join(cfg.out, name))]
        if existing and not cfg.overwrite:
            raise FileExistsError(
                f"{cfg.out} already holds results ({', '.join(existing)}); pass --overwrite to replace them"
            )

    claim_out_dir(cfg.out, info, refuse_earlier_results)


def clear_old_outputs(cfg: ScoreArgs) -> None:
    """--overwrite, once the new scores exist: remove what an earlier scoring run wrote (never unrelated files)."""
    for name in OUTPUTS:
        path = os.path.join(cfg.out, name)
        if os.path.isdir(path):  # adapter_init/
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def score_systems(model, tokenizer, examples, args: ImportanceArgs, data: str, info: dist.DistInfo, scorer=score_rows):
    """({1: scores, 2: scores}, {"system1": stats, "system2": stats}) for the examples labelled 1 and 2
    (scorer: importance.score_rows, or fsdp_scoring.score_rows_sharded under --fsdp, whose scores are on rank 0
    only)."""
    for system in (1, 2):
        if not any(e.system == system for e in examples):
            unlabelled = sum(e.system is None for e in examples)
            raise ValueError(
                f"{data}: no System-{system} rows among {len(examples)} ({unlabelled} without a 'system' label); "
                "scoring needs examples of both systems"
            )
    scores, stats = {}, {}
    for system in (1, 2):
        chosen, available = select_examples(examples, system, args.samples, args.seed)
        encoded = encode_for_scoring(chosen, tokenizer, args)
        if not encoded.rows:
            raise ValueError(
                f"{data}: none of the {len(chosen)} System-{system} examples keeps an answer token within --max-len "
                f"{args.max_len}"
            )
        scores[system], moments = scorer(model, encoded.rows, args.order, info, f"system {system}", args.batch_size)
        stats[f"system{system}"] = dict(
            available=available,
            selected=len(chosen),
            scored=moments.count,
            lines=[e.line for e in chosen],
            answer_tokens=moments.tokens,
            truncated=encoded.truncated,
            no_answer_tokens=encoded.no_answer_tokens,
        )
        if len(chosen) < args.samples and info.is_main:
            print(
                f"system {system}: only {available} examples in {data}; scored {moments.count} (asked for "
                f"{args.samples})"
            )
    return scores, stats


def plot_importance(path: str, p: Partition, scores1: dict, scores2: dict, seed: int) -> Optional[str]:
    """The paper's scatter of S1 vs S2 importance per element, coloured by region; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x1, x2 = p.layout.flatten(scores1, "system 1"), p.layout.flatten(scores2, "system 2")
    picked = torch.randperm(x1.numel(), generator=torch.Generator().manual_seed(seed))[:PLOT_POINTS]
    floor = float(torch.cat([x1[x1 > 0], x2[x2 > 0]]).min())  # zeros drawn at the smallest positive score
    fig, ax = plt.subplots(figsize=(6, 6))
    for region, colour in (
        ("neither", "0.75"),
        ("system1_only", "tab:blue"),
        ("system2_only", "tab:red"),
        ("shared", "tab:purple"),
    ):
        chosen = picked[p.region(region)[picked]]
        ax.scatter(
            x1[chosen].clamp_min(floor), x2[chosen].clamp_min(floor), s=2, c=colour, label=region.replace("_", " ")
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="System-1 importance",
        ylabel="System-2 importance",
        title=f"LoRA element importance ({picked.numel():,} of {x1.numel():,} elements)",
    )
    ax.legend(markerscale=4)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return os.path.basename(path)


def save_adapter_init(model, lora_args: LoraArgs, directory: str) -> dict:
    """The scored adapter, in peft's layout (for pissa/olora with its init factors, from which the
    residual base is rebuilt exactly), written into a temporary directory renamed into place.
    Returns what train_sft.py --init-adapter checks: the base dtype and the weights' sha256."""
    base_dtype = str(next(iter(lora_modules(model).values())).weight.dtype).removeprefix("torch.")
    tmp = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, lora_args, metadata={"base_dtype": base_dtype})
    os.replace(tmp, directory)
    return {"base_dtype": base_dtype, "sha256": adapter_fingerprint(directory)}


def write_outputs(
    cfg: ScoreArgs, importance: ImportanceArgs, part: PartitionArgs, scores: dict, stats: dict, model
) -> dict:
    out = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    save_config(out("config.json"), cfg, importance, part)
    # Scoring read the adapter and never wrote it: these are the values every score was taken at.
    adapter_init = save_adapter_init(model, importance.lora_args(), out(ADAPTER_INIT_DIR))
    stamp = {"adapter_init_sha256": adapter_init["sha256"]}  # the masks rank the elements of this adapter
    atomic_save_safetensors(
        out("importance.safetensors"),
        {f"system{s}.{key}": value for s in (1, 2) for key, value in scores[s].items()},
        metadata={"order": importance.order, **{f"{k}_scored": str(v["scored"]) for k, v in stats.items()}},
    )
    p = partition(scores[1], scores[2], part)
    stage_masks = p.stage_masks()
    save_masks(out("masks.safetensors"), stage_masks, metadata=stamp)
    files = ["config.json", ADAPTER_INIT_DIR, "importance.safetensors", "masks.safetensors"]
    random_baseline = None
    if cfg.random_baseline:
        random_masks = random_stage_masks(stage_masks, importance.seed, cfg.random_scope)
        random_baseline = {
            "file": "random_masks.safetensors",
            "scope": cfg.random_scope,
            "seed": importance.seed,
            "counts": stage_overlap(random_masks),
            "importance_counts": stage_overlap(stage_masks),
        }
        save_masks(
            out("random_masks.safetensors"),
            random_masks,
            metadata={"random_scope": cfg.random_scope, "seed": str(importance.seed), **stamp},
        )
        files.append("random_masks.safetensors")
    plot = plot_importance(out("importance.png"), p, scores[1], scores[2], importance.seed)
    if plot is None:
        print("importance.png not drawn: matplotlib is not installed")
    else:
        files.append(plot)
    report = {
        "partition": partition_report(p),
        "scoring": stats,
        "files": files + ["report.json"],
        "data": cfg.data,
        "seed": importance.seed,
        "adapter_init": {"dir": ADAPTER_INIT_DIR, "init": importance.init, "seed": importance.seed, **adapter_init},
        "random_baseline": random_baseline or "not drawn: pass --random-baseline",
        "plot": plot or "not drawn: matplotlib is not installed",
    }
    atomic_write_json(out("report.json"), report)
    return report


def run_scoring(
    cfg: ScoreArgs, importance: ImportanceArgs = ImportanceArgs(), part: PartitionArgs = PartitionArgs()
) -> dict:
    """Score, partition and write everything into cfg.out; returns {"out", "report"} (report on rank 0)."""
    info = dist.init_distributed(cfg.device)
    prepare_out_dir(cfg, info)
    examples = load_examples(cfg.data, cfg.format, skip_bad=cfg.skip_bad)
    tokenizer = Tokenizer(cfg.tokenizer)
    if cfg.fsdp:  # the base sharded over the ranks, each reading only its rows (lorapar/fsdp.py)
        model, _, _ = fsdp.build_lora_model(
            cfg.ckpt, cfg.base_dtype, "", None, importance.lora_args(), info, tokenizer.vocab_size
        )
        scorer = fsdp_scoring.score_rows_sharded
    else:
        model = load_base_model(cfg.ckpt, cfg.base_dtype, info.device, tokenizer.vocab_size)
        apply_lora(model, importance.lora_args())  # the same seed gives every rank the same adapter
        scorer = score_rows
    scores, stats = score_systems(model, tokenizer, examples, importance, cfg.data, info, scorer)
    if info.is_main:
        clear_old_outputs(cfg)
    with fsdp.full_adapter(model) if cfg.fsdp else contextlib.nullcontext():  # adapter_init/ is the whole adapter
        report = write_outputs(cfg, importance, part, scores, stats, model) if info.is_main else None
    dist.barrier(info)
    runlock.release(cfg.out)
    return {"out": cfg.out, "report": report}


def main(argv=None) -> dict:
    result = run_scoring(*parse_config(argv))
    if result["report"] is not None:
        active = result["report"]["partition"]["active_fraction"]
        print(
            f"wrote {result['out']}: stage 1 trains {active['stage1']:.1%}, stage 2 trains {active['stage2']:.1%} of "
            "the adapter"
        )
    return result


if __name__ == "__main__":
    run_main(main, cleanup=dist.shutdown)
