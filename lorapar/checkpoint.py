"""Read and write LLaMA-family checkpoints: Meta's consolidated shards, Hugging Face, llama2.c's .bin, GGUF.

`load_model` detects the format from what the path holds:
- a directory with params.json: Meta's release (`consolidated.NN.pth`, one per model-parallel rank);
- a directory with config.json: Hugging Face (`model.safetensors`, or shards listed in
  `model.safetensors.index.json`; `pytorch_model*.bin` as a fallback);
- a `.gguf` file: llama.cpp's format (lorapar.gguf reads it);
- another file: llama2.c's legacy export (7 int32 header, then fp32 tensors in llama2.c's order).

Families: HF `model_type` llama (LLaMA-2, LLaMA-3.x with rope_scaling type llama3, SmolLM2) and qwen2
(Qwen2/2.5: q/k/v biases); Meta's params.json of LLaMA-2 and LLaMA-3.x (`use_scaled_rope`).

Loading never holds two copies of the weights: the model is built on the meta device (no storage),
and each tensor is read on demand from a memory map (torch.load(mmap=True), safetensors, numpy memmap)
and assigned straight into the model, converted to the requested dtype and device.

Inside lorapar every tensor has Meta's name and Meta's rotary layout. Hugging Face rotates half-split
pairs (i, i + D/2) where Meta rotates adjacent pairs (2i, 2i+1), so HF's q/k rows (and Qwen2's q/k
bias entries) are a per-head permutation of Meta's; `hf_to_meta_state_dict` / `meta_to_hf_state_dict`
are the only place it lives.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from lorapar.config import ModelArgs
from lorapar.errors import InputError
from lorapar.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, named_errors
from lorapar.model import Transformer


class CheckpointError(InputError):
    """A checkpoint that cannot be read as asked; the message names the file and key."""


# Meta's model-parallel layout: ColumnParallelLinear (split along the output rows), RowParallelLinear
# (split along the input columns), ParallelEmbedding (split along the embedding dim); norms are replicated.
META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
META_IGNORED_KEYS = {"rope.freqs"}  # Meta's precomputed rotary table; recomputed from rope_theta
HF_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # older HF exports store the rotary frequencies; recomputed too
LLAMA2C_HEADER_BYTES = 7 * 4
LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned exports, which this reader does not implement

HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_BIAS_NAMES = {"self_attn.q_proj": "attention.wq_bias", "self_attn.k_proj": "attention.wk_bias",
                 "self_attn.v_proj": "attention.wv_bias"}  # Qwen2's frozen biases
META_TOP_NAMES = {v: k for k, v in HF_TOP_NAMES.items()}
META_BIAS_NAMES = {v: k for k, v in HF_BIAS_NAMES.items()}
# Meta's llama3 reference (apply_scaling) hard-codes these; params.json says only "use_scaled_rope": true.
META_LLAMA3_ROPE = dict(rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=8192)
META_LAYER_NAMES = {v: k for k, v in HF_LAYER_NAMES.items()}


@dataclass
class _Entry:
    """Where one Meta-named tensor comes from; `read` returns it in Meta's layout (still in the file's dtype)."""

    file: str
    key: str
    read: Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------- names and the q/k permutation


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


def _rope_heads(name: str, args: ModelArgs) -> int:
    """How many rotary heads the rows of `name` hold (0: not a rotated projection)."""
    if name.endswith(("attention.wq.weight", "attention.wq_bias")):
        return args.n_heads
    return args.n_kv_heads if name.endswith(("attention.wk.weight", "attention.wk_bias")) else 0


def _hf_rows_to_meta(name: str, w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = _rope_heads(name, args)
    if not heads:
        return w
    # Per head, HF row j < D/2 and row j + D/2 form pair j; Meta stores that pair at rows 2j, 2j+1.
    return w.view(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _meta_rows_to_hf(name: str, w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = _rope_heads(name, args)
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
        out[name] = _hf_rows_to_meta(name, value, args)
    return out


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    return {meta_to_hf_name(name): _meta_rows_to_hf(name, value, args) for name, value in sd.items()}


# ----------------------------------------------------------------------------- readers (config + lazy tensors)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err


def _model_args(source: str, **fields) -> ModelArgs:
    try:
        return ModelArgs(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err


def _open_meta(directory: str) -> tuple[ModelArgs, dict[str, _Entry]]:
    params_path = os.path.join(directory, "params.json")
    params = _read_json(params_path)
    paths = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
    if not paths:
        raise FileNotFoundError(f"{directory}: params.json found but no consolidated.NN.pth shard")
    shards = [_load_torch_file(p, "a Meta consolidated.NN.pth shard") for p in paths]
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
    return args, {k: _Entry(file, k, lambda k=k: merge(k)) for k in shards[0] if k not in META_IGNORED_KEYS}


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
            scaled.append(dict(rope_scaling_factor=float(rope["factor"]),
                               rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                               rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                               rope_original_max_seq_len=int(rope["original_max_position_embeddings"])))
    if len(scaled) == 2 and scaled[0] != scaled[1]:
        raise CheckpointError(f"{path}: rope_parameters and rope_scaling disagree ({scaled[0]} vs {scaled[1]})")
    return dict(rope_theta=10000.0 if theta is None else float(theta), **(scaled[0] if scaled else {}))


HF_MODEL_TYPES = ("llama", "qwen2")


def _hf_args(cfg: dict, path: str) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported (expected one of {HF_MODEL_TYPES})")
    unsupported = {  # key: (value, what lorapar implements); Qwen2's q/k/v biases are implied by its model_type
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "attention_bias": (cfg.get("attention_bias", False), False), "mlp_bias": (cfg.get("mlp_bias", False), False),
        "use_sliding_window": (cfg.get("use_sliding_window", False), False),
    }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise CheckpointError(f"{path}: {key}={value!r} is not supported (expected {expected!r})")
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}")
    args = _model_args(
        path, dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=model_type == "qwen2", **_hf_rope(cfg, path),
    )
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise CheckpointError(
            f"{path}: head_dim={cfg['head_dim']} differs from hidden_size / num_attention_heads = {args.head_dim}"
        )
    return args


def _load_torch_file(path: str, expected: str) -> dict:
    """torch.load (memory-mapped, tensors only) with an error naming the file when it is truncated or corrupt."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: not readable as {expected} ({type(error).__name__}: {str(error)[:200]}); "
                              "is it truncated or another kind of file?") from None


