"""The model: rotary convention, KV-cache decoding and left padding against a full forward, dtypes."""

from __future__ import annotations

import pytest
import torch

from lorapar.config import ModelArgs
from lorapar.model import Transformer, apply_rotary, rope_frequencies, rope_tables


def test_rotary_matches_meta_complex_multiply():
    # Meta's reference: view adjacent pairs as complex numbers and multiply by exp(i * pos * freq).
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 8
    x = torch.randn(B, T, H, D)
    ours = apply_rotary(x, rope_tables(T, rope_frequencies(ModelArgs(dim=D * H, n_heads=H)))[None, :, None])
    freqs = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
    rotation = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))
    reference = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation[None, :, None]).flatten(
        -2
    )
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def _greedy_extend(model, tokens, steps):
    """Prompt + `steps` greedy tokens by full forwards (no cache): the reference sequence."""
    seq = tokens.clone()
    for _ in range(steps):
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    return seq


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward_at_every_step(tiny_model):
    torch.manual_seed(1)
    prompt = torch.randint(0, 128, (2, 6))
    seq = _greedy_extend(tiny_model, prompt, 8)
    full = tiny_model(seq)
    cache = tiny_model.new_cache(2, seq.shape[1])
    got = [tiny_model(seq[:, :6], cache=cache)]
    for pos in range(6, seq.shape[1]):
        got.append(tiny_model(seq[:, pos : pos + 1], start_pos=pos, cache=cache))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_rows_match_unpadded_rows(tiny_model):
    torch.manual_seed(2)
    short, long = torch.randint(0, 128, (1, 3)), torch.randint(0, 128, (1, 7))
    batch = torch.cat(
        [torch.cat([torch.full((1, 4), 5), short], dim=1), long]
    )  # pad with a real id: it must not matter
    pad = torch.tensor([4, 0])
    cache = tiny_model.new_cache(2, 9)
    prefill = tiny_model(batch, pad=pad, cache=cache)
    torch.testing.assert_close(prefill[0, 4:], tiny_model(short)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill[1], tiny_model(long)[0], atol=1e-5, rtol=0)
    step = torch.tensor([[11], [12]])
    decoded = tiny_model(step, start_pos=7, pad=pad, cache=cache)
    torch.testing.assert_close(decoded[0, 0], tiny_model(torch.cat([short, step[:1]], 1))[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded[1, 0], tiny_model(torch.cat([long, step[1:]], 1))[0, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_grouped_query_attention_equals_repeated_kv_heads(tiny_model, tiny_args):
    # n_kv_heads=4 < n_heads=8: the same model with each kv head duplicated into 8 full heads is identical.
    full = Transformer(ModelArgs(**{**tiny_args.__dict__, "n_kv_heads": tiny_args.n_heads}))
    state = tiny_model.state_dict()
    D = tiny_args.head_dim
    for name in [n for n in state if n.endswith(("wk.weight", "wv.weight"))]:
        state[name] = (
            state[name].view(tiny_args.n_kv_heads, D, -1).repeat_interleave(2, dim=0).reshape(-1, tiny_args.dim)
        )
    full.load_state_dict(state)
    tokens = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(full(tokens), tiny_model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_forward_runs_and_stays_close(tiny_model, dtype):
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    reference = tiny_model(tokens)
    half = Transformer(tiny_model.args).to(dtype)
    half.load_state_dict(tiny_model.state_dict())
    logits = half(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 0.05  # random weights, logits of size ~1
    cache = half.new_cache(2, 11)
    half(tokens, cache=cache)
    assert cache.k.dtype == dtype and torch.isfinite(half(tokens[:, :1], start_pos=10, cache=cache)).all()


def test_tied_embeddings_share_one_tensor():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64)
    tied = Transformer(ModelArgs(**{**args.__dict__, "tie_embeddings": True}))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert Transformer(args).num_params() - tied.num_params() == 64 * 32


def test_cache_overflow_is_an_error(tiny_model):
    cache = tiny_model.new_cache(1, 4)
    with pytest.raises(ValueError, match="4 slots"):
        tiny_model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_eval_mode_restores_the_previous_mode_after_an_error(tiny_model):
    from lorapar.model import eval_mode

    tiny_model.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(tiny_model):
        assert not tiny_model.training and not tiny_model.layers[0].training
        raise RuntimeError("boom")
    assert tiny_model.training and tiny_model.layers[0].training
    with eval_mode(tiny_model.eval()):
        pass
    assert not tiny_model.training
