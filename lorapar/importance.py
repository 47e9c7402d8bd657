"""Element-wise importance of every LoRA parameter for one system's data (LoRA-PAR, section 3.2).

With per-example gradients g_i = d loss_i / d phi of the mean answer-token NLL of example i, the
importance of an element phi is the drop of the loss when phi is removed (set to zero), to second
order with the diagonal empirical Fisher in place of the Hessian:

    I(phi) = | mean_i(g_i * phi) - 0.5 * mean_i(g_i^2) * phi^2 |      (order "second", the paper)
    I(phi) = | mean_i(g_i * phi) |                                     (order "first")

Only the running sums sum_i g_i and sum_i g_i^2 (and the example count) are kept, so memory is two
copies of the adapter whatever the number of examples. Per-example gradients come either from one
backward pass per example (batch_size 1, the reference) or from one per batch, formed from each LoRA
module's input and output gradient (`accumulate_batch`); the two agree to float rounding. Under torchrun each
rank takes every world_size-th example and the sums are all-reduced before the scores are formed; under --fsdp
each rank keeps the sums of its own rows of every tensor only, and the whole scores are gathered once
(lorapar/fsdp_scoring.py).

The adapter must be non-degenerate: with the usual LoRA init (B = 0) every gradient of A is zero,
so the scoring adapter draws both A and B from N(0, init_std^2) (the authors use 0.01).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from lorapar.batching import collate, encode_example
from lorapar.config import field_of
from lorapar.data import Example
from lorapar.dist import DistInfo, all_reduce_sum
from lorapar.errors import check_fields
from lorapar.lora import LoraArgs, LoRALinear, lora_modules, named_lora_parameters
from lorapar.lora_init import LoraInit
from lorapar.lora_names import peft_key
from lorapar.lora_settings import LoraSettings
from lorapar.loss import IGNORE_INDEX, answer_nll, target_logprobs
from lorapar.model import eval_mode
from lorapar.templates import TEMPLATES, chat_format, format_prompt, format_response, prompt_ends_with_eos

ORDERS = ("second", "first")


@dataclass
class ImportanceArgs(LoraInit, LoraSettings):
    """How score.py scores: the scored adapter's shape (LoraSettings: --rank, --lora-alpha, --targets) and how it
    is drawn (LoraInit: --init, --init-std, --pissa-niter; the bases' order puts the shape's flags first)."""

    samples: int = field(
        default=100, metadata={"help": "examples scored per system (the paper: 100); fewer if fewer exist"}
    )
    order: str = field(
        default="second",
        metadata={"help": "second: |E[g phi] - E[g^2] phi^2 / 2| (paper); first: |E[g phi]|", "choices": ORDERS},
    )
    template: str = field(
        default="lorapar",
        metadata={
            "help": "prompt/response template (as train_sft.py: score the responses that are trained)",
            "choices": TEMPLATES,
        },
    )
    max_len: int = field(default=512, metadata={"help": "tokens per example; longer ones are cut from the right"})
    # LoraInit's init drawn as the authors score: with lora's B = 0 every A-score would be zero.
    init: str = field_of(LoraInit, "init", default="gaussian")
    seed: int = field(default=0, metadata={"help": "seed of the example sampling and of the adapter init"})
    batch_size: int = field(
        default=4,
        metadata={
            "help": "examples per forward/backward (1 = the one-at-a-time reference); per-example gradients either way"
        },
    )

    def __post_init__(self) -> None:
        LoraSettings.__post_init__(self)
        LoraInit.__post_init__(self)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        check_fields(self, non_negative=("seed",))

    def lora_args(self) -> LoraArgs:
        """The scored adapter's LoraArgs: these settings, every LoraInit field and the seed."""
        drawn = {f.name: getattr(self, f.name) for f in fields(LoraInit)}
        return self.to_lora_args(**drawn, seed=self.seed)


@dataclass
class EncodedSet:
    """One system's scoring examples as (input_ids, labels) rows, with what happened on the way."""

    rows: list[tuple[list[int], list[int]]]
    truncated: int  # cut to max_len (still scored on the answer tokens that remain)
    no_answer_tokens: int  # cut so far that no answer token remains: cannot be scored, left out


def select_examples(examples: Sequence[Example], system: int, samples: int, seed: int) -> tuple[list[Example], int]:
    """A seeded sample (in file order) of up to `samples` examples labelled `system`, and how many exist."""
    pool = [e for e in examples if e.system == system]
    chosen = sorted(random.Random(seed * 1000 + system).sample(range(len(pool)), min(samples, len(pool))))
    return [pool[i] for i in chosen], len(pool)


