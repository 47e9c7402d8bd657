"""Checkpoint formats: exact round trips, Meta shards, HF's q/k permutation, llama2.c .bin, and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorapar.checkpoint import CheckpointError, load_model, read_model_args, save_model
from lorapar.config import ModelArgs
from lorapar.model import Transformer


def _tokens():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _assert_same_model(loaded: Transformer, original: Transformer) -> None:
    assert loaded.args == original.args
    want = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(_tokens()), original(_tokens()))


def _hf_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> HF row order, written as in transformers' convert_llama_weights_to_hf.py."""
    dim1, dim2 = w.shape
    return w.view(heads, dim1 // heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _write_hf_by_hand(model: Transformer, directory) -> None:
    args, sd = model.args, model.state_dict()
    hf = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = _hf_permute(sd[p + "attention.wq.weight"], args.n_heads)
        hf[q + "self_attn.k_proj.weight"] = _hf_permute(sd[p + "attention.wk.weight"], args.n_kv_heads)
        hf[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        hf[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        hf[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        hf[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        hf[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        hf[q + "self_attn.rotary_emb.inv_freq"] = torch.ones(args.head_dim // 2)  # old exports carry it
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(directory, "model.safetensors"))
    config = dict(
        model_type="llama",
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        hidden_act="silu",
    )
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)


def test_hf_rotate_half_on_permuted_rows_equals_meta_rotary(tiny_model):
    # The permutation's meaning: HF's rotate-half RoPE on HF rows == Meta's interleaved RoPE, up to row order.
    args, x, pos = tiny_model.args, torch.randn(5, 64), torch.arange(5).float()
    wq = tiny_model.layers[0].attention.wq.weight.detach()
    D = args.head_dim
    angles = torch.outer(pos, 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D))  # (T, D/2)
    q_hf = (x @ _hf_permute(wq, args.n_heads).T).view(5, args.n_heads, D)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    rotate_half = torch.cat([-q_hf[..., D // 2 :], q_hf[..., : D // 2]], -1)
    hf = q_hf * cos + rotate_half * sin
    pairs = (x @ wq.T).view(5, args.n_heads, D // 2, 2)
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    meta = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    torch.testing.assert_close(hf, torch.cat([meta[..., 0], meta[..., 1]], -1), atol=1e-5, rtol=1e-5)


def test_hand_written_hf_checkpoint_gives_the_same_logits(tiny_model, tmp_path):
    _write_hf_by_hand(tiny_model, tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_tokens()), tiny_model(_tokens()), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["hf", "meta"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tiny_args, tmp_path, fmt, tied):
    model = Transformer(ModelArgs(**{**tiny_args.__dict__, "tie_embeddings": tied, "rope_theta": 5e5}))
    model.init_weights(seed=1)
    save_model(model, tmp_path / "ckpt", format=fmt)
    loaded = load_model(tmp_path / "ckpt")
    _assert_same_model(loaded, model.eval())
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".tmp")]


def test_meta_params_json_is_metas_own_for_a_meta_shaped_model(tmp_path):
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, multiple_of=32))
    save_model(model, tmp_path, format="meta")
    params = json.loads((tmp_path / "params.json").read_text())
    assert params == dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=32, multiple_of=32, norm_eps=1e-5)


def test_two_shard_meta_checkpoint_loads_exactly(tiny_model, tmp_path):
    # Meta's model-parallel split, spelled out independently of the loader's table.
    row_split = ("wq", "wk", "wv", "w1", "w3", "output")
    shards: list[dict] = [{}, {}]
    for name, tensor in tiny_model.state_dict().items():
        kind = name.split(".")[-2]
        dim = 0 if kind in row_split else 1 if kind in ("wo", "w2", "tok_embeddings") else None
        parts = [tensor, tensor] if dim is None else tensor.chunk(2, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for rank, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(4)  # Meta's release stores it in every shard; the loader recomputes it
        torch.save(shard, tmp_path / f"consolidated.0{rank}.pth")
    params = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=-1, hidden_dim=96, max_seq_len=128)
    (tmp_path / "params.json").write_text(json.dumps(params))
    _assert_same_model(load_model(tmp_path), tiny_model)


def test_sharded_hf_checkpoint_with_index(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, format="hf")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for index, chunk in enumerate((names[::2], names[1::2])):
        file = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in chunk}, tmp_path / file)
        weight_map.update({k: file for k in chunk})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same_model(load_model(tmp_path), tiny_model)


def test_hf_pytorch_model_bin_fallback(tiny_model, tmp_path):
    from safetensors.torch import load_file

    save_model(tiny_model, tmp_path, format="hf")
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    _assert_same_model(load_model(tmp_path), tiny_model)


def _write_llama2c(model: Transformer, path, tied: bool) -> None:
    """llama2.c's legacy export, written from its documented order."""
    a, sd = model.args, model.state_dict()
    header = [
        a.dim,
        a.ffn_hidden_dim,
        a.n_layers,
        a.n_heads,
        a.n_kv_heads,
        a.vocab_size * (1 if tied else -1),
        a.max_seq_len,
    ]
    parts = [sd["tok_embeddings.weight"]]
    for kind in (
        "attention_norm",
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "ffn_norm",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ):
        parts += [sd[f"layers.{i}.{kind}.weight"] for i in range(a.n_layers)]
    parts += [sd["norm.weight"], torch.full((a.max_seq_len * a.head_dim,), 7.0)]  # two RoPE tables: never read
    parts += [] if tied else [sd["output.weight"]]
    with open(path, "wb") as handle:
        handle.write(np.array(header, dtype="<i4").tobytes())
        for part in parts:
            handle.write(part.detach().numpy().astype("<f4").tobytes())


@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_bin_written_by_hand_loads_exactly(tiny_args, tmp_path, tied):
    model = Transformer(ModelArgs(**{**tiny_args.__dict__, "tie_embeddings": tied}))
    model.init_weights(seed=2)
    _write_llama2c(model, tmp_path / "model.bin", tied)
    _assert_same_model(load_model(tmp_path / "model.bin"), model.eval())


def test_real_stories260k_config_comes_from_the_header(asset):
    args = read_model_args(asset("models/stories260K.bin"))
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads) == (64, 172, 5, 8, 4)
    assert (args.vocab_size, args.max_seq_len, args.tie_embeddings) == (512, 512, True)
    model = load_model(asset("models/stories260K.bin"), dtype=torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight and model.output.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in model.parameters())


