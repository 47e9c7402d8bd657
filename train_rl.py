"""Masked GRPO: LoRA-PAR's stage 2 (System-2 data, stage-2 element mask), starting from the SFT adapter.

    python train_rl.py --ckpt BASE --tokenizer tokenizer.model --adapter runs/sft --data train.jsonl \
        --out runs/grpo [--system 2] [--masks masks.safetensors --stage 2] [--preset lorapar-grpo]
    torchrun --nproc_per_node=8 train_rl.py ...

Each step takes P prompts (split over the ranks), samples G completions of each with the KV-cache
generator, scores them with the reward functions (--rewards "name=weight,..."; lorapar/rewards.py),
turns the rewards into group-normalised advantages and runs mu optimizer passes of the clipped GRPO
objective with a k3 KL penalty against the reference policy (lorapar/grpo.py).

The completions of prompt j of a step are drawn with seeds derived from (--seed, step, j), one
generator per completion, so a resumed run draws exactly the completions the uninterrupted one would
and N ranks draw those one process would: with the same global batch (--prompts-per-step, a multiple
of the number of ranks, so no group straddles two) the adapter matches to float rounding. LoRA
dropout is the exception: its masks come from each rank's own RNG.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from lorapar import dist, fsdp, fsdp_checkpoint, runlock
from lorapar.adapter import load_adapter
from lorapar.config import add_dataclass_args, config_to_dict, dataclass_from_args, field, save_config
from lorapar.data import load_examples
from lorapar.templates import encode_prompt
from lorapar.errors import FlagError, run_main
from lorapar.grpo import GRPOArgs, derive_seed, grpo_update, make_rollouts
from lorapar.lora import LoraArgs, apply_lora, disable_adapter, named_lora_parameters
from lorapar.masks import MaskedAdamW
from lorapar.rewards import DEFAULT_SPEC, parse_spec
from lorapar.tokenizer import Tokenizer
from lorapar.trainer import (
    InputArgs, MetricsLog, TrainArgs, add_lora_flags, autocast, check_finite, clear_previous_run, install_masks,
    load_base_model, lora_file_writer, lr_at, make_checkpointer, prepare_run_dir, require_inputs,
    restore_training_state, seed_everything, select_system,
)


@dataclass
class RLArgs(InputArgs):
    adapter: str = field(default="", metadata={"help": "SFT adapter directory to start from (none = a fresh LoRA)"})
    rewards: str = field(
        default=DEFAULT_SPEC, metadata={"help": "reward functions and weights: name=w,...; module:function for your own"}
    )


# The TRL release whose GRPOTrainer defaults the paper preset reproduces: v0.19.1 (8 July 2025) was the
# current release when the paper went to arXiv (2507.20999, 28 July 2025); v0.20.0 was tagged the next
# day. docs/trl_grpo_defaults.md has the defaults of v0.14 .. v0.19.1 and the flags for each.
PINNED_TRL = "v0.19.1"

PRESETS = {
    # LoRA-PAR's GRPO (example.py): lr 5e-6, betas (0.9, 0.99), weight decay 0.1, warm-up 0.1, cosine, clip 0.1,
    # G 8, 128 / 256 tokens, example.py's chat prompt and rewards. What example.py leaves at TRL's defaults is
    # TRL v0.19.1's: per_device_train_batch_size 8 completions x 4 accumulation steps = 4 prompts per step on
    # the authors' one GPU, beta 0 (no KL, no reference model), temperature 1.0, top-p 1.0, loss "bnpo" over
    # micro-batches of 8 shuffled completions, one pass per batch of rollouts (num_iterations 1), eps 0.2.
    "lorapar-grpo": {
        "TrainArgs": dict(lr=5e-6, betas=(0.9, 0.99), weight_decay=0.1, warmup_ratio=0.1, max_grad_norm=0.1,
                          schedule="cosine", epochs=1),
        "RLArgs": dict(template="lorapar"),
        "GRPOArgs": dict(num_generations=8, max_prompt_len=128, max_completion_len=256, prompts_per_step=4,
                         beta=0.0, temperature=1.0, top_p=1.0, loss_type="bnpo", micro_batch=8,
                         shuffle_micro_batches=True, mu=1, epsilon=0.2, scale_rewards=True),
    },
}


def parse_config(argv=None) -> tuple[RLArgs, GRPOArgs, TrainArgs, Optional[LoraArgs]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="paper hyper-parameters")
    add_dataclass_args(parser, RLArgs)
    add_dataclass_args(parser, GRPOArgs)
    add_dataclass_args(parser, TrainArgs, skip=("batch_size", "grad_accum", "global_batch", "eval_every"))
    add_lora_flags(parser)
    ns = parser.parse_args(argv)
    preset = PRESETS.get(ns.preset, {})
    rl = dataclass_from_args(RLArgs, ns, RLArgs(**preset.get("RLArgs", {})))
    grpo = dataclass_from_args(GRPOArgs, ns, GRPOArgs(**preset.get("GRPOArgs", {})))
    train = dataclass_from_args(TrainArgs, ns, TrainArgs(**preset.get("TrainArgs", {})))
    require_inputs(parser, rl)
    shape_fields = ("r", "alpha", "dropout", "targets", "init", "init_std", "use_rslora", "pissa_niter")
    lora_flags = [f"--{f}" for f in shape_fields if getattr(ns, f, None) is not None]
    if rl.adapter and lora_flags:
        parser.error(f"{', '.join(lora_flags)}: the LoRA configuration comes from --adapter {rl.adapter}")
    lora = None if rl.adapter else dataclass_from_args(LoraArgs, ns, LoraArgs(seed=train.seed))
    return rl, grpo, train, lora


def load_prompts(cfg: RLArgs, grpo: GRPOArgs, tokenizer: Tokenizer) -> tuple[list[tuple], int]:
    """[(example, prompt ids)] of every selected row and how many prompts were cut.

    A prompt longer than --max-prompt-len keeps its last max_prompt_len tokens, as TRL's GRPOTrainer
    does (`prompt_ids[:, -max_prompt_length:]`): the question and the chat markers survive, the start
    (BOS, then the system prompt) goes. No question is left out.
    """
    examples = select_system(load_examples(cfg.data, cfg.format, skip_bad=cfg.skip_bad), cfg.system, cfg.data)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    prompts, truncated = [], 0
    for example in examples:
        ids = encode_prompt(tokenizer, example, cfg.template, phase="rl")
        if len(ids) > grpo.max_prompt_len:
            ids, truncated = ids[-grpo.max_prompt_len:], truncated + 1
        prompts.append((example, ids))
    return prompts, truncated


@contextlib.contextmanager
def swapped_adapter(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Temporarily give the adapter other values (the frozen SFT adapter as reference policy)."""
    current = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, current):
                p.copy_(v)


