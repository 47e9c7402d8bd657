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
    [
        "Hello world",
        "  two leading spaces and trailing  ",
        "line one\nline two\n\n\tindented",
        "naïve café, Grüße, 東京, Привет, emoji 🦙",
        "#### 42\n$1,234.50",
    ],
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


# ----------------------------------------------------------------------------- byte-level BPE (tokenizer.json)

from conftest import require  # noqa: E402

from lorapar.tokenizer import BPETokenizer, SentencePieceTokenizer, chat_prompt  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 apples cost $6.78!",
    "naïve café 東京 中文 🤖🎉",
    "    def f(x):\n        return x * 2\n\n",
    "Natalia sold 48 clips in April, and half as many in May. #### 72",
] * 20
HARD = [
    "Hello world",
    "  two leading, three   inner   runs\n\n\n\ttabs\t\t end  ",
    "a\r\nb\n \n",
    "1234567 + 89 = 1234656",
    "emoji 🤖🎉👍🏽",
    "中文混合English日本語",
    "don't I'll WE'VE",
    "",
]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_bpe(directory, family: str) -> None:
    """A small byte-level BPE trained here, laid out as Qwen2's or LLaMA-3's tokenizer.json + tokenizer_config.json."""
    import json

    tokenizers = require("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    split = LLAMA3_SPLIT if family == "llama3" else LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    specials = (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        if family == "llama3"
        else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    if family == "llama3":  # LLaMA-3's post-processor adds <|begin_of_text|>
        bos = tk.token_to_id("<|begin_of_text|>")
        tk.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        config = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    else:  # Qwen2.5-Instruct: no BOS, EOS <|im_end|>, pad <|endoftext|>
        config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_bpe_ids_equal_transformers_on_hard_strings(tmp_path, family):
    transformers = require("transformers")
    write_bpe(tmp_path, family)
    ours = Tokenizer(tmp_path)
    assert isinstance(ours, BPETokenizer) and ours.template == ("llama3" if family == "llama3" else "chatml")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = ours.chat_prompt("What is 2+2?", system="Be brief.")
    for text in HARD + [prompt, f"text with {prompt} inside"]:
        assert ours.encode(text, bos=True) == theirs(text)["input_ids"], text  # BOS exactly when transformers adds one
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    for text in HARD:
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
    vocab = theirs.get_vocab()
    if family == "llama3":
        assert (ours.bos_id, ours.eos_id, ours.add_bos) == (vocab["<|begin_of_text|>"], vocab["<|eot_id|>"], True)
        assert set(ours.stop_ids) == {vocab["<|eot_id|>"], vocab["<|end_of_text|>"]}
    else:
        assert (ours.eos_id, ours.pad_id, ours.add_bos) == (vocab["<|im_end|>"], vocab["<|endoftext|>"], False)
        assert set(ours.stop_ids) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    special = "<|im_end|>" if family == "qwen2" else "<|eot_id|>"
    assert ours.encode(f"a{special}b")[1] == vocab[special]  # a special token written in the text is one id


def test_chat_templates_are_the_families_own():
    assert chat_prompt("chatml", "Hi", "Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt("chatml", "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt("llama3", "Hi", "Be brief.") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chat_prompt("llama2", "Hi") == Tokenizer.chat_prompt("Hi") == "[INST] Hi [/INST]"
    with pytest.raises(ValueError, match="unknown chat template 'mistral'"):
        chat_prompt("mistral", "Hi")


def test_backend_follows_the_path_and_errors_name_the_file(tmp_path, asset):
    assert isinstance(Tokenizer(asset("models/llama2-tokenizer.model")), SentencePieceTokenizer)
    require("tokenizers")
    with pytest.raises(FileNotFoundError, match=r"absent\.json"):
        Tokenizer(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a valid tokenizer\.json"):
        Tokenizer(tmp_path / "bad.json")
    write_bpe(tmp_path / "q", "qwen2")
    (tmp_path / "q" / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token='<\|nope\|>' is not in the vocabulary"):
        Tokenizer(tmp_path / "q")