class _WeightFile:
    """Lazy access to one HF weight file: safetensors through safe_open, a .bin through torch.load(mmap=True)."""

    def __init__(self, path: str):
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with named_errors(path, "a safetensors weight file"):
                self._file = safe_open(path, framework="pt", device="cpu")
            self.keys, self.get = list(self._file.keys()), self._file.get_tensor
        else:
            tensors = _load_torch_file(path, "a PyTorch weight file")
            self.keys, self.get = list(tensors), tensors.__getitem__


def _hf_weight_map(directory: str) -> dict[str, str]:
    """HF key -> the file holding it, from the single weight file or from the shard index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        single_path, index_path = os.path.join(directory, single), os.path.join(directory, index)
        if os.path.isfile(single_path):
            return {key: single_path for key in _WeightFile(single_path).keys}
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: missing key 'weight_map'")
            for key, file in weight_map.items():
                if not os.path.isfile(os.path.join(directory, file)):
                    raise FileNotFoundError(f"{index_path}: shard {file!r} (holding {key!r}) not found in {directory}")
            return {key: os.path.join(directory, file) for key, file in weight_map.items()}
    raise FileNotFoundError(
        f"{directory}: config.json found but no model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )


def _open_hf(directory: str) -> tuple[ModelArgs, dict[str, _Entry]]:
    config_path = os.path.join(directory, "config.json")
    args = _hf_args(_read_json(config_path), config_path)
    files: dict[str, _WeightFile] = {}  # opened on first use, once each

    def read(path: str, key: str, name: str) -> torch.Tensor:
        if path not in files:
            files[path] = _WeightFile(path)
        return _hf_rows_to_meta(name, files[path].get(key), args)

    entries = {}
    for key, path in _hf_weight_map(directory).items():
        if key.endswith(HF_IGNORED_SUFFIX):
            continue
        try:
            name = hf_to_meta_name(key)
        except KeyError:
            raise CheckpointError(f"{path}: unknown key {key!r} (not a LLaMA/Qwen2 weight)") from None
        entries[name] = _Entry(path, key, lambda p=path, k=key, n=name: read(p, k, n))
    return args, entries


def _open_llama2c(path: str) -> tuple[ModelArgs, dict[str, _Entry]]:
    size = os.path.getsize(path)
    if size < LLAMA2C_HEADER_BYTES:
        raise CheckpointError(f"{path}: truncated llama2.c checkpoint ({size} bytes, the header alone is 28)")
    header = [int(v) for v in np.fromfile(path, dtype="<i4", count=7)]
    if header[0] == LLAMA2C_V1_MAGIC:
        raise CheckpointError(
            f"{path}: llama2.c versioned export (magic 'ak42'); only the legacy (version 0) format is read"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        raise CheckpointError(f"{path}: not a llama2.c legacy checkpoint (header {header} has non-positive sizes)")
    args = _model_args(
        path, dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size), max_seq_len=seq_len, tie_embeddings=vocab_size > 0,  # negative: own classifier
    )
    shapes = _param_shapes(args)
    layer_kinds = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    order: list[tuple[str | None, int]] = [("tok_embeddings.weight", 0)]
    order += [(f"layers.{i}.{kind}.weight", 0) for kind in layer_kinds for i in range(n_layers)]
    order += [("norm.weight", 0), (None, seq_len * args.head_dim)]  # None: the two legacy RoPE tables, skipped
    if not args.tie_embeddings:
        order.append(("output.weight", 0))
    numels = [n if name is None else shapes[name].numel() for name, n in order]
    expected = LLAMA2C_HEADER_BYTES + 4 * sum(numels)
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated llama2.c checkpoint: header {header} needs {expected} bytes, file has {size}"
        )
    if size > expected:
        raise CheckpointError(
            f"{path}: header {header} does not match the file size: it describes {expected} bytes, file has {size}"
        )
    data = np.memmap(path, dtype="<f4", mode="c", offset=LLAMA2C_HEADER_BYTES)  # copy-on-write: no read-only warning
    entries, offset = {}, 0
    for (name, _), numel in zip(order, numels):
        if name is not None:
            view = data[offset : offset + numel].reshape(shapes[name])
            entries[name] = _Entry(path, name, lambda v=view: torch.from_numpy(v))
        offset += numel
    return args, entries


def _open(path: str | os.PathLike) -> tuple[str, ModelArgs, dict[str, _Entry]]:
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(path) and path.endswith(".gguf"):
        from lorapar.gguf import open_gguf

        args, tensors = open_gguf(path)
        return "gguf", args, {name: _Entry(path, key, read) for name, (key, read) in tensors.items()}
    if os.path.isfile(path):
        return "llama2c", *_open_llama2c(path)
    if os.path.isfile(os.path.join(path, "params.json")):
        return "meta", *_open_meta(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", *_open_hf(path)
    raise CheckpointError(
        f"{path}: unrecognised checkpoint directory (expected params.json + consolidated.NN.pth from Meta, "
        f"or config.json + model.safetensors from Hugging Face; found {sorted(os.listdir(path))[:8]})"
    )


def _param_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in Transformer(args).named_parameters()}


def read_model_args(path: str | os.PathLike) -> ModelArgs:
    """The model shape stored with a checkpoint, without reading any weights."""
    return _open(path)[1]


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """A Transformer holding the checkpoint's weights in `dtype` on `device` (eval mode)."""
    _, args, entries = _open(path)
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())  # a tied output head is listed once, as tok_embeddings.weight
    for name in entries.keys() - expected.keys():
        entry = entries[name]
        raise CheckpointError(f"{entry.file}: unexpected key {entry.key!r} for this model configuration")
    for name, param in expected.items():
        if name not in entries:
            raise CheckpointError(f"{path}: missing key {name!r} (Meta name) for this model configuration")
        entry = entries[name]
        tensor = entry.read()
        if tensor.shape != param.shape:
            raise CheckpointError(
                f"{entry.file}: {entry.key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(param.shape)} from the config"
            )
        module_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor.to(device=device, dtype=dtype)))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# ----------------------------------------------------------------------------- writers


