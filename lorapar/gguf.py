"""Read llama.cpp's GGUF files (LLaMA-2/3.x, SmolLM2, Qwen2/2.5) through the `gguf` package llama.cpp publishes.

A GGUF file holds the config and the tokenizer as metadata and the tensors, often quantized, under
llama.cpp's names (`blk.N.attn_q.weight` ...). `open_gguf` returns the ModelArgs and, per Meta name,
a reader that dequantizes one tensor on demand (gguf's own `dequantize`; the file is memory-mapped);
checkpoint.load_model then converts it to the training dtype. Training happens on the dequantized
weights: this is LoRA on a dequantized base, not QLoRA.

Rotary layout: llama.cpp's converter permutes LLaMA's q/k rows from Hugging Face's half-split order
back to Meta's interleaved one (its "normal" rope), so arch `llama` tensors are already in lorapar's
layout. Qwen2 runs on llama.cpp's NEOX rope with HF's row order kept, so its q/k rows (and biases) are
un-permuted here exactly as for a Hugging Face checkpoint.

`gguf` is imported lazily: only GGUF users need it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import numpy as np
import torch

from lorapar.config import ModelArgs
from lorapar.errors import InputError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
ARCHITECTURES = ("llama", "qwen2")
GGUF_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq_bias",
    "attn_k.bias": "attention.wk_bias",
    "attn_v.bias": "attention.wv_bias",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


class GGUFError(InputError):
    """A GGUF file lorapar cannot read as asked; the message names the file and the metadata key or tensor."""


def import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading a .gguf file needs the `gguf` package: pip install gguf") from err
    return gguf


def read_gguf(path: str):
    """A gguf.GGUFReader over the memory-mapped file, with errors that name the file.

    Parsing the metadata is slow in Python (tens of seconds for a 150k-token vocabulary on a busy CPU),
    and a script reads the file twice (model, tokenizer), so the last reader is kept per (path, size, mtime).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = os.stat(path)
    return _cached_reader(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    gguf = import_gguf()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as err:
        raise GGUFError(f"{path}: not a readable GGUF file ({err})") from err


def metadata(reader, path: str, key: str, default: Any = KeyError) -> Any:
    """One metadata value (str, number or list); a missing key without a default is an error naming it."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return default
    return field.contents()


def _float32_value(value) -> float:
    """GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07. The shortest decimal that rounds
    to the same float32 is the value the converter was given (the HF config's), so that is returned."""
    return float(str(np.float32(value)))


def gguf_model_args(reader, path: str) -> ModelArgs:
    arch = metadata(reader, path, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture={arch!r} is not supported (expected one of {ARCHITECTURES})")
    scaling = metadata(reader, path, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (expected 'none')")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:  # llama.cpp's form of llama3 scaling: per-frequency factors, not the rule
        raise GGUFError(
            f"{path}: tensor 'rope_freqs.weight' (per-frequency rope factors) is not supported; "
            f"load the Hugging Face checkpoint, whose rope_scaling lorapar reads"
        )
    n_heads = int(metadata(reader, path, f"{arch}.attention.head_count"))
    dim = int(metadata(reader, path, f"{arch}.embedding_length"))
    vocab = metadata(reader, path, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(metadata(reader, path, "tokenizer.ggml.tokens"))
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=int(metadata(reader, path, f"{arch}.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(metadata(reader, path, f"{arch}.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            hidden_dim=int(metadata(reader, path, f"{arch}.feed_forward_length")),
            norm_eps=_float32_value(metadata(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=_float32_value(metadata(reader, path, f"{arch}.rope.freq_base", 10000.0)),
            max_seq_len=int(metadata(reader, path, f"{arch}.context_length", 4096)),
            tie_embeddings="output.weight" not in names,
            qkv_bias=arch == "qwen2",
        )
    except (TypeError, ValueError) as err:
        raise GGUFError(f"{path}: {err}") from err
    rope_dim = int(metadata(reader, path, f"{arch}.rope.dimension_count", args.head_dim))
    if rope_dim != args.head_dim:
        raise GGUFError(
            f"{path}: {arch}.rope.dimension_count={rope_dim}; lorapar rotates the whole head (head_dim {args.head_dim})"
        )
    return args


def gguf_to_meta_name(name: str) -> str:
    if name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in GGUF_LAYER_NAMES:
        raise KeyError(name)
    return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"


def dequantize(tensor, path: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) (default all) of one GGUF tensor as an fp32 (or the file's f16) torch tensor; its
    shape is (rows, columns) = reversed GGUF dims.

    A quant block runs along a row (GGUF's first dim, the innermost) and never crosses into the next, and
    gguf's reader shapes a quantized tensor's bytes as (rows, bytes per row), so a row range of that raw
    array dequantizes on its own: only those rows' bytes are read from the memory map (what each FSDP
    rank does, lorapar/shard_reader.py). A 1-D quantized tensor's blocks run across its elements, so it
    is dequantized whole and sliced (1-D tensors are norms and biases: small).
    """
    gguf = import_gguf()
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has type {kind}; supported: {', '.join(SUPPORTED_TYPES)}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    stop = shape[0] if stop is None else stop
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"{path}: rows [{start}, {stop}) of tensor {tensor.name!r} with {shape[0]} rows")
    if start == stop:  # gguf's dequantize cannot reshape an empty array; FSDP asks for one past the last rank's rows
        return torch.empty((0, *shape[1:]), dtype=torch.float16 if kind == "F16" else torch.float32)
    whole_first = len(shape) == 1 and kind not in ("F32", "F16")
    raw = tensor.data if whole_first else tensor.data[start:stop]
    if kind in ("F32", "F16"):
        array = np.array(raw)  # a copy: the memory map is read-only
    else:
        array = gguf.quants.dequantize(raw, tensor.tensor_type)
    array = np.ascontiguousarray(array).reshape(shape if whole_first else (stop - start, *shape[1:]))
    return torch.from_numpy(array[start:stop] if whole_first else array)


def gguf_tensors(reader, path: str) -> dict[str, Any]:
    """{Meta name: gguf's ReaderTensor} of the file; a tensor lorapar does not know is an error naming it."""
    tensors = {}
    for tensor in reader.tensors:
        try:
            tensors[gguf_to_meta_name(tensor.name)] = tensor
        except KeyError:
            raise GGUFError(f"{path}: unknown tensor {tensor.name!r} (not a LLaMA/Qwen2 weight)") from None
    return tensors


def stores_hf_rope_order(reader, path: str) -> bool:
    """Whether the q/k rows (and biases) are in Hugging Face's order, to be un-permuted with
    checkpoint.names.hf_rows_to_meta: Qwen2's are (llama.cpp's NEOX rope), LLaMA's are already Meta's."""
    return metadata(reader, path, "general.architecture") == "qwen2"


def open_gguf(path: str) -> tuple[ModelArgs, dict[str, tuple[str, Callable[[], torch.Tensor]]]]:
    """(ModelArgs, {Meta name: (GGUF tensor name, reader)}): what checkpoint.load_model needs."""
    from lorapar.checkpoint.names import hf_rows_to_meta

    reader = read_gguf(path)
    args = gguf_model_args(reader, path)
    hf_rope_order = stores_hf_rope_order(reader, path)

    def read(tensor, name: str) -> torch.Tensor:
        w = dequantize(tensor, path)
        return hf_rows_to_meta(name, w, args) if hf_rope_order else w

    return args, {name: (t.name, functools.partial(read, t, name)) for name, t in gguf_tensors(reader, path).items()}
