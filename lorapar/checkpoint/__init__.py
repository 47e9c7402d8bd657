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

One file per format: meta.py, hf.py, llama2c.py (and lorapar/gguf.py); the HF <-> Meta names and the
q/k row permutation: names.py; what the readers share: common.py. This file detects the format, loads
and saves.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from lorapar.checkpoint.common import CheckpointError, TensorEntry, param_shapes
from lorapar.checkpoint.hf import hf_config, open_hf
from lorapar.checkpoint.llama2c import open_llama2c
from lorapar.checkpoint.meta import meta_params, open_meta
from lorapar.checkpoint.names import meta_to_hf_state_dict
from lorapar.config import ModelArgs
from lorapar.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json
from lorapar.model import Transformer


def _open(path: str | os.PathLike) -> tuple[str, ModelArgs, dict[str, TensorEntry]]:
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(path) and path.endswith(".gguf"):
        from lorapar.gguf import open_gguf

        args, tensors = open_gguf(path)
        return "gguf", args, {name: TensorEntry(path, key, read) for name, (key, read) in tensors.items()}
    if os.path.isfile(path):
        return "llama2c", *open_llama2c(path)
    if os.path.isfile(os.path.join(path, "params.json")):
        return "meta", *open_meta(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", *open_hf(path)
    raise CheckpointError(
        f"{path}: unrecognised checkpoint directory (expected params.json + consolidated.NN.pth from Meta, "
        f"or config.json + model.safetensors from Hugging Face; found {sorted(os.listdir(path))[:8]})"
    )


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


def base_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's own weights under Meta names (LoRA keeps its frozen base at `<module>.weight`, so an
    adapted model yields its base; adapters are saved separately). A tied head is stored once."""
    state = model.state_dict()
    return {name: state[name].detach() for name in param_shapes(model.args)}


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


__all__ = ["CheckpointError", "load_model", "read_model_args", "save_model", "base_state_dict"]