def encode_for_scoring(examples: Sequence[Example], tokenizer, args: ImportanceArgs) -> EncodedSet:
    """The scored rows: what SFT trains on, except that under the lorapar template they are tokenised as
    example.py's collate_fn does, the question + EOS and the answer as written with no BOS and no final EOS."""
    authors = args.template == "lorapar"
    rows, truncated, empty = [], 0, 0
    for example in examples:
        prompt = format_prompt(example, args.template, chat=chat_format(tokenizer))
        response = format_response(example, args.template)
        input_ids, labels, was_cut = encode_example(
            tokenizer,
            prompt,
            response,
            args.max_len,
            bos=not authors,
            prompt_eos=prompt_ends_with_eos(args.template),
            response_eos=not authors,
        )
        truncated += was_cut
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never a target
            empty += 1
            continue
        rows.append((input_ids, labels))
    return EncodedSet(rows, truncated, empty)


@dataclass
class GradientMoments:
    """sum_i g_i and sum_i g_i^2 per LoRA element (flat, in `keys` order), over `count` examples.

    `shapes` are those of the sums held: whole tensors, or under --fsdp this rank's dim-0 `rows` [start, stop)
    of each (lorapar/fsdp.py; count and tokens are then the totals over all ranks)."""

    keys: list[str]
    shapes: list[torch.Size]
    sum_grad: torch.Tensor
    sum_grad_sq: torch.Tensor
    count: int
    tokens: int  # answer tokens seen
    rows: Optional[list[tuple[int, int]]] = None  # None: the sums cover whole tensors

    def all_reduce(self, info: DistInfo) -> None:
        """Sum over ranks: every rank ends with the moments of all examples."""
        if not info.enabled:
            return
        totals = torch.tensor([self.count, self.tokens], dtype=torch.float64, device=self.sum_grad.device)
        all_reduce_sum(self.sum_grad, info)
        all_reduce_sum(self.sum_grad_sq, info)
        all_reduce_sum(totals, info)
        self.count, self.tokens = int(totals[0]), int(totals[1])


def example_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean NLL over the answer tokens of one example (1-D input_ids / labels), and their count."""
    total, count = answer_nll(model, input_ids[None], labels[None])
    return total / count, count


MomentAdder = Callable[[str, torch.Tensor], None]  # (peft key, fp32 per-example gradients (b, *shape)) -> None


def add_into(sums: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> MomentAdder:
    """The MomentAdder of whole tensors: the batch's sum g and sum g^2 added into sums[peft key]."""

    def add(key: str, g: torch.Tensor) -> None:
        total, total_sq = sums[key]
        total.add_(g.sum(0))
        total_sq.add_(g.square().sum(0))

    return add


def accumulate_batch(
    model: nn.Module, batch, add_moments: MomentAdder, backward: Optional[Callable[[torch.Tensor], None]] = None
) -> int:
    """Per-example gradients of a right-padded batch, handed to add_moments(peft key, g) per tensor (add_into:
    summed into whole tensors; under FSDP into this rank's rows); returns the batch's answer-token count.

    The backward pass runs once on the sum of the per-example mean losses; a hook on each LoRA
    module's output receives dy (b, T, out) and, since example b's loss reaches only row b, forms
    its gradients of y = x W0^T + s (x A^T) B^T from its input x (b, T, in):

        dB_b = s * sum_t dy_bt^T (x_bt A^T)        dA_b = s * sum_t (dy_bt B)^T x_bt

    Right padding changes nothing: padded positions come after every real token (causal attention)
    and carry no loss, so their dy is exactly zero. `backward(loss)` runs the hooks: by default
    torch.autograd.grad over the LoRA parameters (the summed gradient itself is not needed); under
    FSDP, whose sharded parameters autograd.grad cannot reach, loss.backward() (lorapar/fsdp.py).
    """
    modules = lora_modules(model)
    if any(m.mask_A is not None or m.mask_B is not None for m in modules.values()):
        raise ValueError("batched scoring needs an adapter without element masks (score a fresh adapter)")
    if backward is None:
        params = [p for _, p in named_lora_parameters(model)]
        backward = lambda loss: torch.autograd.grad(loss, params)  # noqa: E731

    def hook(name: str, module: LoRALinear):
        def on_forward(_module, inputs, output):
            x = inputs[0].detach()

            def on_output_grad(dy: torch.Tensor) -> None:
                A, B = module.lora_A.detach().to(dy.dtype), module.lora_B.detach().to(dy.dtype)
                per_example = {
                    "A": module.scale * torch.einsum("btr,bti->bri", dy @ B, x),
                    "B": module.scale * torch.einsum("bto,btr->bor", dy, x @ A.T),
                }
                for which, g in per_example.items():
                    add_moments(peft_key(name, which), g.float())

            output.register_hook(on_output_grad)

        return on_forward

    device = model.tok_embeddings.weight.device
    handles = [m.register_forward_hook(hook(name, m)) for name, m in modules.items()]
    try:
        padded = collate([{"input_ids": ids, "labels": lab} for ids, lab in batch], pad_id=0)  # pads carry no loss
        input_ids, labels = padded["input_ids"].to(device), padded["labels"].to(device)
        logp, mask = target_logprobs(model, input_ids, labels)
        counts = mask.sum(1)
        backward((-logp.sum(1) / counts).sum())
    finally:
        for handle in handles:
            handle.remove()
    return int(counts.sum())


