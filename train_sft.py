"""Masked LoRA supervised fine-tuning: LoRA-PAR's stage 1 (System-1 data, stage-1 element mask).

    python train_sft.py --ckpt BASE --tokenizer tokenizer.model --data train.jsonl --out runs/sft \
        [--system 1] [--init-adapter runs/score/adapter_init --masks runs/score/masks.safetensors --stage 1] \
        [--preset lorapar-sft]
    python train_sft.py --preset dmlora ...                   (DM-LoRA, the supplement's recipe)
    torchrun --nproc_per_node=8 train_sft.py ...              (gloo on CPU, NCCL on CUDA)

Reads top to bottom: configuration -> distributed init -> data -> model and adapter -> optimizer ->
training loop -> save. With --init-adapter the adapter is the one score.py scored (its tensors and,
for pissa/olora, the residual base rebuilt from its init factors), so the stage mask ranks the
elements that train. The loss of an optimizer step is the sum of answer-token negative
log-likelihoods over all its micro-batches and ranks divided by their total answer-token count (counted
and all-reduced before the forward passes), so the update does not depend on how the step is split.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from lorapar import dist, fsdp
from lorapar.adapter import ADAPTER_WEIGHTS, adapter_fingerprint, read_adapter_args, safetensors_metadata
from lorapar.batching import LengthGroupedSampler, SFTDataset, collate
from lorapar.config import add_dataclass_args
from lorapar.data import load_examples
from lorapar.dmlora.args import DualArgs  # the --dual-* flags; the rest of DM-LoRA loads with --adapter dual
from lorapar.errors import FlagError, run_main
from lorapar.launch import (
    finish_run,
    from_preset,
    load_base_model,
    load_lora_model,
    script_parser,
    select_system,
    start_run,
)
from lorapar.lora import LoraArgs
from lorapar.lora_names import resolve_targets
from lorapar.lora_settings import add_lora_flags, lora_args_from_flags, lora_flags_given
from lorapar.loss import IGNORE_INDEX, answer_nll
from lorapar.model import eval_mode
from lorapar.optim import lr_at, optimizer_step
from lorapar.precision import autocast, resolve_base_dtype
from lorapar.run import prepare_run_dir, seed_everything
from lorapar.script_args import SFT_PRESETS as PRESETS
from lorapar.script_args import SFTArgs, TrainArgs, require_inputs, resolve_grad_accum
from lorapar.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lorapar.dmlora.training import DualTraining


def parse_config(argv=None) -> tuple[SFTArgs, TrainArgs, Union[LoraArgs, DualArgs]]:
    parser = script_parser(__doc__, PRESETS)
    add_dataclass_args(parser, SFTArgs)
    add_dataclass_args(parser, TrainArgs)
    add_lora_flags(parser)
    add_dataclass_args(parser, DualArgs, skip=("dual_seed",))
    ns = parser.parse_args(argv)
    preset = PRESETS.get(ns.preset, {})
    sft, train = from_preset(SFTArgs, ns, preset), from_preset(TrainArgs, ns, preset)
    preset_adapter = preset.get("SFTArgs", {}).get("adapter", sft.adapter)
    if preset_adapter != sft.adapter:
        parser.error(f"--preset {ns.preset} is for --adapter {preset_adapter}, not --adapter {sft.adapter}")
    if sft.adapter == "lora":  # seeds: --seed
        stray = [
            f.name for f in dataclasses.fields(DualArgs) if f.name != "dual_seed" and getattr(ns, f.name) is not None
        ]
        unused = "DualArgs"
    else:
        stray, unused = [flag for flag, _ in lora_flags_given(ns).values()], "LoRA"
    if stray:
        parser.error(f"--adapter {sft.adapter} does not use {unused} flag(s) {stray}")
    if sft.adapter == "dual":
        if sft.init_adapter:
            parser.error(f"--init-adapter {sft.init_adapter} is a LoRA adapter; --adapter dual initialises its own")
        lora = from_preset(DualArgs, ns, preset, dual_seed=train.seed)
    elif sft.init_adapter:
        try:
            lora = init_adapter_args(ns, sft.init_adapter)
        except (OSError, KeyError, ValueError) as error:
            parser.error(str(error))
    else:
        lora = lora_args_from_flags(ns, seed=train.seed)
    require_inputs(parser, sft)
    return sft, train, lora


# The LoraArgs that decide the adapter's values (its shape and how it was drawn): all but the dropout, a
# training setting that may be given, and the seed, the adapter's own (--seed seeds the data here).
INIT_FIELDS = tuple(f.name for f in dataclasses.fields(LoraArgs) if f.name not in ("dropout", "seed"))


def init_adapter_args(ns: argparse.Namespace, adapter_dir: str) -> LoraArgs:
    """The LoraArgs of --init-adapter; an explicit flag that disagrees with the adapter is an error
    naming both values. Only the dropout (a training setting, not a value of the adapter) may be set;
    the LoRA seed stays the adapter's own (the one it was drawn with), --seed still seeds the data."""
    stored = read_adapter_args(adapter_dir)
    given = lora_flags_given(ns)
    for name in (n for n in INIT_FIELDS if n in given):
        (flag, value), have = given[name], getattr(stored, name)
        same = resolve_targets(value) == resolve_targets(have) if name == "targets" else value == have
        if not same:
            shown = ",".join(value) if name == "targets" else value
            raise ValueError(
                f"{flag} {shown} conflicts with the adapter in --init-adapter {adapter_dir}, "
                f"which has {name}={have!r}; drop the flag (the adapter's configuration is used)"
            )
    return dataclasses.replace(stored, dropout=stored.dropout if ns.dropout is None else ns.dropout)


