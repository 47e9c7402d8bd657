"""What the checkpoint readers share: the error type, a lazily read tensor, and the reading helpers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from lorapar.config import ModelArgs
from lorapar.errors import InputError
from lorapar.model import Transformer


class CheckpointError(InputError):
    """A checkpoint that cannot be read as asked; the message names the file and key."""


@dataclass
class TensorEntry:
    """Where one Meta-named tensor comes from; `read` returns it in Meta's layout (still in the file's dtype)."""

    file: str
    key: str
    read: Callable[[], torch.Tensor]


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from err


def model_args_from(source: str, **fields) -> ModelArgs:
    try:
        return ModelArgs(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err


def load_torch_file(path: str, expected: str) -> dict:
    """torch.load (memory-mapped, tensors only) with an error naming the file when it is truncated or corrupt."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"{path}: not readable as {expected} ({type(error).__name__}: {str(error)[:200]}); "
            "is it truncated or another kind of file?"
        ) from None


def param_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in Transformer(args).named_parameters()}
