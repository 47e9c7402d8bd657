"""Log-probabilities of target tokens without materialising the full logits tensor.

Labels follow the usual causal-LM convention: `labels` has the shape of `input_ids`, holds the token
id where a loss is wanted and -100 elsewhere (prompt, padding); position t is predicted from the
hidden state at t-1. Logits are computed only at the positions that carry a label, in chunks, each
chunk recomputed in backward (activation checkpointing), so the peak memory of the output layer is
one chunk of `chunk_tokens x vocab` floats rather than `batch x length x vocab`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logprobs(output: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = output(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def selected_logprobs(
    output: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """log softmax(output(hidden) / temperature)[targets] for packed rows hidden (N, dim), targets (N,)."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, output, h, y, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(output, h, y, temperature))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def target_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled targets.

    Returns (logp, mask), both (B, T-1): logp[b, t] = log p(labels[b, t+1] | input_ids[b, :t+1]) where
    mask[b, t] is true, and 0 elsewhere (no logits are ever formed at unlabelled positions).
    """
    hidden = model(input_ids, return_hidden=True)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    packed = selected_logprobs(
        model.output, hidden[mask], targets[mask], temperature=temperature, chunk_tokens=chunk_tokens
    )
    logp = torch.zeros(mask.shape, dtype=packed.dtype, device=packed.device)
    return logp.masked_scatter(mask, packed), mask


def answer_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 1024):
    """(sum of negative log-likelihood over labelled tokens, number of labelled tokens).

    Returning the sum and the count lets a trainer divide by the token count of the whole optimizer
    step (all micro-batches, all ranks), so the update does not depend on how the batch was split.
    """
    hidden = model(input_ids, return_hidden=True)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = selected_logprobs(model.output, hidden[mask], targets[mask], chunk_tokens=chunk_tokens)
    return -logp.sum(), int(mask.sum())