def check_init_adapter(cfg: SFTArgs, lora_args: LoraArgs, base_dtype: torch.dtype) -> None:
    """Before anything is written: --masks ranked on another adapter than --init-adapter are refused
    (score.py stamps its masks with the sha256 of the adapter it scored), and a pissa/olora adapter
    trains over a base of the dtype it was scored in (its residual base W0 - s B0 A0 is formed in it)."""
    if cfg.masks:
        stamped = safetensors_metadata(cfg.masks, "a masks file (safetensors)").get("adapter_init_sha256")
        actual = adapter_fingerprint(cfg.init_adapter)
        if stamped is not None and stamped != actual:
            raise ValueError(
                f"--masks {cfg.masks} ranks the elements of another adapter than --init-adapter "
                f"{cfg.init_adapter} (sha256 {stamped[:12]}... vs {actual[:12]}...); "
                "pass the adapter_init/ of the score.py run that wrote the masks"
            )
    if lora_args.init in ("pissa", "olora"):
        weights = os.path.join(cfg.init_adapter, ADAPTER_WEIGHTS)
        scored_in = safetensors_metadata(weights).get("base_dtype")
        training_in = str(base_dtype).removeprefix("torch.")
        if scored_in is not None and scored_in != training_in:
            raise ValueError(
                f"--init-adapter {cfg.init_adapter} was scored over a {scored_in} base, this run's "
                f"base is {training_in} (--base-dtype {cfg.base_dtype}); its {lora_args.init} residual "
                f"base would differ: pass --base-dtype {scored_in}"
            )


def build_model(
    cfg: SFTArgs, lora_args: Union[LoraArgs, DualArgs], train: TrainArgs, info: dist.DistInfo, vocab_size: int
) -> tuple[torch.nn.Module, Callable[[str], None], Optional[DualTraining]]:
    """The frozen base with the adapter (--adapter) on it and the masks installed; returns the model,
    save(directory) and, for --adapter dual, DM-LoRA's training hooks (regulariser, screening, resume).

    One place per adapter type, so another adapter plugs in here.
    """
    if cfg.adapter == "dual":
        if train.fsdp:
            raise FlagError("--fsdp supports --adapter lora only (DM-LoRA's screening reads whole tensors)")
        if cfg.masks:
            raise ValueError("--masks holds LoRA-PAR element masks; --adapter dual prunes its own expert components")
        model = load_base_model(cfg.ckpt, cfg.base_dtype, info.device, vocab_size)
        from lorapar.dmlora.training import DualTraining

        dual = DualTraining(model, lora_args)
        return model, dual.save, dual
    # --init-adapter: the very tensors score.py scored (and, for pissa/olora, its residual base)
    model, _, save_files = load_lora_model(cfg, lora_args, cfg.init_adapter, info, vocab_size, train.fsdp)
    return model, save_files, None


