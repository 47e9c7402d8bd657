"""Log-probabilities of target tokens without materialising the full logits tensor.

Labels follow the usual causal-LM convention: `labels` has the shape of `input_ids`, holds the token
id where a loss is wanted and -100 elsewhere (prompt, padding); position t is predicted from the
hidden state at t-1. Logits are formed only at the positions that carry a label, `chunk_tokens` rows
at a time, and are never saved for backward (see `LinearLogSoftmaxGather`), so the output layer costs
one `chunk_tokens x vocab` fp32 buffer at a time instead of `batch x length x vocab` logits plus their
log-softmax and gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the output GEMM runs in: autocast's when it is on (as nn.Linear would), else hidden's."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """hidden W^T / t in W's dtype, returned in at least fp32."""
    logits = F.linear(hidden.to(weight.dtype), weight).to(torch.promote_types(weight.dtype, torch.float32))
    return logits.div_(temperature) if temperature != 1.0 else logits


class LinearLogSoftmaxGather(torch.autograd.Function):
    """logp_i = log softmax(h_i W^T / t)[y_i] for rows h (n, dim), targets y (n,), never saving logits.

    forward   z = h W^T / t,   lse_i = log sum_v exp z_{i, v},   logp_i = z_{i, y_i} - lse_i
    backward  p = exp(z - lse); with g_i = dL/dlogp_i
              dz = g (onehot(y) - p),   dh = dz W / t,   dW = dz^T h / t
    logp_i depends on row h_i alone, so dh_i = g_i J_i with J_i = (onehot(y_i) - p_i) W / t. With W
    frozen (LoRA) and a backward to come (`jacobian_now`), forward computes J from the p it already
    has and saves it, and backward is one multiply: the logits are formed once per step. Otherwise
    forward saves h and lse, and backward recomputes z bit for bit. Softmax statistics are in at
    least fp32 whatever the GEMM dtype; each pass holds one (n, vocab) buffer, transformed in place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, jacobian_now: bool):
        with torch.autocast(hidden.device.type, enabled=False):
            buffer = _logits(hidden, weight, temperature)
            target_logits = buffer.gather(1, targets[:, None]).squeeze(1)
            row_max = buffer.amax(dim=1)
            exp_sum = buffer.sub_(row_max[:, None]).exp_().sum(dim=1)
            lse = row_max + exp_sum.log()
            ctx.jacobian_now = jacobian_now and not ctx.needs_input_grad[1]
            if ctx.jacobian_now:
                p_minus_onehot = buffer.div_(exp_sum[:, None])
                p_minus_onehot[torch.arange(len(targets), device=buffer.device), targets] -= 1.0
                ctx.hidden_dtype = hidden.dtype
                ctx.save_for_backward((p_minus_onehot.to(weight.dtype) @ weight).div_(-temperature))
            else:
                ctx.temperature = temperature
                ctx.save_for_backward(hidden, weight, targets, lse)
        return target_logits - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.jacobian_now:
            (jacobian,) = ctx.saved_tensors
            return (grad[:, None] * jacobian).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            dz = _logits(hidden, weight, ctx.temperature)
            dz.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
            dz.scatter_add_(1, targets[:, None], grad[:, None])
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            dz = dz.to(weight.dtype)
            dh = (dz @ weight).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            dw = dz.t() @ hidden.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def selected_logprobs(
    output: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, chunk_tokens: int = 256
) -> torch.Tensor:
    """log softmax(output(hidden) / temperature)[targets] for packed rows hidden (N, dim), targets (N,).

    `output` is the model's bias-free output projection, an nn.Linear: its weight is used directly.
    """
    if not isinstance(output, nn.Linear) or output.bias is not None:
        raise ValueError(f"selected_logprobs: the output projection must be a bias-free nn.Linear, got {output!r}")
    # Known here, not inside forward (which always runs with grad off and sees needs_input_grad regardless).
    jacobian_now = torch.is_grad_enabled() and hidden.requires_grad
    weight = output.weight.to(_matmul_dtype(hidden))  # cast once for all chunks, as autocast would per call
    pieces = [
        LinearLogSoftmaxGather.apply(
            hidden[start : start + chunk_tokens],
            weight,
            targets[start : start + chunk_tokens],
            float(temperature),
            jacobian_now,
        )
        for start in range(0, hidden.shape[0], chunk_tokens)
    ]
    if not pieces:  # no labelled token: an empty result that still belongs to the graph, so backward() works
        return hidden[:, 0].float() * 0.0
    return torch.cat(pieces)


def target_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
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


def answer_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 256):
    """(sum of negative log-likelihood over labelled tokens, number of labelled tokens).

    Returning the sum and the count lets a trainer divide by the token count of the whole optimizer
    step (all micro-batches, all ranks), so the update does not depend on how the batch was split.
    """
    hidden = model(input_ids, return_hidden=True)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = selected_logprobs(model.output, hidden[mask], targets[mask], chunk_tokens=chunk_tokens)
    return -logp.sum(), int(mask.sum())
