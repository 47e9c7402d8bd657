"""The LLaMA family as Meta defines it, with Meta's module names and interleaved rotary embeddings.

LLaMA-2, LLaMA-3.x, Qwen2/2.5 and SmolLM2 are this one model with different ModelArgs: Qwen2's q/k/v
biases are frozen parameters added to the bias-free projections' output (so LoRA, the fused masked
kernels and DM-LoRA wrap the projection unchanged), LLaMA-3.1's rope scaling changes only the rotary
frequencies.

Shapes: B batch, T new tokens, L key length (cache slots in use), H query heads, K key/value heads,
D head dim. One forward serves training (no cache, causal) and decoding (a `KVCache`, `start_pos`
naming the first cache slot the new tokens occupy, `pad` the number of left-padding slots per row).
With left padding a row's rotary position is its slot minus its padding, so a padded prompt sees
exactly the positions it would see alone.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorapar.config import ModelArgs
from lorapar.swiglu import SwiGLU, down_input_rebuilt


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) for the block; the previous mode comes back afterwards, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 loses the mean of squares), scale in the input dtype, as Meta does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: Optional[torch.device] = None) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2 (fp64), with LLaMA-3.1's "llama3" scaling when rope_scaling_factor is set.

    llama3 scaling (Meta's apply_scaling) by wavelength w = 2 pi / f, with c the original context:
      w < c / high_freq_factor: f unchanged;   w > c / low_freq_factor: f / factor;
      between:  (1 - s) f / factor + s f,   s = (c / w - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    D = args.head_dim
    freq = 1.0 / args.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)
    factor = args.rope_scaling_factor
    if factor is None:
        return freq
    low, high, context = args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_max_seq_len
    wavelength = 2 * math.pi / freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0 above c/low, 1 below c/high
    return (1 - smooth) * freq / factor + smooth * freq


def rope_tables(length: int, freq: torch.Tensor) -> torch.Tensor:
    """exp(i * position * freq) for each frequency: complex64 (length, D/2), computed in fp64 then rounded."""
    angles = torch.outer(torch.arange(length, device=freq.device, dtype=torch.float64), freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, D) by `rotation` (B, T, 1, D/2), complex.

    This is Meta's convention, a complex multiply on adjacent pairs (one fused kernel, several times
    faster in decoding than the same rotation spelled with cos/sin). Hugging Face checkpoints rotate
    half-split pairs instead, which lorapar/checkpoint/names.py absorbs by permuting the rows of wq and wk.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every layer for `batch` rows and up to `max_len` slots."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at slots [start, start+T) and return every slot up to start+T."""
        end = start + k.shape[2]
        self.k[layer, : k.shape[0], :, start:end] = k
        self.v[layer, : v.shape[0], :, start:end] = v
        return self.k[layer, : k.shape[0], :, :end], self.v[layer, : v.shape[0], :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (in that order), so finished sequences stop costing compute."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        if args.qkv_bias:  # Qwen2; rows in Meta's rotary order like wq/wk's (checkpoint/names.py permutes them alike)
            self.wq_bias = nn.Parameter(torch.zeros(args.n_heads * args.head_dim))
            self.wk_bias = nn.Parameter(torch.zeros(args.n_kv_heads * args.head_dim))
            self.wv_bias = nn.Parameter(torch.zeros(args.n_kv_heads * args.head_dim))
        else:
            self.wq_bias = self.wk_bias = self.wv_bias = None

    def _project(self, linear: nn.Module, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = linear(x)
        return y if bias is None else y + bias.to(y.dtype)

    def forward(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        cache: Optional[KVCache],
        start_pos: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rotary(self._project(self.wq, self.wq_bias, x).view(B, T, self.n_heads, self.head_dim), rotation)
        k = apply_rotary(self._project(self.wk, self.wk_bias, x).view(B, T, self.n_kv_heads, self.head_dim), rotation)
        v = self._project(self.wv, self.wv_bias, x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)
        causal = attn_mask is None and cache is None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). What it saves for backward: lorapar/swiglu.py."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = SwiGLU.apply(self.w1(x), self.w3(x))
        with down_input_rebuilt(h):
            return self.w2(h)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotation, attn_mask, cache, start_pos):
        h = x + self.attention(self.attention_norm(x), rotation, attn_mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.gradient_checkpointing = False  # recompute each block in backward: activations O(layers) -> O(1)
        self._rope: Optional[torch.Tensor] = None  # computed lazily (meta-device friendly)

    def init_weights(self, seed: int = 0) -> None:
        """Random init for pretraining from scratch: N(0, 0.02), residual projections scaled by depth."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            if name.endswith("_bias"):
                nn.init.zeros_(p)
                continue
            std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def rope(self, length: int, device: torch.device) -> torch.Tensor:
        if self._rope is None or self._rope.shape[0] < length or self._rope.device != device:
            size = max(length, self.args.max_seq_len)
            self._rope = rope_tables(size, rope_frequencies(self.args, device))
        return self._rope

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        weight = self.tok_embeddings.weight
        return KVCache(self.args, batch, max_len, dtype or weight.dtype, weight.device)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int = 0,
        pad: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or the final normed hidden states (B, T, dim) with return_hidden.

        tokens: (B, T) ids occupying cache slots [start_pos, start_pos + T).
        pad:    (B,) left-padding slots per row; those keys are never attended to.
        Training callers pass neither and get plain causal attention (right padding is harmless there
        because padded positions come after every real token and carry no loss).
        """
        B, T = tokens.shape
        device = tokens.device
        end = start_pos + T
        if cache is not None and end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots but tokens reach slot {end}")
        rope = self.rope(end, device)
        slots = torch.arange(start_pos, end, device=device)
        positions = slots.expand(B, T) if pad is None else (slots[None, :] - pad[:, None]).clamp_min(0)
        rotation = rope[positions].unsqueeze(2)
        attn_mask = self._attention_mask(start_pos, T, pad, device) if (cache is not None or pad is not None) else None

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, rotation, attn_mask, cache, start_pos, use_reentrant=False)
            else:
                h = layer(h, rotation, attn_mask, cache, start_pos)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h).float()

    @staticmethod
    def _attention_mask(start_pos: int, T: int, pad: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """Boolean (B or 1, 1, T, start_pos + T): a query sees earlier keys that are not left padding.

        A padding query is allowed to see itself so that its softmax row is never empty: an all-masked
        row gives NaN, and NaN values leak into real rows through 0 * NaN in the attention product.
        """
        if pad is None and T == 1:
            return None  # a single new token may attend to every filled slot
        q_slot = torch.arange(start_pos, start_pos + T, device=device)[:, None]
        k_slot = torch.arange(start_pos + T, device=device)[None, :]
        allowed = k_slot <= q_slot
        if pad is None:
            return allowed[None, None]
        not_pad = k_slot[None] >= pad[:, None, None]
        return ((allowed[None] & not_pad) | (k_slot == q_slot)[None]).unsqueeze(1)