def load_sft_data(cfg: SFTArgs, tokenizer: Tokenizer, seed: int) -> tuple[SFTDataset, Optional[SFTDataset]]:
    examples = load_examples(cfg.data, cfg.format, skip_bad=cfg.skip_bad)
    read = len(examples)
    examples = select_system(examples, cfg.system, cfg.data)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    held_out = []
    if cfg.eval_fraction:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, round(cfg.eval_fraction * len(examples)))
        held_out = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    if cfg.eval_data:
        held_out = load_examples(cfg.eval_data, cfg.format, skip_bad=cfg.skip_bad)
    train_set = SFTDataset(examples, tokenizer, cfg.template, cfg.max_len, cfg.overflow)
    if len(train_set) == 0:
        raise ValueError(
            f"{cfg.data}: no training example left ({read} read, {len(examples)} after filtering, "
            f"{train_set.dropped} longer than --max-len {cfg.max_len})"
        )
    eval_set = SFTDataset(held_out, tokenizer, cfg.template, cfg.max_len, cfg.overflow) if held_out else None
    return train_set, eval_set


def count_answer_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    model, dataset: SFTDataset, batch_size: int, pad_id: int, info: dist.DistInfo, sharded: bool = False
) -> float:
    """Mean answer-token NLL of `dataset` (each rank takes every world_size-th example; `sharded`: under
    FSDP, whose ranks must run the same number of forwards, see fsdp.lockstep)."""
    totals = torch.zeros(2, dtype=torch.float64)
    indices = list(range(info.rank, len(dataset), info.world_size))
    with eval_mode(model), fsdp.lockstep(model, info, enabled=sharded):
        for start in range(0, len(indices), batch_size):
            batch = collate([dataset[i] for i in indices[start : start + batch_size]], pad_id)
            with autocast(info.device):
                nll, n = answer_nll(model, batch["input_ids"].to(info.device), batch["labels"].to(info.device))
            totals += torch.tensor([nll.item(), n], dtype=torch.float64)
    nll, n = dist.all_reduce_sum(totals, info).tolist()
    return nll / max(n, 1.0)


def epoch_sampler(cfg, train, info, train_set, per_rank_step: int) -> tuple[LengthGroupedSampler, int]:
    """The sampler dealing each global batch of per_rank_step x ranks examples over the ranks, and the optimizer
    steps of one epoch (at least one, or the error names the data)."""
    sampler = LengthGroupedSampler(train_set.lengths, per_rank_step, info.world_size, info.rank, seed=train.seed)
    steps_per_epoch = len(sampler) // per_rank_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data}: {len(train_set)} examples do not fill one optimizer step of "
            f"{per_rank_step * info.world_size} (batch size x grad accum x ranks)"
        )
    return sampler, steps_per_epoch


