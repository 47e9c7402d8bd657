"""Hugging Face <-> Meta tensor names and the q/k row permutation, the one place they live.

Inside lorapar every tensor has Meta's name and Meta's rotary layout. Hugging Face rotates half-split
pairs (i, i + D/2) where Meta rotates adjacent pairs (2i, 2i+1), so HF's q/k rows (and Qwen2's q/k
bias entries) are a per-head permutation of Meta's; `hf_to_meta_state_dict` / `meta_to_hf_state_dict`
convert whole state dicts (HF checkpoints, GGUF's Qwen2 tensors, adapter files' q/k B rows).
"""

from __future__ import annotations

import re

import torch

from lorapar.config import ModelArgs

HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # older HF exports store the rotary frequencies; recomputed too

HF_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
HF_BIAS_NAMES = {
    "self_attn.q_proj": "attention.wq_bias",
    "self_attn.k_proj": "attention.wk_bias",
    "self_attn.v_proj": "attention.wv_bias",
}  # Qwen2's frozen biases
META_TOP_NAMES = {v: k for k, v in HF_TOP_NAMES.items()}
META_BIAS_NAMES = {v: k for k, v in HF_BIAS_NAMES.items()}
META_LAYER_NAMES = {v: k for k, v in HF_LAYER_NAMES.items()}


def hf_to_meta_name(key: str) -> str:
    if key in HF_TOP_NAMES:
        return HF_TOP_NAMES[key]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    names = HF_LAYER_NAMES if match is not None and match.group(3) == "weight" else HF_BIAS_NAMES
    if match is None or match.group(2) not in names:
        raise KeyError(key)
    return f"layers.{match.group(1)}.{names[match.group(2)]}" + (".weight" if names is HF_LAYER_NAMES else "")


def meta_to_hf_name(name: str) -> str:
    if name in META_TOP_NAMES:
        return META_TOP_NAMES[name]
    layer, module = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    if module in META_BIAS_NAMES:
        return f"model.layers.{layer}.{META_BIAS_NAMES[module]}.bias"
    return f"model.layers.{layer}.{META_LAYER_NAMES[module.removesuffix('.weight')]}.weight"


def rope_heads(name: str, args: ModelArgs) -> int:
    """How many rotary heads the rows of `name` hold (0: not a rotated projection)."""
    if name.endswith(("attention.wq.weight", "attention.wq_bias")):
        return args.n_heads
    return args.n_kv_heads if name.endswith(("attention.wk.weight", "attention.wk_bias")) else 0


def hf_rows_to_meta(name: str, w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = rope_heads(name, args)
    if not heads:
        return w
    # Per head, HF row j < D/2 and row j + D/2 form pair j; Meta stores that pair at rows 2j, 2j+1.
    return w.view(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_rows_to_hf(name: str, w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = rope_heads(name, args)
    if not heads:
        return w
    return w.view(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_to_meta_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename HF keys to Meta's and un-permute q/k rows; rotary frequency buffers are dropped (recomputed)."""
    out = {}
    for key, value in sd.items():
        if key.endswith(HF_IGNORED_SUFFIX):
            continue
        name = hf_to_meta_name(key)
        out[name] = hf_rows_to_meta(name, value, args)
    return out


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return {meta_to_hf_name(name): meta_rows_to_hf(name, value, args) for name, value in sd.items()}
