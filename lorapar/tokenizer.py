"""LLaMA-2's SentencePiece tokenizer and its chat template.

Padding: LLaMA-2's SentencePiece model defines no pad piece (pad_id() == -1), so `pad_id` falls back
to the unknown piece (id 0). With byte fallback, encoding never produces <unk>, so a pad can never be
confused with real text, and unlike EOS it cannot be mistaken for a sequence end. Padded positions
are masked (attention `pad`, labels -100) wherever they appear, so the id's embedding is never used.
"""

from __future__ import annotations

import os
from typing import Optional

import sentencepiece as spm

# Meta's llama/generation.py: a system prompt sits inside the first [INST] block between these markers.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer model not found: {self.path} (expected a SentencePiece .model file)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{self.path}: not a valid SentencePiece model ({err})") from err
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.path}: token id(s) {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode(list(ids))

    @staticmethod
    def chat_prompt(user: str, system: Optional[str] = None) -> str:
        """One LLaMA-2 chat turn: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" (as Meta builds it)."""
        content = B_SYS + system + E_SYS + user if system is not None else user
        return f"{B_INST} {content.strip()} {E_INST}"

    def encode_chat(self, user: str, system: Optional[str] = None, bos: bool = True) -> list[int]:
        return self.encode(self.chat_prompt(user, system), bos=bos)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