def base_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's own weights under Meta names (LoRA keeps its frozen base at `<module>.weight`, so an
    adapted model yields its base; adapters are saved separately). A tied head is stored once."""
    state = model.state_dict()
    return {name: state[name].detach() for name in _param_shapes(model.args)}


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it, plus lorapar's extra fields only where they differ from Meta's implicit values."""
    meta_keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps")
    params = {k: getattr(args, k) for k in meta_keys}
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    implied = ModelArgs(**{**params, "hidden_dim": None})
    extras = {"hidden_dim": (args.ffn_hidden_dim, implied.ffn_hidden_dim), "rope_theta": (args.rope_theta, 10000.0),
              "max_seq_len": (args.max_seq_len, 4096), "tie_embeddings": (args.tie_embeddings, False),
              "qkv_bias": (args.qkv_bias, False)}
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


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for transformers: Qwen2ForCausalLM when the model has q/k/v biases, LlamaForCausalLM otherwise.

    Both rope spellings are written (`rope_theta` + `rope_scaling` for transformers 4, `rope_parameters`
    for 5), so either version reads the same rotary frequencies.
    """
    rope_scaling = None
    if args.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                        "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_max_seq_len}
    rope_parameters = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": args.rope_theta}
    family = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False} if (
        args.qkv_bias) else {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False}
    return {
        **family, "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
        "head_dim": args.head_dim, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage (e.g. a memory-mapped file); copy such views to their own."""
    return t.contiguous() if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_model(model: Transformer, path: str | os.PathLike, format: str = "hf") -> None:
    """Write the base weights as a Hugging Face directory (config.json + model.safetensors) or a Meta
    directory (params.json + consolidated.00.pth), each file atomically."""
    path = str(path)
    state = base_state_dict(model)
    dtype = model.tok_embeddings.weight.dtype
    os.makedirs(path, exist_ok=True)
    if format == "hf":
        tensors = meta_to_hf_state_dict(state, model.args)
        atomic_save_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
        atomic_write_json(os.path.join(path, "config.json"), hf_config(model.args, dtype))
    elif format == "meta":
        atomic_torch_save(os.path.join(path, "consolidated.00.pth"), {k: _own_storage(v) for k, v in state.items()})
        atomic_write_json(os.path.join(path, "params.json"), meta_params(model.args))
    else:
        raise ValueError(f"save_model: unknown format {format!r}; expected 'hf' or 'meta'")