def start_sft_run(cfg, train, lora_args, info, tokenizer, train_set, resume_from, grad_accum, total_steps, epoch_steps):
    """(model, run, DM-LoRA training or None): the model with its adapter (build_model), then
    lorapar.launch.start_run (optimizer, resume, metrics, checkpoints)."""
    model, save_files, dual = build_model(cfg, lora_args, train, info, tokenizer.vocab_size)
    if cfg.max_len > model.args.max_seq_len:  # past the context the positions are ones the base never saw
        raise FlagError(f"--max-len {cfg.max_len}: above the context of {cfg.ckpt} ({model.args.max_seq_len} tokens)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    unused = len(train_set) - epoch_steps * train.batch_size * grad_accum * info.world_size
    run = start_run(
        model,
        train,
        info,
        resume_from,
        (cfg, train, lora_args),
        save_files,
        total_steps,
        epoch_steps,
        first_record={
            "examples": len(train_set),
            "dropped_over_max_len": train_set.dropped,
            "truncated": train_set.truncated,
            "unused_per_epoch": max(0, unused),
        },
        extra={"grad_accum": grad_accum},
        desc="sft",
        adapter_hooks=dual,
    )
    return model, run, dual


def main(argv=None) -> dict:
    cfg, train, lora_args = parse_config(argv)
    info = dist.init_distributed(train.device)
    if cfg.init_adapter:
        check_init_adapter(cfg, lora_args, resolve_base_dtype(cfg.base_dtype, info.device))
    grad_accum = resolve_grad_accum(train, info.world_size)
    resume_from = prepare_run_dir(train, info)
    seed_everything(train.seed)

    # ---- data: every rank reads the whole file; the sampler deals each global batch over the ranks
    tokenizer = Tokenizer(cfg.tokenizer)
    train_set, eval_set = load_sft_data(cfg, tokenizer, train.seed)
    per_rank_step = train.batch_size * grad_accum
    sampler, steps_per_epoch = epoch_sampler(cfg, train, info, train_set, per_rank_step)
    total_steps = train.max_steps or train.epochs * steps_per_epoch

    # ---- model and adapter; optimizer, resume, metrics and checkpoints (lorapar/launch.py)
    model, run, dual = start_sft_run(
        cfg, train, lora_args, info, tokenizer, train_set, resume_from, grad_accum, total_steps, steps_per_epoch
    )

    # ---- training loop
    model.train()
    epoch_order: tuple[int, list[int]] = (-1, [])
    loss_value = float("nan")
    for step in range(run.start_step, run.last_step):
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if epoch_order[0] != epoch:
            sampler.set_epoch(epoch)
            epoch_order = (epoch, list(sampler))
        mine = epoch_order[1][position * per_rank_step : (position + 1) * per_rank_step]
        micro_batches = [
            collate([train_set[i] for i in mine[k : k + train.batch_size]], tokenizer.pad_id)
            for k in range(0, len(mine), train.batch_size)
        ]
        local_tokens = sum(count_answer_tokens(b["labels"]) for b in micro_batches)
        step_tokens = dist.all_reduce_sum(torch.tensor(float(local_tokens), dtype=torch.float64), info).item()
        nll_sum = 0.0
        for batch in micro_batches:
            with autocast(info.device):
                nll, _ = answer_nll(model, batch["input_ids"].to(info.device), batch["labels"].to(info.device))
            (nll / step_tokens).backward()
            nll_sum += nll.item()
        if dual is not None:
            (dual.regulariser() / info.world_size).backward()  # the all-reduce below sums the ranks' copies
        lr = lr_at(step, total_steps, train)
        grad_norm = optimizer_step(
            run.optimizer, run.params, info, lr=lr, max_grad_norm=train.max_grad_norm, zero_grad=dual is None
        )
        dual_record = {}
        if dual is not None:
            dual_record = dual.after_step(step + 1)  # reads this step's gradients, then releases them
            run.optimizer.zero_grad(set_to_none=True)
        loss_value = dist.all_reduce_sum(torch.tensor(nll_sum, dtype=torch.float64), info).item() / step_tokens
        done = step + 1
        record = {
            "step": done,
            "epoch": epoch,
            "lr": lr,
            "loss": loss_value,
            "answer_tokens": int(step_tokens),
            "seconds": time.perf_counter() - started,
            **dual_record,
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if eval_set is not None and (done == total_steps or (train.eval_every and done % train.eval_every == 0)):
            record["eval_loss"] = evaluate(model, eval_set, train.batch_size, tokenizer.pad_id, info, train.fsdp)
        run.end_step(record, force_log="eval_loss" in record, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

    # ---- save the final adapter beside the run's config (rank 0)
    finished = finish_run(run, model)
    return {"out": train.out, "steps": run.last_step, "finished": finished, "loss": loss_value}


if __name__ == "__main__":
    run_main(main, cleanup=dist.shutdown)
