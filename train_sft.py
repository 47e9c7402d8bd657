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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from tqdm import tqdm

from lorapar import dist, fsdp, fsdp_checkpoint, runlock
from lorapar.adapter import ADAPTER_WEIGHTS, adapter_fingerprint, load_adapter, read_adapter_args, safetensors_metadata
from lorapar.config import add_dataclass_args, config_to_dict, dataclass_from_args, field, save_config
from lorapar.batching import LengthGroupedSampler, SFTDataset, collate
from lorapar.data import load_examples
from lorapar.dmlora.args import DualArgs  # the --dual-* flags; the rest of DM-LoRA loads with --adapter dual
from lorapar.errors import FlagError, check_fields, run_main
from lorapar.lora import LoraArgs, apply_lora
from lorapar.lora_names import resolve_targets
from lorapar.loss import IGNORE_INDEX, answer_nll
from lorapar.masks import MaskedAdamW
from lorapar.model import eval_mode
from lorapar.tokenizer import Tokenizer
from lorapar.trainer import (
    InputArgs, MetricsLog, TrainArgs, add_lora_flags, autocast, check_finite, clear_previous_run, install_masks,
    load_base_model, lora_file_writer, lr_at, make_checkpointer, prepare_run_dir, require_inputs, resolve_base_dtype,
    resolve_grad_accum, restore_training_state, seed_everything, select_system, set_lr,
)

if TYPE_CHECKING:
    from lorapar.dmlora.training import DualTraining


