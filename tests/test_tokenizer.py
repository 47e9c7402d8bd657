"""The real LLaMA-2 SentencePiece model: known ids, lossless round trips, the chat template, bad files."""

from __future__ import annotations

import pytest

from lorapar.tokenizer import Tokenizer


@pytest.fixture
def tokenizer(asset) -> Tokenizer:
    return Tokenizer(asset("models/llama2-tokenizer.model"))


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [15043, 3186]
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)
    assert tokenizer.pad_id == 0  # the model has no pad piece; <unk> (never produced, thanks to byte fallback)


@pytest.mark.parametrize(
    "text",
    ["Hello world", "  two leading spaces and trailing  ", "line one\nline two\n\n\tindented",
     "naïve café, Grüße, 東京, Привет, emoji 🦙", "#### 42\n$1,234.50"],
)
def test_decode_inverts_encode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.pad_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_chat_template_is_metas(tokenizer):
    assert tokenizer.chat_prompt("Hi there ") == "[INST] Hi there [/INST]"
    assert tokenizer.chat_prompt("Hi", system="Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    ids = tokenizer.encode_chat("Hi", system="Be brief.")
    assert ids[0] == tokenizer.bos_id and ids[1:4] == [518, 25580, 29962]  # "[INST]"
    assert tokenizer.decode(ids) == tokenizer.chat_prompt("Hi", system="Be brief.")
    assert tokenizer.encode_chat("Hi", bos=False)[0] != tokenizer.bos_id


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.model"):
        Tokenizer(tmp_path / "absent.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match=r"bad\.model: not a valid SentencePiece model"):
        Tokenizer(bad)


def test_out_of_range_ids_are_named(tokenizer):
    with pytest.raises(ValueError, match=r"32000"):
        tokenizer.decode([1, 32000])
