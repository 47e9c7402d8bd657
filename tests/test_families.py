"""Qwen2 (q/k/v biases) and LLaMA-3 (llama3 rope scaling) against transformers and peft, in fp32.

Random-weight models, every parameter (biases and norms included) drawn so that a wrong permutation,
a dropped bias or an ignored rope scaling moves the logits far beyond the tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import require

from lorapar.adapter import load_adapter, save_adapter
from lorapar.checkpoint import load_model, read_model_args, save_model
from lorapar.checkpoint.meta import meta_params
from lorapar.config import ModelArgs
from lorapar.lora import LoraArgs, apply_lora
from lorapar.model import Transformer, rope_frequencies

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64] * 5, [3, 3, 8, 120, 0, 11, 42, 17] * 5])  # 40 positions
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else (0.3 if name.endswith("bias") else 0.05) * noise)
    return model.eval()


def hf_qwen2(tied: bool):
    transformers = require("transformers")
    config = transformers.Qwen2Config(
        **SHAPE,
        num_attention_heads=8,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=tied,
    )
    return _randomize(transformers.Qwen2ForCausalLM(config))


def hf_llama3():
    transformers = require("transformers")
    config = transformers.LlamaConfig(
        **SHAPE,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=False,
    )
    return _randomize(transformers.LlamaForCausalLM(config))


def _assert_same_logits(hf, ours, atol=1e-4):
    with torch.no_grad():
        expected, got = hf(TOKENS).logits, ours(TOKENS)
    assert expected.abs().max() > 0.5  # a degenerate model would compare equal for any permutation
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_logits_equal_transformers_both_ways(tmp_path, tied):
    hf = hf_qwen2(tied)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.args.qkv_bias and ours.args.tie_embeddings == tied and ours.args.rope_theta == 1e6
    _assert_same_logits(hf, ours)
    with torch.no_grad():  # the biases matter: without them the logits move
        for layer in ours.layers:
            layer.attention.wq_bias.zero_()
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max() > 1e-2
    save_model(load_model(tmp_path / "hf"), tmp_path / "ours")  # and lorapar's export reads back in transformers
    transformers = require("transformers")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(again).__name__ == "Qwen2ForCausalLM"
    _assert_same_logits(again, load_model(tmp_path / "hf"))


def test_llama3_rope_scaling_equals_transformers_in_both_config_spellings(tmp_path):
    hf = hf_llama3()
    hf.save_pretrained(tmp_path / "v5")  # transformers 5 writes rope_parameters
    ours = load_model(tmp_path / "v5")
    assert ours.args.rope_scaling_factor == 8.0 and ours.args.rope_original_max_seq_len == 64
    # The scaled frequencies cover all three of Meta's regimes (kept, divided by the factor, interpolated).
    plain = rope_frequencies(ModelArgs(**{**ours.args.__dict__, "rope_scaling_factor": None}))
    ratio = plain / rope_frequencies(ours.args)
    assert ratio.min() == 1.0 and ratio.max() == pytest.approx(8.0) and ((ratio > 1.01) & (ratio < 7.9)).any()
    _assert_same_logits(hf, ours)
    # transformers 4's spelling: rope_theta + rope_scaling, no rope_parameters.
    (tmp_path / "v4").mkdir()
    for f in ("model.safetensors",):
        (tmp_path / "v4" / f).write_bytes((tmp_path / "v5" / f).read_bytes())
    config = json.loads((tmp_path / "v5" / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    (tmp_path / "v4" / "config.json").write_text(json.dumps(config))
    _assert_same_logits(hf, load_model(tmp_path / "v4"))
    unscaled = load_model(tmp_path / "v4")
    unscaled.args.rope_scaling_factor, unscaled._rope = None, None
    with torch.no_grad():  # positions past the original context: ignoring the scaling would be visible
        assert (unscaled(TOKENS) - hf(TOKENS).logits).abs().max() > 1e-2
    save_model(ours, tmp_path / "ours")
    transformers = require("transformers")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    _assert_same_logits(again, ours)


def test_meta_params_json_llama3_scaling_and_qwen_bias_round_trip(tmp_path):
    args = ModelArgs(
        dim=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=128,
        hidden_dim=96,
        rope_theta=5e5,
        rope_scaling_factor=32.0,
        rope_original_max_seq_len=8192,
        qkv_bias=True,
    )
    model = _randomize(Transformer(args))
    save_model(model, tmp_path / "meta", format="meta")
    params = meta_params(args)
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0 and params["qkv_bias"] is True
    assert read_model_args(tmp_path / "meta") == args
    reloaded = load_model(tmp_path / "meta")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS), model(TOKENS), rtol=0, atol=0)
    # Meta's own LLaMA-3.1 params.json says only "use_scaled_rope": true; its reference code fixes the rest.
    plain = {
        "dim": 64,
        "n_layers": 1,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 128,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    (tmp_path / "meta" / "params.json").write_text(json.dumps(plain))
    meta_args = read_model_args(tmp_path / "meta")
    assert (
        meta_args.rope_scaling_factor,
        meta_args.rope_low_freq_factor,
        meta_args.rope_high_freq_factor,
        meta_args.rope_original_max_seq_len,
    ) == (8.0, 1.0, 4.0, 8192)


def test_unsupported_variants_name_the_config_key(tmp_path):
    from lorapar.checkpoint import CheckpointError

    hf = hf_qwen2(tied=True)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for edit, key in (
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope_parameters"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(CheckpointError, match=rf"config\.json: {key}"):
            load_model(tmp_path)


def test_lora_on_qwen2_keeps_biases_frozen_in_the_base_and_trains(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, hidden_dim=96, qkv_bias=True)
    model = _randomize(Transformer(args))
    with torch.no_grad():
        before = model(TOKENS)
    targets = ("q", "k", "v", "gate", "up", "down")
    modules = apply_lora(model, LoraArgs(r=4, alpha=8.0, init="gaussian", targets=targets))
    assert "layers.0.attention.wq" in modules and not model.layers[0].attention.wq_bias.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    bias = model.layers[0].attention.wk_bias.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    assert torch.equal(model.layers[0].attention.wk_bias, bias)
    with torch.no_grad(), lora_disabled(model):
        torch.testing.assert_close(model.eval()(TOKENS), before, rtol=0, atol=1e-5)  # base + bias unchanged


def lora_disabled(model):
    from lorapar.lora import disable_adapter

    return disable_adapter(model)


def test_peft_adapters_move_between_peft_and_lorapar_on_qwen2(tmp_path):
    peft = require("peft")
    transformers = require("transformers")
    hf = hf_qwen2(tied=False)
    hf.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    # peft -> lorapar: peft's default init (B = 0), then B drawn at random so that the adapter changes the logits.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path / "from_peft")
    ours = load_model(tmp_path / "base")
    load_adapter(ours, str(tmp_path / "from_peft"))
    with torch.no_grad():
        assert (peft_model(TOKENS).logits - hf_qwen2(tied=False)(TOKENS).logits).abs().max() > 1e-2
        torch.testing.assert_close(ours(TOKENS), peft_model(TOKENS).logits, rtol=0, atol=1e-4)
    # lorapar -> peft.
    ours = load_model(tmp_path / "base")
    lora_args = LoraArgs(r=4, alpha=8.0, init="gaussian", init_std=0.05, targets=("q", "k", "v", "gate", "up", "down"))
    apply_lora(ours, lora_args)
    save_adapter(ours, str(tmp_path / "from_lorapar"), lora_args)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "from_lorapar").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, ours.eval()(TOKENS), rtol=0, atol=1e-4)


@torch.no_grad()
def test_kv_cache_decoding_with_biases_and_scaled_rope_equals_full_forward():
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=128,
        hidden_dim=96,
        qkv_bias=True,
        rope_scaling_factor=8.0,
        rope_original_max_seq_len=16,
        max_seq_len=64,
    )
    model = _randomize(Transformer(args))
    prompt = TOKENS[:, :20]
    full = model(prompt)[:, -1]
    cache = model.new_cache(2, 24)
    model(prompt[:, :-1], cache=cache)
    step = model(prompt[:, -1:], start_pos=19, cache=cache)[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
