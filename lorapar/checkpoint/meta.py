"""Meta's checkpoint format: params.json + consolidated.NN.pth, one shard per model-parallel rank."""

from __future__ import annotations

import glob
import os

import torch

from lorapar.checkpoint.common import CheckpointError, TensorEntry, load_torch_file, read_json
from lorapar.config import ModelArgs

# Meta's model-parallel layout: ColumnParallelLinear (split along the output rows), RowParallelLinear
# (split along the input columns), ParallelEmbedding (split along the embedding dim); norms are replicated.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
META_IGNORED_KEYS = {"rope.freqs"}  # Meta's precomputed rotary table; recomputed from rope_theta
# Meta's llama3 reference (apply_scaling) hard-codes these; params.json says only "use_scaled_rope": true.
META_LLAMA3_ROPE = dict(
    rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=8192
)


def open_meta(directory: str) -> tuple[ModelArgs, dict[str, TensorEntry]]:
    params_path = os.path.join(directory, "params.json")
    params = read_json(params_path)
    paths = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
    if not paths:
        raise FileNotFoundError(f"{directory}: params.json found but no consolidated.NN.pth shard")
    shards = [load_torch_file(p, "a Meta consolidated.NN.pth shard") for p in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())[:3]
            raise CheckpointError(f"{path}: keys differ from {paths[0]} (e.g. {diff}); shards must hold the same keys")
    if params.get("vocab_size", -1) <= 0:  # Meta's release says -1: the tokenizer (= the embedding) decides
        if "tok_embeddings.weight" not in shards[0]:
            raise CheckpointError(f"{paths[0]}: missing key 'tok_embeddings.weight' (needed for vocab_size)")
        params = {**params, "vocab_size": shards[0]["tok_embeddings.weight"].shape[0]}
    params = _meta_rope_scaling(params, params_path)
    try:
        args = ModelArgs.from_dict(params, params_path)
    except (TypeError, ValueError) as err:
        raise CheckpointError(str(err)) from err

    def merge(key: str) -> torch.Tensor:
        parts = [shard[key] for shard in shards]
        dim = META_SHARD_DIM.get(key.split(".")[-2])
        if dim is None:  # replicated on every rank
            for path, part in zip(paths[1:], parts[1:]):
                if not torch.equal(part, parts[0]):
                    raise CheckpointError(f"{path}: replicated tensor {key!r} differs from {paths[0]}")
            return parts[0]
        try:
            return torch.cat(parts, dim=dim)
        except RuntimeError as err:
            raise CheckpointError(f"{directory}: shards of {key!r} cannot be joined along dim {dim} ({err})") from err

    file = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} shards)"
    return args, {k: TensorEntry(file, k, lambda k=k: merge(k)) for k in shards[0] if k not in META_IGNORED_KEYS}


def _meta_rope_scaling(params: dict, path: str) -> dict:
    """params.json's LLaMA-3.1/3.2 "use_scaled_rope" (+ optional "rope_scaling_factor") -> ModelArgs fields."""
    params = dict(params)
    if not params.pop("use_scaled_rope", False):
        return params
    scaling = {**META_LLAMA3_ROPE}
    factor = params.pop("rope_scaling_factor", None)
    if factor is not None:
        scaling["rope_scaling_factor"] = float(factor)
    return {**scaling, **params}


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it, plus lorapar's extra fields only where they differ from Meta's implicit values."""
    meta_keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps")
    params = {k: getattr(args, k) for k in meta_keys}
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    implied = ModelArgs(**{**params, "hidden_dim": None})
    extras = {
        "hidden_dim": (args.ffn_hidden_dim, implied.ffn_hidden_dim),
        "rope_theta": (args.rope_theta, 10000.0),
        "max_seq_len": (args.max_seq_len, 4096),
        "tie_embeddings": (args.tie_embeddings, False),
        "qkv_bias": (args.qkv_bias, False),
    }
    params.update({k: value for k, (value, meta_value) in extras.items() if value != meta_value})
    if args.rope_scaling_factor is not None:
        scaling = {k: getattr(args, k) for k in META_LLAMA3_ROPE}
        # Meta's own spelling when the rest is Meta's fixed choice; lorapar's fields otherwise.
        if {**scaling, "rope_scaling_factor": 8.0} == META_LLAMA3_ROPE:
            params["use_scaled_rope"] = True
            if args.rope_scaling_factor != 8.0:
                params["rope_scaling_factor"] = args.rope_scaling_factor
        else:
            params.update(scaling)
    return params
