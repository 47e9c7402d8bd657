"""Batched sampling with a KV cache: prefill the left-padded prompts once, then decode one token per step.

Prompts of different lengths are left-padded to a common length so that every row's next token sits
in the same cache slot; the model's `pad` argument masks the padding keys and shifts each row's rotary
positions, so a padded row computes what it would compute alone (to float rounding). A row that emits a stop id
is removed from the batch (and from the cache), so finished rows cost nothing.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorapar.model import KVCache, Transformer, eval_mode


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, the stop token included when one was hit
    logprobs: list[list[float]]  # log-prob of each new token under the distribution it was drawn from
    finished: list[bool]  # True: hit a stop id; False: ran out of max_new_tokens


def prefill(model: Transformer, tokens: torch.Tensor, pad: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
    """Run the prompts (B, T) through the model filling cache slots [0, T); logits of the last slot (B, V)."""
    hidden = model(tokens, start_pos=0, pad=pad, cache=cache, return_hidden=True)
    return model.output(hidden[:, -1]).float()  # the vocabulary projection only where it is needed


def decode_step(
    model: Transformer, token: torch.Tensor, pos: int, pad: Optional[torch.Tensor], cache: KVCache
) -> torch.Tensor:
    """Feed one token per row (B,) at cache slot `pos`; logits for the next one (B, V)."""
    return model(token[:, None], start_pos=pos, pad=pad, cache=cache)[:, -1]


@contextmanager
def prepacked_linears(model: Transformer, rows: int) -> Iterator[None]:
    """While inside, each plain nn.Linear multiplies `rows`-row inputs with a weight MKL packed in advance.

    A small-batch fp32 sgemm on the CPU re-packs the whole weight matrix on every call, which costs
    several times streaming it once (bench/bench_decode.py measures it; figures in the README); decoding
    repeats the same product every step, so the packing is paid once here. Costs a second copy of the weights while
    inside. Inputs with another row count (the prefill, a batch shrunk by finished rows) use the plain
    weight; LoRA modules keep their own forward. A no-op for one row (a matrix-vector product packs
    nothing and is faster unpacked), off the CPU, for other dtypes or without MKL.
    """
    weight = model.tok_embeddings.weight
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    if rows == 1 or not (cpu_fp32 and torch.backends.mkl.is_available()):
        yield
        return
    patched = [m for m in model.modules() if type(m) is nn.Linear and m.bias is None]
    for module in patched:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), rows)
        module.forward = partial(_packed_linear, packed=packed, weight=module.weight, rows=rows)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to nn.Linear.forward


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: Optional[torch.Generator | list[torch.Generator]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token (B,) and its log-prob (B,) under logits / temperature (before top-k/top-p truncation).

    generator: one for the batch, or a list with one per row (each row then draws from its own).
    """
    if temperature <= 0.0:
        token = logits.argmax(-1)
        return token, F.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    logprobs = F.log_softmax(logits / temperature, -1)
    kept = logprobs
    if top_k > 0 and top_k < kept.shape[-1]:
        kth = kept.topk(top_k, dim=-1).values[:, -1:]
        kept = kept.masked_fill(kept < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = kept.sort(-1, descending=True)
        probs = sorted_lp.exp()
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p * probs.sum(-1, keepdim=True)
        kept = kept.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    probs = kept.softmax(-1)
    if isinstance(generator, list):
        token = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    else:
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, logprobs.gather(-1, token[:, None])[:, 0]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int | Sequence[int]] = None,
    stop_ids: Optional[Sequence[int]] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    prepack: bool = False,
) -> Generation:
    """Sample up to `max_new_tokens` after each prompt (greedy when temperature == 0).

    seed: draws come from a torch.Generator seeded with it, so the same call gives the same tokens;
    None uses torch's global generator. A list of seeds, one per row, gives every row its own generator:
    a row's tokens then do not depend on which other rows share the batch (to float rounding of the
    logits), which lets GRPO split its prompts over ranks freely. A row stops at `eos_id` or any of
    `stop_ids`: pass `tokenizer.stop_ids`, every id that ends a turn in the tokenizer's family (ChatML's
    <|im_end|> and <|endoftext|>, LLaMA-3's <|eot_id|> and <|end_of_text|>, LLaMA-2's </s>).
    prepack: CPU fp32 only, see `prepacked_linears`: faster batched decoding once the one-off packing is
    amortised (tens of new tokens), twice the weight memory; results agree with the default to float
    rounding, not bit for bit.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if not 0.0 < top_p <= 1.0 or top_k < 0 or max_new_tokens < 0:
        raise ValueError(
            f"generate: need 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 0 (got {top_p}, {top_k}, {max_new_tokens})"
        )
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.args.max_seq_len:
        raise ValueError(
            f"generate: longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len ({model.args.max_seq_len})"
        )
    device = model.tok_embeddings.weight.device
    stops = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    generator = None if seed is None else _generators(seed, len(prompts), device)

    B = len(prompts)
    tokens = torch.full((B, longest), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
    pad_counts = torch.tensor([longest - len(p) for p in prompts], device=device)
    pad = pad_counts if bool(pad_counts.any()) else None  # unpadded batches take the mask-free fast path

    out_tokens: list[list[int]] = [[] for _ in range(B)]
    out_logprobs: list[list[float]] = [[] for _ in range(B)]
    finished = [False] * B
    if max_new_tokens == 0:
        return Generation(out_tokens, out_logprobs, finished)

    with eval_mode(model), _grad_off(model), prepacked_linears(model, B) if prepack else nullcontext():
        cache = model.new_cache(B, longest + max_new_tokens)
        logits = prefill(model, tokens.to(device), pad, cache)
        active = list(range(B))  # original row of each batch row still decoding
        for step in range(max_new_tokens):
            rows_generator = [generator[row] for row in active] if isinstance(generator, list) else generator
            token, logprob = sample(logits, temperature, top_k, top_p, rows_generator)
            keep = []
            for i, (row, t, lp) in enumerate(zip(active, token.tolist(), logprob.tolist())):
                out_tokens[row].append(t)
                out_logprobs[row].append(lp)
                if t in stops:
                    finished[row] = True
                else:
                    keep.append(i)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.keep_rows(index)
                token = token[index]
                pad = pad[index] if pad is not None else None
                active = [active[i] for i in keep]
            logits = decode_step(model, token, longest + step, pad, cache)
    return Generation(out_tokens, out_logprobs, finished)


def _grad_off(model: nn.Module):
    """inference_mode, except for an FSDP-sharded model (--fsdp): FSDP2 reuses its all-gather buffers
    across calls, and a buffer created under inference_mode cannot be written outside it (training would fail)."""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


def _generators(seed: int | Sequence[int], rows: int, device: torch.device) -> torch.Generator | list[torch.Generator]:
    """One generator seeded with `seed`, or one per row for a sequence of `rows` seeds."""
    if not isinstance(seed, Sequence):
        return torch.Generator(device).manual_seed(int(seed))
    if len(seed) != rows:
        raise ValueError(f"generate: {len(seed)} seeds for {rows} prompts; pass one seed, or one per prompt")
    return [torch.Generator(device).manual_seed(s) for s in seed]