def main(argv=None) -> dict:
    cfg, grpo, train, lora_args = parse_config(argv)
    info = dist.init_distributed(train.device)
    if grpo.prompts_per_step % info.world_size:
        raise ValueError(
            f"--prompts-per-step {grpo.prompts_per_step} is not a multiple of {info.world_size} ranks "
            "(each rank samples and normalises whole groups of completions)"
        )
    resume_from = prepare_run_dir(train, info)
    seed_everything(train.seed)
    reward_fns = parse_spec(cfg.rewards)
    weights = torch.tensor([w for _, _, w in reward_fns])

    # ---- data: every prompt, the longer ones left-truncated to --max-prompt-len (counted)
    tokenizer = Tokenizer(cfg.tokenizer)
    kept, truncated = load_prompts(cfg, grpo, tokenizer)
    if len(kept) < grpo.prompts_per_step:
        raise ValueError(
            f"{cfg.data}: {len(kept)} prompts do not fill one step of --prompts-per-step {grpo.prompts_per_step}"
        )
    if truncated and info.is_main:
        print(f"train_rl: {truncated} of {len(kept)} prompts longer than --max-prompt-len {grpo.max_prompt_len} "
              "keep only their last tokens (TRL's left truncation)", flush=True)
    steps_per_epoch = len(kept) // grpo.prompts_per_step
    total_steps = train.max_steps or train.epochs * steps_per_epoch

    # ---- model, adapter (the SFT one, or fresh), masks, reference policy, optimizer
    if train.fsdp:  # the base sharded over the ranks, each reading only its rows (lorapar/fsdp.py)
        model, lora_args, save_files = fsdp.build_lora_model(cfg.ckpt, cfg.base_dtype, cfg.masks, cfg.stage, lora_args,
                                                             info, tokenizer.vocab_size, adapter_dir=cfg.adapter)
    else:
        model = load_base_model(cfg.ckpt, cfg.base_dtype, info.device, tokenizer.vocab_size)
        if cfg.adapter:
            lora_args = load_adapter(model, cfg.adapter)
        else:
            apply_lora(model, lora_args)
        if cfg.masks:
            install_masks(model, cfg.masks, cfg.stage)
        save_files = lora_file_writer(model, lora_args, bool(cfg.masks))
    if grpo.max_prompt_len + grpo.max_completion_len > model.args.max_seq_len:
        raise FlagError(f"--max-prompt-len {grpo.max_prompt_len} + --max-completion-len {grpo.max_completion_len}: "
                        f"above the context of {cfg.ckpt} ({model.args.max_seq_len} tokens)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    params = [p for _, p in named_lora_parameters(model)]
    if not train.fsdp:  # FSDP's ranks initialise identically from the seed and hold different rows
        dist.broadcast_params(params, info)
    initial_adapter = [p.detach().clone() for p in params]
    references = {"base": lambda: disable_adapter(model), "sft": lambda: swapped_adapter(params, initial_adapter)}
    reference = references[grpo.reference]
    optimizer = MaskedAdamW.for_model(
        model, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay
    )
    config = config_to_dict(cfg, grpo, train, lora_args)

    clear_previous_run(train, info)  # --overwrite: only now, with every input loaded
    start_step = 0
    if resume_from is not None:
        restore = fsdp_checkpoint.restore_sharded_checkpoint if train.fsdp else restore_training_state
        start_step = restore(resume_from, model, optimizer, config, info)
    elif info.is_main:
        save_config(os.path.join(train.out, "config.json"), cfg, grpo, train, lora_args,
                    extra={"world_size": info.world_size, "total_steps": total_steps})
    metrics = MetricsLog(
        os.path.join(train.out, "metrics.jsonl"), info.is_main, resume_step=start_step if resume_from else None
    )
    if start_step == 0:
        metrics.log({"step": 0, "prompts": len(kept), "prompts_truncated": truncated,
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "world_size": info.world_size})

    checkpointer = fsdp_checkpoint.make_sharded_checkpointer if train.fsdp else make_checkpointer
    checkpoint = checkpointer(train, info, model, optimizer, total_steps, steps_per_epoch, config, save_files)

    def score(prompt_index: list[int], completions: list[list[int]], batch: list) -> torch.Tensor:
        rows = []
        for i, tokens in zip(prompt_index, completions):
            text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
            rows.append([float(fn(text, batch[i])) for _, fn, _ in reward_fns])
        return torch.tensor(rows)

    # ---- training loop
    last_step = min(total_steps, train.halt_at) if train.halt_at else total_steps
    bar = tqdm(total=total_steps, initial=start_step, disable=not info.is_main, desc="grpo", dynamic_ncols=True)
    order: tuple[int, list[int]] = (-1, [])
    for step in range(start_step, last_step):
        epoch, position = divmod(step, steps_per_epoch)
        if order[0] != epoch:
            shuffled = list(range(len(kept)))
            random.Random(train.seed + epoch).shuffle(shuffled)
            order = (epoch, shuffled)
        step_prompts = order[1][position * grpo.prompts_per_step : (position + 1) * grpo.prompts_per_step]
        # Prompt j of the step samples with seed (seed, step, j) whichever rank holds it.
        mine = dist.shard(list(enumerate(step_prompts)), info)
        batch_examples = [kept[i][0] for _, i in mine]
        with fsdp.lockstep(model, info, enabled=train.fsdp):  # ranks' decode steps differ (early stops)
            rollouts = make_rollouts(
                model, [kept[i][1] for _, i in mine], lambda idx, comps: score(idx, comps, batch_examples), weights, grpo,
                seeds=[derive_seed(train.seed, step, j) for j, _ in mine], eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids,
            )
        started = time.perf_counter()
        lrs = [lr_at(step * grpo.mu + k, total_steps * grpo.mu, train) for k in range(grpo.mu)]
        stats = grpo_update(model, optimizer, rollouts, grpo, info, lrs=lrs, max_grad_norm=train.max_grad_norm,
                            autocast=lambda: autocast(info.device), reference=reference,
                            shuffle_seed=derive_seed(train.seed, step, info.rank, 1))
        train_seconds = time.perf_counter() - started
        done = step + 1
        check_finite(done, train.out, loss=stats["loss"], grad_norm=stats["grad_norm"])
        record = {"step": done, "epoch": epoch, "lr": lrs[-1], **stats, **rollout_stats(rollouts, reward_fns, grpo, info),
                  "generation_seconds": rollouts.generation_seconds, "training_seconds": train_seconds}
        if done % train.log_every == 0 or done == last_step:
            metrics.log(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.4f}")
        if done == last_step or (train.save_every and done % train.save_every == 0):
            checkpoint(done)
    bar.close()

    finished = last_step == total_steps
    if finished and train.fsdp:
        fsdp_checkpoint.save_final(model, save_files, train.out, info)  # gathered to rank 0, peft layout
    elif finished and info.is_main:
        save_files(train.out)
    dist.barrier(info)
    runlock.release(train.out)
    return {"out": train.out, "steps": last_step, "finished": finished}


def rollout_stats(rollouts, reward_fns, grpo: GRPOArgs, info: dist.DistInfo) -> dict[str, float]:
    """Reward mean / std per function and in total, share of groups with zero reward std, completion lengths."""
    gathered = dist.all_gather_objects(
        (rollouts.rewards, rollouts.total_reward, rollouts.completion_lengths), info
    )
    rewards = torch.cat([g[0] for g in gathered])
    total = torch.cat([g[1] for g in gathered])
    lengths = torch.tensor([n for g in gathered for n in g[2]], dtype=torch.float32)
    out = {"reward_mean": total.mean().item(), "reward_std": total.std().item() if total.numel() > 1 else 0.0}
    for column, (name, _, _) in enumerate(reward_fns):
        out[f"reward/{name}_mean"] = rewards[:, column].mean().item()
        out[f"reward/{name}_std"] = rewards[:, column].std().item() if rewards.shape[0] > 1 else 0.0
        # share of prompts whose G samples hold one with a positive value (pass@G for the correctness reward)
        out[f"reward/{name}_any"] = (rewards[:, column].view(-1, grpo.num_generations) > 0).any(1).float().mean().item()
    group_std = total.view(-1, grpo.num_generations).std(1)
    out["zero_std_groups"] = (group_std == 0).float().mean().item()
    out["completion_length_mean"] = lengths.mean().item()
    out["completion_length_max"] = lengths.max().item()
    return out


if __name__ == "__main__":
    run_main(main, cleanup=dist.shutdown)
