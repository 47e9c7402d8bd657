"""llama2.c's legacy checkpoint: a 7 int32 header, then fp32 tensors in llama2.c's order."""

from __future__ import annotations

import os

import numpy as np
import torch

from lorapar.checkpoint.common import CheckpointError, TensorEntry, model_args_from, param_shapes
from lorapar.config import ModelArgs

LLAMA2C_HEADER_BYTES = 7 * 4
LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned exports, which this reader does not implement


def open_llama2c(path: str) -> tuple[ModelArgs, dict[str, TensorEntry]]:
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
    args = model_args_from(
        path,
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        max_seq_len=seq_len,
        tie_embeddings=vocab_size > 0,  # negative: own classifier
    )
    shapes = param_shapes(args)
    layer_kinds = [
        "attention_norm",
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "ffn_norm",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ]
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
            entries[name] = TensorEntry(path, name, lambda v=view: torch.from_numpy(v))
        offset += numel
    return args, entries
