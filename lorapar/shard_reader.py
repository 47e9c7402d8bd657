"""Read only some rows of a base checkpoint's tensors: what each FSDP rank loads of its shards (lorapar/fsdp.py).

The full readers (lorapar/checkpoint/) return whole tensors; this reads rows [start, stop) of one
tensor, in Meta's names and layout, touching only the bytes of those rows where the format allows.
GGUF tensors are dequantized row range by row range (lorapar.gguf.dequantize), so a rank dequantizes
only its own rows.
"""

from __future__ import annotations

import glob
import os
from types import SimpleNamespace
from typing import Any, Callable

import torch

from lorapar.config import ModelArgs


class ShardReader:
    """rows(name, start, stop): rows [start, stop) of a base tensor (Meta name, Meta layout) without reading the rest.

    Meta's consolidated.NN.pth are memory-mapped (a slice touches only its pages); safetensors are read
    through get_slice; llama2.c files through numpy's memmap; GGUF files (memory-mapped by gguf's reader)
    are dequantized for those rows only. Hugging Face's q/k rows (and Qwen2's in GGUF) are a per-head
    permutation of Meta's, so those are read head by head: the whole heads covering the rows.
    """

    def __init__(self, path: str):
        from lorapar.checkpoint import read_model_args

        self.path = str(path)
        self.args: ModelArgs = read_model_args(self.path)  # validates the config and names the file on error
        if os.path.isfile(self.path) and self.path.endswith(".gguf"):  # lorapar.checkpoint._open's rule
            self.kind = "gguf"
            from lorapar.gguf import gguf_tensors, read_gguf, stores_hf_rope_order

            reader = read_gguf(self.path)  # the one read_model_args parsed (cached): nothing is read again
            self._gguf = gguf_tensors(reader, self.path)
            self._gguf_hf_rope_order = stores_hf_rope_order(reader, self.path)
        elif os.path.isfile(self.path):
            self.kind = "llama2c"
            from lorapar.checkpoint.llama2c import open_llama2c

            _, self._entries = open_llama2c(self.path)  # memmap views: nothing is read until sliced
        elif os.path.isfile(os.path.join(self.path, "params.json")):
            self.kind = "meta"
            files = sorted(glob.glob(os.path.join(self.path, "consolidated.*.pth")))
            self._meta = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
        else:
            self.kind = "hf"
            from lorapar.checkpoint.common import CheckpointError
            from lorapar.checkpoint.hf import hf_weight_map
            from lorapar.checkpoint.names import HF_IGNORED_SUFFIX, hf_to_meta_name

            self._hf = {}
            for key, file in hf_weight_map(self.path).items():
                if key.endswith(HF_IGNORED_SUFFIX):
                    continue  # rotary frequencies, recomputed (as the full loader does)
                try:
                    self._hf[hf_to_meta_name(key)] = (file, key)
                except KeyError:
                    raise CheckpointError(f"{file}: unknown key {key!r} (not a LLaMA weight)") from None
            self._files: dict[str, Any] = {}

    def names(self) -> set[str]:
        """Every tensor the checkpoint holds, by Meta name."""
        from lorapar.checkpoint.meta import META_IGNORED_KEYS

        if self.kind == "llama2c":
            return set(self._entries)
        if self.kind == "gguf":
            return set(self._gguf)
        if self.kind == "meta":
            return set(self._meta[0]) - META_IGNORED_KEYS
        return set(self._hf)

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole tensor's shape, read from the file's header (nothing else is read)."""
        if self.kind == "llama2c":
            return tuple(self._entries[name].read().shape)
        if self.kind == "gguf":
            return tuple(int(d) for d in reversed(self._gguf[name].shape))  # GGUF lists dims innermost first
        if self.kind == "meta":
            from lorapar.checkpoint.meta import META_SHARD_DIM

            parts = [tuple(shard[name].shape) for shard in self._meta]
            dim = META_SHARD_DIM.get(name.split(".")[-2])
            if dim is None:
                return parts[0]
            return tuple(sum(p[d] for p in parts) if d == dim else parts[0][d] for d in range(len(parts[0])))
        file, key = self._hf[name]
        self._hf_slice(file, key, 0, 0)  # opens the file
        handle = self._files[file]
        return tuple(handle[key].shape) if isinstance(handle, dict) else tuple(handle.get_slice(key).get_shape())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from lorapar.checkpoint.common import CheckpointError

        try:
            if self.kind == "llama2c":
                return self._entries[name].read()[start:stop]
            if self.kind == "meta":
                return self._meta_rows(name, start, stop)
            if self.kind == "gguf":
                return self._gguf_rows(name, start, stop)
            file, key = self._hf[name]
            return self._rope_rows(name, start, stop, lambda lo, hi: self._hf_slice(file, key, lo, hi))
        except KeyError:
            raise CheckpointError(
                f"{self.path}: missing key {name!r} (Meta name) for this model configuration"
            ) from None

    def _meta_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from lorapar.checkpoint.meta import META_SHARD_DIM

        parts = [shard[name] for shard in self._meta]
        dim = META_SHARD_DIM.get(name.split(".")[-2])
        if dim is None:  # replicated on every model-parallel rank
            return parts[0][start:stop]
        if dim == 1:  # split along the columns: every part holds some columns of each row
            return torch.cat([part[start:stop] for part in parts], dim=1)
        pieces, offset = [], 0
        for part in parts:  # split along the rows: take the overlap of [start, stop) with each part
            lo, hi = max(start, offset), min(stop, offset + part.shape[0])
            if lo < hi:
                pieces.append(part[lo - offset : hi - offset])
            offset += part.shape[0]
        return torch.cat(pieces) if pieces else parts[0][:0]

    def _gguf_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from lorapar.gguf import dequantize

        tensor = self._gguf[name]
        read = lambda lo, hi: dequantize(tensor, self.path, lo, hi)  # noqa: E731
        return self._rope_rows(name, start, stop, read) if self._gguf_hf_rope_order else read(start, stop)

    def _rope_rows(
        self, name: str, start: int, stop: int, read_hf_rows: Callable[[int, int], torch.Tensor]
    ) -> torch.Tensor:
        """Rows [start, stop) in Meta's order of a tensor stored in Hugging Face's (read_hf_rows(lo, hi) reads
        stored rows): q/k are un-permuted over the whole heads covering the rows; other tensors read as stored."""
        from lorapar.checkpoint.names import hf_rows_to_meta, rope_heads

        heads = rope_heads(name, self.args)
        if not heads or start == stop:
            return read_hf_rows(start, stop)
        head_dim = self.args.head_dim
        first, last = start // head_dim, -(-stop // head_dim)
        block = read_hf_rows(first * head_dim, last * head_dim)
        subset = SimpleNamespace(n_heads=last - first, n_kv_heads=last - first)  # permute these heads only
        meta = hf_rows_to_meta(name, block, subset)
        return meta[start - first * head_dim : stop - first * head_dim]

    def _hf_slice(self, file: str, key: str, start: int, stop: int) -> torch.Tensor:
        if file not in self._files:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._files[file] = safe_open(file, framework="pt", device="cpu")
            else:
                self._files[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        handle = self._files[file]
        if isinstance(handle, dict):
            return handle[key][start:stop]
        return handle.get_slice(key)[start:stop]
