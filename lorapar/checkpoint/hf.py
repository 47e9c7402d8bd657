"""Hugging Face's checkpoint format: config.json + model.safetensors (or shards listed in
model.safetensors.index.json; pytorch_model*.bin as a fallback), families llama and qwen2."""

from __future__ import annotations

import os

import torch

from lorapar.checkpoint.common import CheckpointError, TensorEntry, load_torch_file, model_args_from, read_json
from lorapar.checkpoint.names import HF_IGNORED_SUFFIX, hf_rows_to_meta, hf_to_meta_name
from lorapar.config import ModelArgs
from lorapar.io import named_errors

HF_MODEL_TYPES = ("llama", "qwen2")


def _hf_rope(cfg: dict, path: str) -> dict:
    """rope_theta and llama3 scaling from transformers' `rope_parameters` (v5) and/or `rope_theta` + `rope_scaling`."""
    theta, scaled = cfg.get("rope_theta"), []
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key) or {}
        theta = rope.get("rope_theta", theta)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise CheckpointError(f"{path}: {key}={rope!r} is not supported (expected rope_type 'default' or 'llama3')")
        if kind == "llama3":
            missing = [k for k in ("factor", "original_max_position_embeddings") if k not in rope]
            if missing:
                raise CheckpointError(f"{path}: {key} of type llama3 misses {missing}")
            scaled.append(
                dict(
                    rope_scaling_factor=float(rope["factor"]),
                    rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                    rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                    rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
                )
            )
    if len(scaled) == 2 and scaled[0] != scaled[1]:
        raise CheckpointError(f"{path}: rope_parameters and rope_scaling disagree ({scaled[0]} vs {scaled[1]})")
    return dict(rope_theta=10000.0 if theta is None else float(theta), **(scaled[0] if scaled else {}))


def hf_args(cfg: dict, path: str) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported (expected one of {HF_MODEL_TYPES})")
    unsupported = {  # key: (value, what lorapar implements); Qwen2's q/k/v biases are implied by its model_type
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "attention_bias": (cfg.get("attention_bias", False), False),
        "mlp_bias": (cfg.get("mlp_bias", False), False),
        "use_sliding_window": (cfg.get("use_sliding_window", False), False),
    }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise CheckpointError(f"{path}: {key}={value!r} is not supported (expected {expected!r})")
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}")
    args = model_args_from(
        path,
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",
        **_hf_rope(cfg, path),
    )
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise CheckpointError(
            f"{path}: head_dim={cfg['head_dim']} differs from hidden_size / num_attention_heads = {args.head_dim}"
        )
    return args


class WeightFile:
    """Lazy access to one HF weight file: safetensors through safe_open, a .bin through torch.load(mmap=True)."""

    def __init__(self, path: str):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with named_errors(path, "a safetensors weight file"):
                self._file = safe_open(path, framework="pt", device="cpu")
            self.keys, self.get = list(self._file.keys()), self._file.get_tensor
        else:
            tensors = load_torch_file(path, "a PyTorch weight file")
            self.keys, self.get = list(tensors), tensors.__getitem__


def hf_weight_map(directory: str) -> dict[str, str]:
    """HF key -> the file holding it, from the single weight file or from the shard index."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        single_path, index_path = os.path.join(directory, single), os.path.join(directory, index)
        if os.path.isfile(single_path):
            return {key: single_path for key in WeightFile(single_path).keys}
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: missing key 'weight_map'")
            for key, file in weight_map.items():
                if not os.path.isfile(os.path.join(directory, file)):
                    raise FileNotFoundError(f"{index_path}: shard {file!r} (holding {key!r}) not found in {directory}")
            return {key: os.path.join(directory, file) for key, file in weight_map.items()}
    raise FileNotFoundError(
        f"{directory}: config.json found but no model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )


def open_hf(directory: str) -> tuple[ModelArgs, dict[str, TensorEntry]]:
    config_path = os.path.join(directory, "config.json")
    args = hf_args(read_json(config_path), config_path)
    files: dict[str, WeightFile] = {}  # opened on first use, once each

    def read(path: str, key: str, name: str) -> torch.Tensor:
        if path not in files:
            files[path] = WeightFile(path)
        return hf_rows_to_meta(name, files[path].get(key), args)

    entries = {}
    for key, path in hf_weight_map(directory).items():
        if key.endswith(HF_IGNORED_SUFFIX):
            continue
        try:
            name = hf_to_meta_name(key)
        except KeyError:
            raise CheckpointError(f"{path}: unknown key {key!r} (not a LLaMA/Qwen2 weight)") from None
        entries[name] = TensorEntry(path, key, lambda p=path, k=key, n=name: read(p, k, n))
    return args, entries


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for transformers: Qwen2ForCausalLM when the model has q/k/v biases, LlamaForCausalLM otherwise.

    Both rope spellings are written (`rope_theta` + `rope_scaling` for transformers 4, `rope_parameters`
    for 5), so either version reads the same rotary frequencies.
    """
    rope_scaling = None
    if args.rope_scaling_factor is not None:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    rope_parameters = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta}
    family = (
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
        if (args.qkv_bias)
        else {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False}
    )
    return {
        **family,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "head_dim": args.head_dim,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