@dataclass
class SFTArgs(InputArgs):
    adapter: str = field(
        default="lora", metadata={"choices": ["lora", "dual"], "help": "adapter type (dual: DM-LoRA, flags --dual-*)"}
    )
    init_adapter: str = field(default="", metadata={
        "help": "start from this LoRA adapter bit for bit (score.py's OUT/adapter_init); "
                "rank, alpha, targets and init come from it"
    })  # fmt: skip
    max_len: int = 512
    overflow: str = field(default="drop", metadata={"choices": ["drop", "truncate"], "help": "examples over --max-len"})
    eval_data: str = field(default="", metadata={"help": "held-out file for the eval loss (same format)"})
    eval_fraction: float = field(default=0.0, metadata={"help": "or hold out this share of --data (0 = none)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("max_len",))
        if not 0 <= self.eval_fraction < 1:
            raise FlagError(f"--eval-fraction {self.eval_fraction}: expected a share in [0, 1)")


PRESETS = {
    # LoRA-PAR's SFT: lr 2e-4, cosine, warm-up 0.03, effective batch 32, max length 512, one epoch;
    # example.py's text format: question + EOS, then the answer as written + EOS.
    "lorapar-sft": {
        "TrainArgs": dict(lr=2e-4, schedule="cosine", warmup_ratio=0.03, global_batch=32, batch_size=4, epochs=1),
        "SFTArgs": dict(max_len=512, template="lorapar"),
    },
    # DM-LoRA's supplement (train.sh, code task): lr 1e-5, cosine, warm-up 0.03, no weight decay, batch 4 x 16 = 64,
    # max length 380 (the tokenizer truncates), one epoch, the Alpaca prompt; r 128 = 32 shared + 96 expert,
    # alpha 128, target rank 80, pruning from step 235 to 1562 - 780 of 1562 (as fractions), delta T 10,
    # lambda 0.1, beta 0.85 / 0.85.
    "dmlora": {
        "TrainArgs": dict(lr=1e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, global_batch=64,
                          batch_size=4, epochs=1),
        "SFTArgs": dict(adapter="dual", max_len=380, overflow="truncate", template="alpaca"),
        "DualArgs": dict(dual_rank=128, dual_shared_rank=32, dual_alpha=128.0, dual_dropout=0.0, dual_target_rank=80.0,
                         dual_t_init=235 / 1562, dual_t_final=780 / 1562, dual_delta_t=10, dual_orth_lambda=0.1,
                         dual_beta1=0.85, dual_beta2=0.85, dual_budget_power=2.0, dual_pruning="regrow"),
    },
}


def parse_config(argv=None) -> tuple[SFTArgs, TrainArgs, Union[LoraArgs, DualArgs]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="paper hyper-parameters")
    add_dataclass_args(parser, SFTArgs)
    add_dataclass_args(parser, TrainArgs)
    add_lora_flags(parser)
    add_dataclass_args(parser, DualArgs, skip=("dual_seed",))
    ns = parser.parse_args(argv)
    preset = PRESETS.get(ns.preset, {})
    sft = dataclass_from_args(SFTArgs, ns, SFTArgs(**preset.get("SFTArgs", {})))
    train = dataclass_from_args(TrainArgs, ns, TrainArgs(**preset.get("TrainArgs", {})))
    preset_adapter = preset.get("SFTArgs", {}).get("adapter", sft.adapter)
    if preset_adapter != sft.adapter:
        parser.error(f"--preset {ns.preset} is for --adapter {preset_adapter}, not --adapter {sft.adapter}")
    unused = DualArgs if sft.adapter == "lora" else LoraArgs
    stray = [f.name for f in dataclasses.fields(unused)
             if f.name not in ("seed", "dual_seed") and getattr(ns, f.name, None) is not None]  # seeds: --seed
    if stray:
        parser.error(f"--adapter {sft.adapter} does not use {unused.__name__} flag(s) {stray}")
    if sft.adapter == "dual":
        if sft.init_adapter:
            parser.error(f"--init-adapter {sft.init_adapter} is a LoRA adapter; --adapter dual initialises its own")
        lora = dataclass_from_args(DualArgs, ns, DualArgs(**preset.get("DualArgs", {}), dual_seed=train.seed))
    elif sft.init_adapter:
        try:
            lora = init_adapter_args(ns, sft.init_adapter)
        except (OSError, KeyError, ValueError) as error:
            parser.error(str(error))
    else:
        lora = dataclass_from_args(LoraArgs, ns, LoraArgs(seed=train.seed))
    require_inputs(parser, sft)
    return sft, train, lora


# The LoraArgs that decide the adapter's values (its shape and how it was drawn), each with its flag.
INIT_FLAGS = {"r": "--rank", "alpha": "--lora-alpha", "targets": "--targets", "init": "--init",
              "init_std": "--init-std", "use_rslora": "--use-rslora", "pissa_niter": "--pissa-niter"}  # fmt: skip


def init_adapter_args(ns: argparse.Namespace, adapter_dir: str) -> LoraArgs:
    """The LoraArgs of --init-adapter; an explicit flag that disagrees with the adapter is an error
    naming both values. Only the dropout (a training setting, not a value of the adapter) may be set;
    the LoRA seed stays the adapter's own (the one it was drawn with), --seed still seeds the data."""
    stored = read_adapter_args(adapter_dir)
    for name, flag in INIT_FLAGS.items():
        given = getattr(ns, name, None)
        if given is None:
            continue
        have = getattr(stored, name)
        same = resolve_targets(given) == resolve_targets(have) if name == "targets" else given == have
        if not same:
            shown = ",".join(given) if name == "targets" else given
            raise ValueError(f"{flag} {shown} conflicts with the adapter in --init-adapter {adapter_dir}, "
                             f"which has {name}={have!r}; drop the flag (the adapter's configuration is used)")
    return dataclasses.replace(stored, dropout=stored.dropout if ns.dropout is None else ns.dropout)


def check_init_adapter(cfg: SFTArgs, lora_args: LoraArgs, base_dtype: torch.dtype) -> None:
    """Before anything is written: --masks ranked on another adapter than --init-adapter are refused
    (score.py stamps its masks with the sha256 of the adapter it scored), and a pissa/olora adapter
    trains over a base of the dtype it was scored in (its residual base W0 - s B0 A0 is formed in it)."""
    if cfg.masks:
        stamped = safetensors_metadata(cfg.masks, "a masks file (safetensors)").get("adapter_init_sha256")
        actual = adapter_fingerprint(cfg.init_adapter)
        if stamped is not None and stamped != actual:
            raise ValueError(f"--masks {cfg.masks} ranks the elements of another adapter than --init-adapter "
                             f"{cfg.init_adapter} (sha256 {stamped[:12]}... vs {actual[:12]}...); "
                             "pass the adapter_init/ of the score.py run that wrote the masks")  # fmt: skip
    if lora_args.init in ("pissa", "olora"):
        weights = os.path.join(cfg.init_adapter, ADAPTER_WEIGHTS)
        scored_in = safetensors_metadata(weights).get("base_dtype")
        training_in = str(base_dtype).removeprefix("torch.")
        if scored_in is not None and scored_in != training_in:
            raise ValueError(f"--init-adapter {cfg.init_adapter} was scored over a {scored_in} base, this run's "
                             f"base is {training_in} (--base-dtype {cfg.base_dtype}); its {lora_args.init} residual "
                             f"base would differ: pass --base-dtype {scored_in}")  # fmt: skip


def build_adapter(model: torch.nn.Module, cfg: SFTArgs, lora_args: Union[LoraArgs, DualArgs]
                  ) -> tuple[Callable[[str], None], Optional[DualTraining]]:
    """Put the adapter on `model` (frozen base, masks installed); returns save(directory) and, for
    --adapter dual, DM-LoRA's training hooks (regulariser, screening, resume).

    One place per adapter type (--adapter), so another adapter plugs in here.
    """
    if cfg.adapter == "dual":
        if cfg.masks:
            raise ValueError("--masks holds LoRA-PAR element masks; --adapter dual prunes its own expert components")
        from lorapar.dmlora.training import DualTraining

        dual = DualTraining(model, lora_args)
        return dual.save, dual
    if cfg.init_adapter:  # the very tensors score.py scored (and, for pissa/olora, its residual base)
        load_adapter(model, cfg.init_adapter, dropout=lora_args.dropout)
    else:
        apply_lora(model, lora_args)
    if cfg.masks:
        install_masks(model, cfg.masks, cfg.stage)
    return lora_file_writer(model, lora_args, bool(cfg.masks)), None


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
def evaluate(model, dataset: SFTDataset, batch_size: int, pad_id: int, info: dist.DistInfo,
             sharded: bool = False) -> float:
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


def main(argv=None) -> dict:
    cfg, train, lora_args = parse_config(argv)
    info = dist.init_distributed(train.device)
    if cfg.init_adapter:
        check_init_adapter(cfg, lora_args, resolve_base_dtype(cfg.base_dtype, info.device))
    grad_accum = resolve_grad_accum(train, info.world_size)
    config = config_to_dict(cfg, train, lora_args)
    resume_from = prepare_run_dir(train, info)
    seed_everything(train.seed)

    # ---- data: every rank reads the whole file; the sampler deals each global batch over the ranks
    tokenizer = Tokenizer(cfg.tokenizer)
    train_set, eval_set = load_sft_data(cfg, tokenizer, train.seed)
    per_rank_step = train.batch_size * grad_accum
    sampler = LengthGroupedSampler(train_set.lengths, per_rank_step, info.world_size, info.rank, seed=train.seed)
    steps_per_epoch = len(sampler) // per_rank_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{cfg.data}: {len(train_set)} examples do not fill one optimizer step of "
            f"{per_rank_step * info.world_size} (batch size x grad accum x ranks)"
        )
    total_steps = train.max_steps or train.epochs * steps_per_epoch

    # ---- model and adapter
    if train.fsdp:  # the base sharded over the ranks, each reading only its rows (lorapar/fsdp.py)
        if cfg.adapter != "lora":
            raise FlagError("--fsdp supports --adapter lora only (DM-LoRA's screening reads whole tensors)")
        model, _, save_adapter_files = fsdp.build_lora_model(cfg.ckpt, cfg.base_dtype, cfg.masks, cfg.stage, lora_args,
                                                          info, tokenizer.vocab_size, adapter_dir=cfg.init_adapter)
        dual = None
    else:
        model = load_base_model(cfg.ckpt, cfg.base_dtype, info.device, tokenizer.vocab_size)
        save_adapter_files, dual = build_adapter(model, cfg, lora_args)
    if cfg.max_len > model.args.max_seq_len:  # past the context the positions are ones the base never saw
        raise FlagError(f"--max-len {cfg.max_len}: above the context of {cfg.ckpt} ({model.args.max_seq_len} tokens)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    if not train.fsdp:  # FSDP's ranks initialise identically from the seed and hold different rows
        dist.broadcast_params(params, info)
    optimizer = MaskedAdamW.for_model(
        model, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay
    )

    # ---- resume: adapter, optimizer, schedule and data position, RNG of this rank
    if dual is not None:
        dual.start(optimizer, total_steps)
    clear_previous_run(train, info)  # --overwrite: only now, with every input loaded
    start_step = 0
    if resume_from is not None:
        if dual is not None:  # adapter, pruned masks and EMAs, before the optimizer state laid out by them
            dual.resume(resume_from, optimizer)
        restore = fsdp_checkpoint.restore_sharded_checkpoint if train.fsdp else restore_training_state
        start_step = restore(resume_from, model, optimizer, config, info)
    elif info.is_main:
        save_config(os.path.join(train.out, "config.json"), cfg, train, lora_args,
                    extra={"world_size": info.world_size, "grad_accum": grad_accum, "total_steps": total_steps})
    metrics = MetricsLog(
        os.path.join(train.out, "metrics.jsonl"), info.is_main, resume_step=start_step if resume_from else None
    )
    if info.is_main and start_step == 0:
        dropped = len(train_set) - steps_per_epoch * per_rank_step * info.world_size
        metrics.log({"step": 0, "examples": len(train_set), "dropped_over_max_len": train_set.dropped,
                     "truncated": train_set.truncated, "unused_per_epoch": max(0, dropped),
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "world_size": info.world_size})

    checkpointer = fsdp_checkpoint.make_sharded_checkpointer if train.fsdp else make_checkpointer
    checkpoint = checkpointer(train, info, model, optimizer, total_steps, steps_per_epoch, config, save_adapter_files)

    # ---- training loop
    model.train()
    epoch_order: tuple[int, list[int]] = (-1, [])
    last_step = min(total_steps, train.halt_at) if train.halt_at else total_steps
    bar = tqdm(total=total_steps, initial=start_step, disable=not info.is_main, desc="sft", dynamic_ncols=True)
    loss_value = float("nan")
    for step in range(start_step, last_step):
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if epoch_order[0] != epoch:
            sampler.set_epoch(epoch)
            epoch_order = (epoch, list(sampler))
        mine = epoch_order[1][position * per_rank_step : (position + 1) * per_rank_step]
        micro_batches = [collate([train_set[i] for i in mine[k : k + train.batch_size]], tokenizer.pad_id)
                         for k in range(0, len(mine), train.batch_size)]
        local_tokens = sum(count_answer_tokens(b["labels"]) for b in micro_batches)
        step_tokens = dist.all_reduce_sum(torch.tensor(float(local_tokens), dtype=torch.float64), info).item()
        lr = lr_at(step, total_steps, train)
        set_lr(optimizer, lr)
        nll_sum = 0.0
        for batch in micro_batches:
            with autocast(info.device):
                nll, _ = answer_nll(model, batch["input_ids"].to(info.device), batch["labels"].to(info.device))
            (nll / step_tokens).backward()
            nll_sum += nll.item()
        if dual is not None:
            (dual.regulariser() / info.world_size).backward()  # the all-reduce below sums the ranks' copies
        dist.all_reduce_grads(params, info)  # a no-op for FSDP's parameters, reduced by FSDP itself
        grad_norm = optimizer.clip_grad_norm_(train.max_grad_norm) if train.max_grad_norm > 0 else None
        optimizer.step()
        dual_record = dual.after_step(step + 1) if dual is not None else {}  # reads this step's gradients
        optimizer.zero_grad(set_to_none=True)
        loss_value = dist.all_reduce_sum(torch.tensor(nll_sum, dtype=torch.float64), info).item() / step_tokens
        done = step + 1
        check_finite(done, train.out, loss=loss_value, grad_norm=None if grad_norm is None else float(grad_norm))
        record = {"step": done, "epoch": epoch, "lr": lr, "loss": loss_value, "answer_tokens": int(step_tokens),
                  "seconds": time.perf_counter() - started, **dual_record}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if eval_set is not None and (done == total_steps or (train.eval_every and done % train.eval_every == 0)):
            record["eval_loss"] = evaluate(model, eval_set, train.batch_size, tokenizer.pad_id, info, train.fsdp)
        if done % train.log_every == 0 or "eval_loss" in record or done == last_step:
            metrics.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if done == last_step or (train.save_every and done % train.save_every == 0):
            checkpoint(done)
    bar.close()

    # ---- save the final adapter beside the run's config (rank 0)
    finished = last_step == total_steps
    if finished and train.fsdp:
        fsdp_checkpoint.save_final(model, save_adapter_files, train.out, info)  # gathered to rank 0, peft layout
    elif finished and info.is_main:
        save_adapter_files(train.out)
    dist.barrier(info)
    runlock.release(train.out)
    return {"out": train.out, "steps": last_step, "finished": finished, "loss": loss_value}


if __name__ == "__main__":
    run_main(main, cleanup=dist.shutdown)