def test_lora_model_saves_its_base_weights(tiny_model, tmp_path):
    from lorapar.lora import apply_lora

    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, targets=("q", "v"), r=2, alpha=4.0, init="gaussian")
    save_model(tiny_model, tmp_path, format="hf")
    loaded = load_model(tmp_path).state_dict()
    assert loaded.keys() == base.keys() and all(torch.equal(loaded[k], base[k]) for k in base)


# ----------------------------------------------------------------------------- bad input


def test_missing_path_and_unrecognised_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint directory.*params\.json.*config\.json"):
        load_model(tmp_path)


def test_hf_index_naming_a_missing_shard(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, format="hf")
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match=r"gone\.safetensors.*lm_head\.weight"):
        load_model(tmp_path)


def _edit_meta(model, directory, edit) -> None:
    save_model(model, directory, format="meta")
    sd = torch.load(directory / "consolidated.00.pth")
    edit(sd)
    torch.save(sd, directory / "consolidated.00.pth")


def test_unknown_missing_and_misshapen_keys_are_named(tiny_model, tmp_path):
    _edit_meta(tiny_model, tmp_path / "a", lambda sd: sd.update(extra=torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: unexpected key 'extra'"):
        load_model(tmp_path / "a")
    _edit_meta(tiny_model, tmp_path / "b", lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'layers\.1\.ffn_norm\.weight'"):
        load_model(tmp_path / "b")
    _edit_meta(tiny_model, tmp_path / "c", lambda sd: sd.update({"layers.0.attention.wq.weight": torch.zeros(64, 32)}))
    with pytest.raises(
        CheckpointError,
        match=r"consolidated\.00\.pth: 'layers\.0\.attention\.wq\.weight' has shape \(64, 32\), expected \(64, 64\)",
    ):
        load_model(tmp_path / "c")
    save_model(tiny_model, tmp_path / "d", format="hf")
    tensors = {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64), "model.norm.weight": torch.ones(64)}
    save_file(tensors, tmp_path / "d" / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unknown key 'model\.layers\.0\.self_attn\.o_proj\.bias'"
    ):
        load_model(tmp_path / "d")
    # A Qwen2-style q bias in a LLaMA config (model_type llama has none) is named, not dropped.
    tensors = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64), "model.norm.weight": torch.ones(64)}
    save_file(tensors, tmp_path / "d" / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unexpected key 'model\.layers\.0\.self_attn\.q_proj\.bias'"
    ):
        load_model(tmp_path / "d")


def test_unsupported_hf_config_is_named(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path, format="hf")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(CheckpointError, match=r"config\.json: rope_scaling=.* is not supported"):
        load_model(tmp_path)


def test_truncated_and_oversized_llama2c_files(tiny_model, tmp_path):
    path = tmp_path / "model.bin"
    _write_llama2c(tiny_model, path, tied=False)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=r"model\.bin: truncated llama2\.c checkpoint"):
        load_model(path)
    path.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model\.bin: header .* does not match the file size"):
        load_model(path)
    path.write_bytes(np.array([64, 96, 2, 8, 4, 0, 128], dtype="<i4").tobytes() + data[28:])
    with pytest.raises(CheckpointError, match="non-positive"):
        load_model(path)


def test_unknown_save_format(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="'gguf'"):
        save_model(tiny_model, tmp_path, format="gguf")
