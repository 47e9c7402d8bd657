"""Group Relative Policy Optimisation: rollouts, group-normalised advantages, the clipped objective.

For a prompt q, G completions o_1..o_G are sampled from the current policy and scored, r_i. Each
completion token t of o_i gets the advantage of its completion

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)        (or r_i - mean(r) without std scaling; Dr. GRPO)

and the per-token loss (ratio rho = pi(o_t) / pi_old(o_t), epsilon_high defaults to epsilon)

    l_t = -min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) A_i) + beta * KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1       (k3: unbiased, always >= 0)

reduced by one of four normalisations (N sequences, |o_i| tokens, L = max completion length):

    grpo     (1/N) sum_i (1/|o_i|) sum_t l_t       per-sequence mean, then mean over sequences
    dr_grpo  1/(N L) sum_i sum_t l_t               constant denominator: no length bias
    dapo     1/(sum_i |o_i|) sum_i sum_t l_t       every token weighs the same
    bnpo     (1/M) sum_m (1/sum_{i in m} |o_i|) sum_{i in m} sum_t l_t
                                                   TRL 0.17-0.19's default: the token mean of each of the
                                                   step's M micro-batches (all ranks), then their mean

N, the token count and M are those of the whole optimizer step (all micro-batches, all ranks), so the
gradient of grpo, dr_grpo and dapo does not depend on how the rollouts are split; the caller passes
them in. bnpo's does, by definition: it is TRL's micro-batch semantics, kept to reproduce TRL (with
shuffle_micro_batches, as TRL >= 0.18 shuffles each rank's completions before cutting micro-batches).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch

from lorapar import dist
from lorapar.batching import collate
from lorapar.config import field
from lorapar.errors import FlagError, check_fields
from lorapar.generate import generate
from lorapar.loss import IGNORE_INDEX, target_logprobs
from lorapar.model import eval_mode
from lorapar.optim import optimizer_step

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


@dataclass
class GRPOArgs:
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    prompts_per_step: int = field(
        default=4, metadata={"help": "prompts per step over all ranks (P), a multiple of the number of ranks"}
    )
    max_prompt_len: int = field(
        default=128, metadata={"help": "longer prompts keep their last N tokens (TRL's left truncation), counted"}
    )
    max_completion_len: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the ratio"})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "upper clip range (DAPO); default epsilon"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (0 = no reference model)"})
    reference: str = field(
        default="sft",
        metadata={"choices": ["sft", "base"], "help": "KL against the frozen starting (SFT) adapter or the base model"},
    )
    loss_type: str = field(default="grpo", metadata={"choices": list(LOSS_TYPES)})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group's reward std"})
    mu: int = field(default=1, metadata={"help": "optimizer passes over each batch of rollouts"})
    micro_batch: int = field(default=8, metadata={"help": "completions per forward/backward"})
    shuffle_micro_batches: bool = field(
        default=False, metadata={"help": "shuffle each rank's completions before cutting micro-batches (TRL >= 0.18)"}
    )

    def __post_init__(self) -> None:
        # G >= 2: the advantage is a reward's distance from its group's mean (over the group's std); a group
        # of one has no mean to compare with and no std (nan), so it cannot teach anything.
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise FlagError(
                f"--num-generations {self.num_generations}: expected >= 2 (GRPO compares each "
                "completion with the others of its group; one has no group mean or std)"
            )
        check_fields(
            self,
            positive=("prompts_per_step", "max_prompt_len", "max_completion_len", "mu", "micro_batch"),
            non_negative=("temperature", "epsilon", "beta"),
        )
        if not 0 < self.top_p <= 1:
            raise FlagError(f"--top-p {self.top_p}: expected a value in (0, 1]")
        if self.epsilon_high is not None:
            check_fields(self, non_negative=("epsilon_high",))


# ----------------------------------------------------------------------------- pure functions


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) ordered group by group -> advantages (N,); std is the unbiased std of the group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    ref_logp: Optional[torch.Tensor] = None,
    loss_type: str = "grpo",
    max_completion_len: Optional[int] = None,
    num_sequences: Optional[int] = None,
    num_tokens: Optional[float] = None,
    num_micro_batches: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (module docstring) of completions (B, T) and sums for logging.

    logp / old_logp / ref_logp: per-token log-probs, mask: which entries are completion tokens,
    advantages: (B,). num_sequences / num_tokens / num_micro_batches: the step's totals (default:
    this batch's; this batch is one micro-batch).
    Returns (loss, {"tokens", "kl_sum", "clipped"}) where the sums cover this batch's tokens.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    mask = mask.to(logp.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - epsilon, 1.0 + high) * adv)
    stats: dict[str, torch.Tensor] = {"tokens": mask.sum().detach()}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        stats["kl_sum"] = (kl * mask).sum().detach()
    clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    stats["clipped"] = (clipped.to(mask.dtype) * mask).sum().detach()

    n_seq = num_sequences if num_sequences is not None else logp.shape[0]
    summed = per_token * mask
    if loss_type == "grpo":
        loss = (summed.sum(1) / mask.sum(1).clamp_min(1.0)).sum() / n_seq
    elif loss_type == "dr_grpo":
        if max_completion_len is None:
            raise ValueError("loss_type dr_grpo needs max_completion_len")
        loss = summed.sum() / (n_seq * max_completion_len)
    elif loss_type == "bnpo":
        loss = summed.sum() / mask.sum().clamp_min(1.0) / (num_micro_batches or 1)
    else:
        loss = summed.sum() / (num_tokens if num_tokens is not None else mask.sum().clamp_min(1.0))
    return loss, stats


# ----------------------------------------------------------------------------- rollouts


def derive_seed(*parts: int) -> int:
    """A 64-bit seed mixed from integers (e.g. run seed, step, prompt index), each taken mod 2^64.

    numpy's SeedSequence mixes the words [number of parts, then each part as two 32-bit words]: with
    the count and fixed widths, distinct tuples are distinct inputs (SeedSequence alone would give
    (7, 2) and (7, 2, 0), or (2^32 + 5, 9) and (5, 1, 9), the same stream).
    """
    words = [len(parts)]
    for part in parts:
        part %= 2**64
        words += [part & 0xFFFFFFFF, part >> 32]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


@dataclass
class Rollouts:
    """One step's completions on this rank: G consecutive rows per prompt, prompt + completion right-padded."""

    input_ids: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T): completion tokens, IGNORE_INDEX elsewhere
    rewards: torch.Tensor  # (N, F) one column per reward function, unweighted
    total_reward: torch.Tensor  # (N,) weighted sum
    advantages: torch.Tensor  # (N,)
    completion_lengths: list[int]
    old_logp: Optional[torch.Tensor] = None  # (N, T-1), filled by grpo_update when mu > 1
    ref_logp: Optional[torch.Tensor] = None  # (N, T-1), filled by grpo_update when beta > 0
    generation_seconds: float = 0.0


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int):
    """Rows prompt + completion, right-padded; labels mark the completion tokens only."""
    rows = [{"input_ids": [*p, *c], "labels": [IGNORE_INDEX] * len(p) + [*c]} for p, c in zip(prompts, completions)]
    batch = collate(rows, pad_id)
    return batch["input_ids"], batch["labels"]


