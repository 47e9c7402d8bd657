"""Configuration dataclasses and the one place that turns a dataclass into command-line flags.

Every concern has one dataclass with defaults; a script builds its parser with `add_dataclass_args`
and reads the values back with `dataclass_from_args`, so a flag `--lora-alpha` is the field
`lora_alpha` and nothing else; `to_argv` turns values back into the flags that give them (the pipeline
runs the scripts with it). `save_config` writes the resolved values beside every output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from lorapar.io import atomic_write_text


@dataclass
class ModelArgs:
    """The shape of a LLaMA-family model, in Meta's vocabulary (params.json uses the same field names).

    One class covers LLaMA-2, LLaMA-3.x, Qwen2/2.5 and SmolLM2; they differ only in these fields:
    Qwen2 sets qkv_bias (and rope_theta 1e6, norm_eps 1e-6), LLaMA-3.1/3.2 set the rope_scaling_* fields
    (Meta's "llama3" rule, see lorapar.model.rope_frequencies), small sizes set tie_embeddings.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta rounds the SwiGLU hidden size up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # 70B uses 1.3
    hidden_dim: Optional[int] = None  # explicit SwiGLU size (llama2.c stores it); overrides the rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # llama2.c's small models share the embedding with the output head
    qkv_bias: bool = False  # Qwen2: q, k and v projections carry a (frozen) bias; o and the MLP do not
    # LLaMA-3.1/3.2's rope_scaling {"rope_type": "llama3", ...}; factor None = no scaling (LLaMA-2, 3.0, Qwen2)
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192  # the context the unscaled model was trained on

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling_factor is not None and not (
            self.rope_scaling_factor >= 1.0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ValueError(
                f"ModelArgs: llama3 rope scaling needs rope_scaling_factor >= 1 and 0 < rope_low_freq_factor < "
                f"rope_high_freq_factor (got {self.rope_scaling_factor}, {self.rope_low_freq_factor}, "
                f"{self.rope_high_freq_factor})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the optional multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in MODEL_PRESETS:
            raise KeyError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, params: dict, source: str = "<dict>") -> "ModelArgs":
        """Build from Meta's params.json (unknown keys are an error so a typo is never ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"{source}: unknown model parameter(s) {unknown}; expected keys among {sorted(names)}")
        return cls(**params)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "llama2-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    # About 100M parameters (102M) with LLaMA-2's vocabulary and head size: the benchmarks' CPU stand-in for 7B.
    "llama-100m": dict(dim=640, n_layers=12, n_heads=10, vocab_size=32000, max_seq_len=2048),
    # The same ~100M budget in Qwen2's shape: its 151936-token vocabulary (half the parameters sit in the tied
    # embedding), q/k/v biases, rope_theta 1e6; bench_sft.py --model qwen2-100m measures its step memory.
    "qwen2-100m": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=151936,
        hidden_dim=1536,
        norm_eps=1e-6,
        rope_theta=1e6,
        max_seq_len=2048,
        tie_embeddings=True,
        qkv_bias=True,
    ),
    "qwen2.5-7b": dict(
        dim=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        vocab_size=152064,
        hidden_dim=18944,
        norm_eps=1e-6,
        rope_theta=1e6,
        max_seq_len=32768,
        qkv_bias=True,
    ),
}


# ----------------------------------------------------------------------------- dataclass <-> argparse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls`; help text comes from `field(metadata={"help": ...})`.

    Defaults are left as None in argparse so that `dataclass_from_args` can tell a flag the user
    gave from one they did not (a preset fills the rest).
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        if origin is typing.Union:  # Optional[X]
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
            origin = typing.get_origin(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=help_text)
        if tp is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif origin in (list, tuple):
            item = typing.get_args(tp)[0]
            kwargs.update(type=lambda s, item=item: [item(v) for v in s.split(",") if v], metavar="A,B,...")
        elif "choices" in f.metadata:
            kwargs.update(type=tp, choices=f.metadata["choices"])
        else:
            kwargs.update(type=tp)
        group.add_argument(_flag(f.name), **kwargs)


def field_of(cls: type, name: str, default: Any) -> Any:
    """The field `name` of the dataclass `cls` (its help, choices and whatever else its metadata says) with
    another default, for a subclass whose command needs one: the setting keeps one definition, and
    add_dataclass_args shows the new default in --help. Checks stay in cls.__post_init__."""
    declared = cls.__dataclass_fields__[name]
    if not declared.init:
        raise ValueError(f"field_of: {cls.__name__}.{name} is not an __init__ field, so it has no flag to re-default")
    redefaulted = field(default=default)
    redefaulted.metadata = declared.metadata  # the very object, not a copy (tests/test_flags.py checks it is)
    return redefaulted


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """Fields the user set on the command line override `base` (a preset) or the defaults."""
    obj = base if base is not None else cls()
    changes = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and getattr(args, f.name, None) is not None
    }
    for name, value in changes.items():
        if isinstance(getattr(obj, name), tuple) and isinstance(value, list):
            changes[name] = tuple(value)
    return dataclasses.replace(obj, **changes)


def to_argv(config: Any, base: Any = None, skip: tuple[str, ...] = ()) -> list[str]:
    """The inverse of `add_dataclass_args` + `dataclass_from_args`: the flags that rebuild `config` from
    `base` (a preset's values; the dataclass's defaults when None), one `--flag value` per field whose
    value differs from base's (a field in `skip` is not a flag). Values are written so that the flag's
    parser gives them back exactly (floats by repr, booleans as true / false, sequences comma-joined)."""
    base = type(config)() if base is None else base
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in skip or not f.init or _same(value, getattr(base, f.name)):
            continue
        where = f"{type(config).__name__}.{f.name}"
        if value is None:
            raise ValueError(f"{where}: None is no flag value (it stands for the flag not given)")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            if any("," in str(item) for item in value):
                raise ValueError(f"{where}: {value!r} has an item with a comma, which its flag splits at")
            text = ",".join(str(item) for item in value)
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        argv += [_flag(f.name), text]
    return argv


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def config_to_dict(*configs: Any) -> dict[str, Any]:
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}


def save_config(path: str, *configs: Any, extra: Optional[dict] = None) -> None:
    """Write the resolved configuration as JSON beside an output (atomically)."""
    payload = config_to_dict(*configs)
    if extra:
        payload.update(extra)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


__all__ = [
    "ModelArgs",
    "MODEL_PRESETS",
    "add_dataclass_args",
    "dataclass_from_args",
    "field_of",
    "to_argv",
    "config_to_dict",
    "save_config",
    "field",
]