def accumulate_moments(
    model: nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 1,
    progress: Optional[str] = None,
) -> GradientMoments:
    """Per-example gradients of `example_loss`, summed into running moments.

    batch_size 1: torch.autograd.grad one example at a time (the reference). batch_size > 1: one
    forward/backward per batch with the per-example gradients formed in `accumulate_batch`; the two
    agree up to float rounding (tested).
    """
    named = named_lora_parameters(model)
    if not named:
        raise RuntimeError("accumulate_moments: the model has no LoRA modules (apply the scoring adapter first)")
    keys, params = [k for k, _ in named], [p for _, p in named]
    device = params[0].device
    sizes = [p.numel() for p in params]
    sum_grad = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    sum_grad_sq = torch.zeros_like(sum_grad)
    grad_views = [v.view(p.shape) for v, p in zip(sum_grad.split(sizes), params)]
    grad_sq_views = [v.view(p.shape) for v, p in zip(sum_grad_sq.split(sizes), params)]
    tokens = 0
    # Eval mode, no dropout: the scores describe the model as it is.
    with eval_mode(model), tqdm(total=len(rows), desc=progress, disable=progress is None, unit="ex") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            if batch_size == 1:
                ((input_ids, labels),) = batch
                loss, count = example_loss(
                    model, torch.tensor(input_ids, device=device), torch.tensor(labels, device=device)
                )
                grads = [g.float() for g in torch.autograd.grad(loss, params)]
                torch._foreach_add_(grad_views, grads)
                torch._foreach_addcmul_(grad_sq_views, grads, grads)
                tokens += count
            else:
                tokens += accumulate_batch(model, batch, add_into(dict(zip(keys, zip(grad_views, grad_sq_views)))))
            bar.update(len(batch))
    return GradientMoments(keys, [p.shape for p in params], sum_grad, sum_grad_sq, len(rows), tokens)


def importance_scores(
    sum_grad: torch.Tensor, sum_grad_sq: torch.Tensor, count: int, phi: torch.Tensor, order: str = "second"
) -> torch.Tensor:
    """I(phi) element by element (see the module docstring) from the moment sums over `count` examples."""
    if count == 0:
        raise ValueError("no examples were scored; importance is undefined")
    mean_grad_phi = sum_grad / count * phi
    if order == "second":
        return (mean_grad_phi - 0.5 * (sum_grad_sq / count) * phi.square()).abs_()
    if order == "first":
        return mean_grad_phi.abs_()
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def importance_from_moments(
    model: nn.Module, moments: GradientMoments, order: str = "second"
) -> dict[str, torch.Tensor]:
    """{peft key: I(phi)} from the moments and the adapter's current values (see the module docstring)."""
    if moments.rows is not None:
        raise ValueError(
            "importance_from_moments: these moments hold one rank's rows; "
            "lorapar.fsdp_scoring.score_rows_sharded forms and gathers sharded scores"
        )
    named = named_lora_parameters(model)
    keys = [k for k, _ in named]
    if keys != moments.keys:
        differing = sorted(set(keys) ^ set(moments.keys))[:3] or "the same keys in another order"
        raise ValueError(
            f"importance_from_moments: the model's LoRA parameters differ from those the moments were taken on "
            f"({len(keys)} vs {len(moments.keys)} tensors; differing keys: {differing})"
        )
    phi = torch.cat([p.detach().float().reshape(-1) for _, p in named])
    scores = importance_scores(moments.sum_grad, moments.sum_grad_sq, moments.count, phi, order)
    sizes = [s.numel() for s in moments.shapes]
    return {k: v.view(s) for k, s, v in zip(moments.keys, moments.shapes, scores.cpu().split(sizes))}


def score_rows(
    model: nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    order: str = "second",
    info: DistInfo = DistInfo(),
    progress: Optional[str] = None,
    batch_size: int = 1,
) -> tuple[dict[str, torch.Tensor], GradientMoments]:
    """Importance over `rows`; under torchrun each rank takes every world_size-th row."""
    share = rows[info.rank :: info.world_size]
    moments = accumulate_moments(model, share, batch_size=batch_size, progress=progress if info.is_main else None)
    moments.all_reduce(info)
    return importance_from_moments(model, moments, order), moments
