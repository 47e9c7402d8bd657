"""Tokenizers of the LLaMA family behind one interface, and the chat templates, in one place.

`Tokenizer(path)` picks the backend from what `path` holds:
- a SentencePiece `.model` (LLaMA-2): `SentencePieceTokenizer`;
- a `tokenizer.json`, a directory holding one (Qwen2/2.5, LLaMA-3.x, SmolLM2), or a `.gguf` file (the
  tokenizer in its metadata): `BPETokenizer`, byte-level BPE through the `tokenizers` package, imported
  only then so that LLaMA-2 users do not need it.
Every backend has encode(text, bos, eos), decode(ids), vocab_size, bos_id, eos_id, pad_id, stop_ids (every
id that ends a generated turn), template, chat_prompt(user, system) and encode_chat(user, system, bos).

Chat templates (`chat_prompt(template, user, system)`):
  llama2   [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]                       (Meta's llama/generation.py)
  chatml   <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n
  llama3   <|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|> ... user ...
           <|start_header_id|>assistant<|end_header_id|>\\n\\n
A turn without a system prompt has no system block (the models' own templates may add a default one).

Padding: LLaMA-2's SentencePiece model defines no pad piece (pad_id() == -1), so `pad_id` falls back
to the unknown piece (id 0). With byte fallback, encoding never produces <unk>, so a pad can never be
confused with real text, and unlike EOS it cannot be mistaken for a sequence end. A BPE tokenizer uses
its file's pad token, or else its EOS. Padded positions are masked (attention `pad`, labels -100)
wherever they appear, so the id's embedding is never used.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import sentencepiece as spm

# Meta's llama/generation.py: a system prompt sits inside the first [INST] block between these markers.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
TEMPLATES = ("llama2", "chatml", "llama3")
# Tokens that end a turn or a document in these families; every one present in a vocabulary stops generation.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")


def chat_prompt(template: str, user: str, system: Optional[str] = None) -> str:
    """One user turn, ready for the assistant's answer, in the family's chat format."""
    if template == "llama2":
        content = B_SYS + system + E_SYS + user if system is not None else user
        return f"{B_INST} {content.strip()} {E_INST}"
    if template == "chatml":
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "llama3":

        def turn(role: str, text: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"

        head = turn("system", system) if system is not None else ""
        return f"{head}{turn('user', user)}<|start_header_id|>assistant<|end_header_id|>\n\n"
    raise ValueError(f"unknown chat template {template!r}; expected one of {TEMPLATES}")


class Tokenizer:
    """The interface; `Tokenizer(path)` returns the backend for `path` (see the module docstring)."""

    template = "llama2"

    def __new__(cls, path: str | os.PathLike = "", *args, **kwargs):
        if cls is Tokenizer:  # pick the backend; its __init__ then runs with the same arguments
            cls = BPETokenizer if _is_bpe(str(path)) else SentencePieceTokenizer
        return super().__new__(cls)

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: list[int]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @staticmethod
    def chat_prompt(user: str, system: Optional[str] = None) -> str:
        """One LLaMA-2 chat turn: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" (as Meta builds it).

        Called on the class this is LLaMA-2's template; on a BPE tokenizer, its own family's.
        """
        return chat_prompt("llama2", user, system)

    def encode_chat(self, user: str, system: Optional[str] = None, bos: bool = True) -> list[int]:
        return self.encode(self.chat_prompt(user, system), bos=bos)

    def _check_ids(self, ids) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.path}: token id(s) {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, template={self.template!r})"


def checkpoint_tokenizer(ckpt: str) -> Optional[str]:
    """The tokenizer a checkpoint carries: a .gguf file itself, or tokenizer.json / tokenizer.model in a model
    directory; None when it carries none (a Meta directory without tokenizer.model, a llama2.c .bin)."""
    if ckpt.endswith(".gguf") and os.path.isfile(ckpt):
        return ckpt
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(ckpt, name)):
            return os.path.join(ckpt, name)
    return None


def _is_bpe(path: str) -> bool:
    if path.endswith((".json", ".gguf")):
        return True
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-2's SentencePiece model."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if os.path.isdir(self.path) and os.path.isfile(os.path.join(self.path, "tokenizer.model")):
            self.path = os.path.join(self.path, "tokenizer.model")
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"tokenizer model not found: {self.path} (expected a SentencePiece .model file, a tokenizer.json, "
                f"a directory holding either, or a .gguf file)"
            )
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.path}: not a valid SentencePiece model ({err})") from err
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.stop_ids: list[int] = [self.eos_id]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        self._check_ids(ids)
        return self.sp.decode(list(ids))


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Qwen2/2.5, LLaMA-3.x, SmolLM2) from a tokenizer.json or a GGUF file's metadata.

    Special tokens written in the text (e.g. "<|im_end|>") become their ids, as in transformers.
    bos=True adds the BOS only for a model that starts sequences with one (LLaMA-3's <|begin_of_text|>;
    Qwen2 and SmolLM2 have none), so callers written for LLaMA-2 stay right for every family.
    decode drops special tokens, as SentencePiece drops its control pieces.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if self.path.endswith(".gguf"):
            self.tk, specials = _tokenizer_from_gguf(self.path)
        else:
            self.tk, specials = _tokenizer_from_json(self.path)
        self.vocab_size: int = self.tk.get_vocab_size(with_added_tokens=True)
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.template = "chatml" if "<|im_start|>" in vocab else "llama3" if "<|start_header_id|>" in vocab else "none"
        self.eos_id: int = specials["eos"]
        self.bos_id: int = specials["bos"] if specials["bos"] is not None else self.eos_id
        self.add_bos: bool = specials["bos"] is not None and specials["add_bos"]
        self.pad_id: int = specials["pad"] if specials["pad"] is not None else self.eos_id
        ends = [vocab[t] for t in END_MARKERS if t in vocab and vocab[t] != self.eos_id]
        self.stop_ids: list[int] = [self.eos_id] + ends

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        self._check_ids(ids)
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user: str, system: Optional[str] = None) -> str:  # type: ignore[override]
        if self.template == "none":
            raise ValueError(
                f"{self.path}: no chat template (the vocabulary has neither <|im_start|> nor "
                f"<|start_header_id|>); use the plain prompt template"
            )
        return chat_prompt(self.template, user, system)


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError("byte-level BPE tokenizers need the `tokenizers` package: pip install tokenizers") from err
    return tokenizers


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _tokenizer_from_json(path: str):
    """A tokenizers.Tokenizer from tokenizer.json; BOS/EOS/pad from tokenizer_config.json beside it when present."""
    tokenizers = _import_tokenizers()
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"tokenizer not found: {file}")
    try:
        tk = tokenizers.Tokenizer.from_file(file)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{file}: not a valid tokenizer.json ({err})") from err
    config_path = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    vocab = tk.get_vocab(with_added_tokens=True)

    def token_id(key: str, fallbacks: tuple[str, ...]) -> Optional[int]:
        name = _token_content(config.get(key))
        if name is not None:
            if name not in vocab:
                raise ValueError(f"{config_path}: {key}={name!r} is not in the vocabulary of {file}")
            return vocab[name]
        return next((vocab[t] for t in fallbacks if t in vocab), None)

    post = json.dumps(json.loads(tk.to_str()).get("post_processor"))  # LLaMA-3 adds <|begin_of_text|> here
    bos = token_id("bos_token", ("<|begin_of_text|>",) if "<|begin_of_text|>" in post else ())
    eos = token_id("eos_token", ("<|end_of_text|>", "<|endoftext|>", "</s>"))
    if eos is None:
        raise ValueError(
            f"{file}: no EOS token: expected eos_token in {config_path} or one of "
            f"<|end_of_text|>, <|endoftext|>, </s> in the vocabulary"
        )
    add_bos = bool(config.get("add_bos_token", bos is not None))
    return tk, {"bos": bos, "eos": eos, "pad": token_id("pad_token", ()), "add_bos": add_bos}


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by the GGUF's tokenizer.ggml.pre, as `tokenizers` splits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS = {
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "qwen2": "qwen2",
    "smollm": "smollm",
    "gpt-2": "gpt2",
    "default": "gpt2",
}


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":  # SmolLM2's tokenizer.json: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _tokenizer_from_gguf(path: str):
    """The byte-level BPE a GGUF file describes (tokenizer.ggml.model "gpt2"): vocabulary, merges, the
    pre-tokenizer named by tokenizer.ggml.pre, control tokens (type 3) as special tokens."""
    from lorapar.gguf import metadata, read_gguf

    tokenizers = _import_tokenizers()
    from tokenizers import AddedToken, decoders, models

    reader = read_gguf(path)
    kind = metadata(reader, path, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported (expected 'gpt2', byte-level BPE); "
            f"for a SentencePiece model pass its tokenizer.model instead"
        )
    pre = metadata(reader, path, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported (expected one of {sorted(GGUF_PRE_TOKENIZERS)})"
        )
    family = GGUF_PRE_TOKENIZERS[pre]
    tokens = metadata(reader, path, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in metadata(reader, path, "tokenizer.ggml.merges")]
    types = metadata(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    # llama.cpp's llama-bpe vocabulary takes a whole pre-token from the vocabulary before merging (as
    # LLaMA-3's tokenizer.json says with ignore_merges); the others always merge.
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=family == "llama3"))
    tk.pre_tokenizer = _pre_tokenizer(family)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    def token_id(key: str) -> Optional[int]:
        value = metadata(reader, path, key, None)
        return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

    eos = token_id("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ValueError(f"{path}: missing metadata key 'tokenizer.ggml.eos_token_id'")
    add_bos = bool(metadata(reader, path, "tokenizer.ggml.add_bos_token", family == "llama3"))
    return tk, {
        "bos": token_id("tokenizer.ggml.bos_token_id"),
        "eos": eos,
        "pad": token_id("tokenizer.ggml.padding_token_id"),
        "add_bos": add_bos,
    }
