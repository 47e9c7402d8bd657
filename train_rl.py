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

import contextlib
import random
import time
from typing import Optional

import torch

from lorapar import dist, fsdp
from lorapar.config import add_dataclass_args
from lorapar.data import load_examples
from lorapar.errors import FlagError, run_main
from lorapar.grpo import GRPOArgs, derive_seed, grpo_update, make_rollouts
from lorapar.launch import finish_run, from_preset, load_lora_model, script_parser, select_system, start_run
from lorapar.lora import LoraArgs, disable_adapter
from lorapar.lora_settings import add_lora_flags, lora_args_from_flags, lora_flags_given
from lorapar.optim import lr_at
from lorapar.precision import autocast
from lorapar.rewards import parse_spec
from lorapar.run import prepare_run_dir, seed_everything
from lorapar.script_args import PINNED_TRL, RLArgs, TrainArgs, require_inputs  # noqa: F401 (train_rl.PINNED_TRL)
from lorapar.script_args import RL_PRESETS as PRESETS
from lorapar.templates import encode_prompt
from lorapar.tokenizer import Tokenizer


def parse_config(argv=None) -> tuple[RLArgs, GRPOArgs, TrainArgs, Optional[LoraArgs]]:
    parser = script_parser(__doc__, PRESETS)
    add_dataclass_args(parser, RLArgs)
    add_dataclass_args(parser, GRPOArgs)
    add_dataclass_args(parser, TrainArgs, skip=("batch_size", "grad_accum", "global_batch", "eval_every"))
    add_lora_flags(parser)
    ns = parser.parse_args(argv)
    preset = PRESETS.get(ns.preset, {})
    rl, grpo = from_preset(RLArgs, ns, preset), from_preset(GRPOArgs, ns, preset)
    train = from_preset(TrainArgs, ns, preset)
    require_inputs(parser, rl)
    lora_flags = [flag for flag, _ in lora_flags_given(ns).values()]
    if rl.adapter and lora_flags:
        parser.error(f"{', '.join(lora_flags)}: the LoRA configuration comes from --adapter {rl.adapter}")
    lora = None if rl.adapter else lora_args_from_flags(ns, seed=train.seed)
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
            ids, truncated = ids[-grpo.max_prompt_len :], truncated + 1
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


def step_prompts_of(cfg: RLArgs, grpo: GRPOArgs, tokenizer: Tokenizer, info: dist.DistInfo) -> tuple[list[tuple], int]:
    """load_prompts, refusing too few for one step and saying (on rank 0) how many were cut."""
    kept, truncated = load_prompts(cfg, grpo, tokenizer)
    if len(kept) < grpo.prompts_per_step:
        raise ValueError(
            f"{cfg.data}: {len(kept)} prompts do not fill one step of --prompts-per-step {grpo.prompts_per_step}"
        )
    if truncated and info.is_main:
        print(
            f"train_rl: {truncated} of {len(kept)} prompts longer than --max-prompt-len {grpo.max_prompt_len} "
            "keep only their last tokens (TRL's left truncation)",
            flush=True,
        )
    return kept, truncated


def start_grpo_run(cfg, grpo, train, lora_args, info, tokenizer, resume_from, prompts, total_steps, steps_per_epoch):
    """(model, run, reference policy): the model with its adapter (the SFT one, or fresh) and masks, then
    lorapar.launch.start_run (optimizer, resume, metrics, checkpoints). prompts: (kept, truncated) counts."""
    model, lora_args, save_files = load_lora_model(cfg, lora_args, cfg.adapter, info, tokenizer.vocab_size, train.fsdp)
    if grpo.max_prompt_len + grpo.max_completion_len > model.args.max_seq_len:
        raise FlagError(
            f"--max-prompt-len {grpo.max_prompt_len} + --max-completion-len {grpo.max_completion_len}: "
            f"above the context of {cfg.ckpt} ({model.args.max_seq_len} tokens)"
        )
    model.gradient_checkpointing = cfg.gradient_checkpointing
    run = start_run(
        model,
        train,
        info,
        resume_from,
        (cfg, grpo, train, lora_args),
        save_files,
        total_steps,
        steps_per_epoch,
        first_record={"prompts": prompts[0], "prompts_truncated": prompts[1]},
        extra={},
        desc="grpo",
        keep_start_adapter=True,
    )
    # the reference policy: the base without the adapter, or the adapter training started from
    references = {"base": lambda: disable_adapter(model), "sft": lambda: swapped_adapter(run.params, run.start_adapter)}
    return model, run, references[grpo.reference]


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
    kept, truncated = step_prompts_of(cfg, grpo, tokenizer, info)
    steps_per_epoch = len(kept) // grpo.prompts_per_step
    total_steps = train.max_steps or train.epochs * steps_per_epoch

    # ---- model and adapter (the SFT one, or fresh), masks; optimizer, resume, metrics (lorapar/launch.py)
    model, run, reference = start_grpo_run(
        cfg, grpo, train, lora_args, info, tokenizer, resume_from, (len(kept), truncated), total_steps, steps_per_epoch
    )

    # ---- training loop
    order: tuple[int, list[int]] = (-1, [])
    for step in range(run.start_step, run.last_step):
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
                model,
                [kept[i][1] for _, i in mine],
                lambda idx, comps: score(tokenizer, reward_fns, idx, comps, batch_examples),
                weights,
                grpo,
                seeds=[derive_seed(train.seed, step, j) for j, _ in mine],
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                stop_ids=tokenizer.stop_ids,
            )
        started = time.perf_counter()
        # mu optimizer steps on these rollouts, each lorapar.optim.optimizer_step at its own lr
        lrs = [lr_at(step * grpo.mu + k, total_steps * grpo.mu, train) for k in range(grpo.mu)]
        stats = grpo_update(
            model,
            run.optimizer,
            rollouts,
            grpo,
            info,
            lrs=lrs,
            max_grad_norm=train.max_grad_norm,
            autocast=lambda: autocast(info.device),
            reference=reference,
            shuffle_seed=derive_seed(train.seed, step, info.rank, 1),
        )
        train_seconds = time.perf_counter() - started
        record = {
            "step": step + 1,
            "epoch": epoch,
            "lr": lrs[-1],
            **stats,
            **rollout_stats(rollouts, reward_fns, grpo, info),
            "generation_seconds": rollouts.generation_seconds,
            "training_seconds": train_seconds,
        }
        run.end_step(record, reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.4f}")

    finished = finish_run(run, model)
    return {"out": train.out, "steps": run.last_step, "finished": finished}


def score(
    tokenizer: Tokenizer, reward_fns, prompt_index: list[int], completions: list[list[int]], batch: list
) -> torch.Tensor:
    """The reward functions' values of each completion (rows) for the prompt of `batch` it answers."""
    rows = []
    for i, tokens in zip(prompt_index, completions):
        text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])
        rows.append([float(fn(text, batch[i])) for _, fn, _ in reward_fns])
    return torch.tensor(rows)


def rollout_stats(rollouts, reward_fns, grpo: GRPOArgs, info: dist.DistInfo) -> dict[str, float]:
    """Reward mean / std per function and in total, share of groups with zero reward std, completion lengths."""
    gathered = dist.all_gather_objects((rollouts.rewards, rollouts.total_reward, rollouts.completion_lengths), info)
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