def _logprobs(model, rollouts: Rollouts, args: GRPOArgs, autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """Log-probs of the completions under `model` as it sampled them: no grad, eval mode (no dropout)."""
    device = model.tok_embeddings.weight.device
    pieces = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, rollouts.input_ids.shape[0], args.micro_batch):
            ids = rollouts.input_ids[start : start + args.micro_batch].to(device)
            labels = rollouts.labels[start : start + args.micro_batch].to(device)
            with autocast():
                pieces.append(target_logprobs(model, ids, labels, temperature=args.temperature)[0])
    return torch.cat(pieces)


def make_rollouts(
    model,
    prompts: Sequence[Sequence[int]],
    score: Callable[[list[int], list[list[int]]], torch.Tensor],
    weights: torch.Tensor,
    args: GRPOArgs,
    *,
    seeds: Sequence[int],
    eos_id: Optional[int],
    pad_id: int,
    stop_ids: Sequence[int] = (),
) -> Rollouts:
    """Sample G completions per prompt and score them: score(prompt_indices, completions) -> (N, F)
    rewards, combined by weights (F,) into each completion's reward and its group advantage.

    seeds: one per prompt; completion g of prompt i is drawn from its own generator, seeded with
    derive_seed(seeds[i], g), so a group's completions do not depend on which prompts share the batch.
    A completion ends at eos_id or any of stop_ids (the tokenizer's turn ends: ChatML's <|im_end|>, ...).
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"make_rollouts: {len(seeds)} seeds for {len(prompts)} prompts (one per prompt)")
    G = args.num_generations
    repeated = [list(p) for p in prompts for _ in range(G)]
    start = time.perf_counter()
    gen = generate(
        model,
        repeated,
        args.max_completion_len,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=[derive_seed(s, g) for s in seeds for g in range(G)],
        eos_id=eos_id,
        pad_id=pad_id,
        stop_ids=stop_ids,
    )
    generation_seconds = time.perf_counter() - start
    rewards = score([i // G for i in range(len(repeated))], gen.tokens).to(torch.float32)
    total = rewards @ weights.to(torch.float32)
    input_ids, labels = pack(repeated, gen.tokens, pad_id)
    return Rollouts(
        input_ids=input_ids,
        labels=labels,
        rewards=rewards,
        total_reward=total,
        advantages=group_advantages(total, G, scale=args.scale_rewards),
        completion_lengths=[len(t) for t in gen.tokens],
        generation_seconds=generation_seconds,
    )


def _fixed_logprobs(model, rollouts: Rollouts, args: GRPOArgs, autocast, reference) -> None:
    """Fill rollouts.old_logp (mu > 1) and rollouts.ref_logp (beta > 0), which stay fixed over the passes."""
    # Old log-probs are only needed when the policy moves between passes; with mu = 1 the ratio is
    # exactly 1 and logp.detach() stands in for them (its gradient is what remains).
    if args.mu > 1:
        rollouts.old_logp = _logprobs(model, rollouts, args, autocast)
    if args.beta != 0.0:
        if reference is None:
            raise ValueError("beta > 0 needs a reference policy")
        with reference():
            rollouts.ref_logp = _logprobs(model, rollouts, args, autocast)


def _global_counts(rollouts: Rollouts, args: GRPOArgs, info: dist.DistInfo) -> tuple[int, float, int]:
    """(sequences, completion tokens, micro-batches) summed over the ranks: the loss's normalisers."""
    n = rollouts.input_ids.shape[0]
    micro_batches = -(-n // args.micro_batch)
    local = torch.tensor([n, int((rollouts.labels != IGNORE_INDEX).sum()), micro_batches], dtype=torch.float64)
    totals = dist.all_reduce_sum(local, info)
    return int(totals[0]), float(totals[1]), int(totals[2])


def grpo_update(
    model,
    optimizer,
    rollouts: Rollouts,
    args: GRPOArgs,
    info: dist.DistInfo,
    *,
    lrs: Sequence[float],
    max_grad_norm: float = 0.0,
    autocast: Callable[[], ContextManager] = nullcontext,
    reference: Optional[Callable[[], ContextManager]] = None,
    shuffle_seed: int = 0,
) -> dict[str, float]:
    """mu optimizer steps on one batch of rollouts (lrs[k] for pass k); returns step statistics.

    With args.shuffle_micro_batches the rows are cut into micro-batches in an order drawn from
    shuffle_seed (the same order for every pass); otherwise in order.

    `reference()` enters a context in which `model` is the reference policy (needed when beta > 0).
    Old and reference log-probs are taken in eval mode, as the completions were sampled; the policy's
    in train mode. With LoRA dropout > 0 the first pass's ratio is then exp(dropout noise) rather than
    exactly 1 when mu > 1 (with mu = 1 the old log-probs are the policy's own, detached).
    """
    device = model.tok_embeddings.weight.device
    start = time.perf_counter()
    _fixed_logprobs(model, rollouts, args, autocast, reference)
    logprob_seconds = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    n = rollouts.input_ids.shape[0]
    num_sequences, num_tokens, num_micro_batches = _global_counts(rollouts, args, info)
    if args.shuffle_micro_batches:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed % 2**63))
    else:
        order = torch.arange(n)
    sums = {"tokens": 0.0, "kl_sum": 0.0, "clipped": 0.0, "loss": 0.0}
    grad_norm = 0.0
    model.train()
    for k in range(args.mu):
        for start in range(0, n, args.micro_batch):
            rows = order[start : start + args.micro_batch]
            ids, labels = rollouts.input_ids[rows].to(device), rollouts.labels[rows].to(device)
            with autocast():
                logp, mask = target_logprobs(model, ids, labels, temperature=args.temperature)
            old = rollouts.old_logp[rows].to(device) if rollouts.old_logp is not None else logp.detach()
            ref = rollouts.ref_logp[rows].to(device) if rollouts.ref_logp is not None else None
            loss, stats = grpo_loss(
                logp,
                old,
                rollouts.advantages[rows].to(device),
                mask,
                epsilon=args.epsilon,
                epsilon_high=args.epsilon_high,
                beta=args.beta,
                ref_logp=ref,
                loss_type=args.loss_type,
                max_completion_len=args.max_completion_len,
                num_sequences=num_sequences,
                num_tokens=num_tokens,
                num_micro_batches=num_micro_batches,
            )
            loss.backward()
            sums["loss"] += loss.item()
            for key, value in stats.items():
                sums[key] += value.item()
        norm = optimizer_step(optimizer, params, info, lr=lrs[k], max_grad_norm=max_grad_norm)
        grad_norm = grad_norm if norm is None else float(norm)
    reduced = dist.all_reduce_sum(torch.tensor([sums[k] for k in ("loss", "tokens", "kl_sum", "clipped")]), info)
    loss_sum, tokens, kl_sum, clipped = reduced.tolist()
    return {
        "loss": loss_sum / args.mu,
        "kl": kl_sum / max(tokens, 1.0),
        "clip_fraction": clipped / max(tokens, 1.0),
        "grad_norm": grad_norm,
        "logprob_seconds": logprob_seconds,
    }
