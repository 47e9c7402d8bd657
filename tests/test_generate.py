"""generate(): batched = one at a time, stops, log-probs, seeded sampling, top-k/top-p, the real stories260K."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorapar.checkpoint import load_model
from lorapar.generate import generate, prepacked_linears, sample

PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 2, 3, 4, 5, 6, 7, 8], [1, 40, 41]]

# Greedy continuation of BOS by the real stories260K.bin, cross-checked against an independent float64
# NumPy port of llama2.c's run.c forward.
STORIES260K_GREEDY = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264]


def _full_forward_logprobs(model, prompt, new):
    """Log-softmax of a cache-free forward over prompt + new tokens, at each new token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1]
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None])[:, 0]


def test_batched_mixed_lengths_equal_one_at_a_time(tiny_model):
    batched = generate(tiny_model, PROMPTS, max_new_tokens=12, pad_id=77)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(tiny_model, [prompt], max_new_tokens=12)
        assert batched.tokens[row] == alone.tokens[0]
        torch.testing.assert_close(
            torch.tensor(batched.logprobs[row]), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=0
        )
    assert batched.finished == [False] * len(PROMPTS)


def test_greedy_tokens_and_logprobs_match_a_full_forward(tiny_model):
    out = generate(tiny_model, PROMPTS[:2], max_new_tokens=10)
    for prompt, new, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        with torch.no_grad():
            seq = torch.tensor([prompt + new])
            assert tiny_model(seq)[0, len(prompt) - 1 : -1].argmax(-1).tolist() == new
        torch.testing.assert_close(
            torch.tensor(logprobs), _full_forward_logprobs(tiny_model, prompt, new), atol=1e-5, rtol=0
        )


def test_rows_stop_at_their_own_stop_ids(tiny_model):
    free = generate(tiny_model, PROMPTS, max_new_tokens=12)
    stop = free.tokens[1][3]  # row 1 will hit it at step 3 (or earlier if it also appears before)
    out = generate(tiny_model, PROMPTS, max_new_tokens=12, eos_id=stop, stop_ids=[free.tokens[2][0]])
    for row, tokens in enumerate(free.tokens):
        hits = [i for i, t in enumerate(tokens) if t in (stop, free.tokens[2][0])]
        expected = tokens[: hits[0] + 1] if hits else tokens
        assert out.tokens[row] == expected  # stop token included, nothing after it
        assert out.finished[row] == bool(hits)
        assert len(out.logprobs[row]) == len(expected)
    assert out.finished[1] and out.finished[2] and len(out.tokens[2]) == 1


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.9)])
def test_seeded_sampling_is_deterministic_and_reports_untruncated_logprobs(tiny_model, top_k, top_p):
    kwargs = dict(max_new_tokens=8, temperature=0.8, top_k=top_k, top_p=top_p)
    first = generate(tiny_model, PROMPTS, seed=123, **kwargs)
    assert generate(tiny_model, PROMPTS, seed=123, **kwargs) == first
    assert generate(tiny_model, PROMPTS, seed=124, **kwargs).tokens != first.tokens
    for prompt, new, logprobs in zip(PROMPTS, first.tokens, first.logprobs):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1] / 0.8
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-5, rtol=0)


def test_per_row_seeds_make_each_row_independent_of_the_batch(tiny_model):
    """One seed per row: a row samples what it samples alone, also after other rows stopped (the
    generators follow their rows as the batch shrinks)."""
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.95)
    seeds = [11, 12, 13, 14]
    free = generate(tiny_model, PROMPTS, seed=seeds, **kwargs)
    stop = free.tokens[1][2]
    batched = generate(tiny_model, PROMPTS, seed=seeds, eos_id=stop, pad_id=77, **kwargs)
    assert any(batched.finished) and not all(batched.finished)
    for row, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = generate(tiny_model, [prompt], seed=[seed], eos_id=stop, **kwargs)
        assert batched.tokens[row] == alone.tokens[0], row
    reordered = generate(tiny_model, PROMPTS[::-1], seed=seeds[::-1], eos_id=stop, **kwargs)
    assert reordered.tokens[::-1] == batched.tokens
    assert len({tuple(t) for t in generate(tiny_model, [PROMPTS[0]] * 4, seed=seeds, **kwargs).tokens}) > 1
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        generate(tiny_model, PROMPTS, seed=seeds[:3], **kwargs)


def test_sample_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 2, 1.0, gen)[0].tolist()) == {0, 1}
    assert set(sample(logits, 1.0, 0, 0.6, gen)[0].tolist()) == {0, 1}  # 0.5 < 0.6: the second token is needed
    assert set(sample(logits, 1.0, 0, 0.5, gen)[0].tolist()) == {0}
    assert set(sample(logits, 1.0, 3, 0.82, gen)[0].tolist()) == {
        0,
        1,
    }  # renormalised over the top 3: 0.8 / 0.95 >= 0.82
    assert set(sample(logits, 1.0, 0, 1.0, gen)[0].tolist()) == {0, 1, 2, 3}
    token, logprob = sample(logits[:1], 0.0, 0, 1.0, None)
    assert token.tolist() == [0] and logprob.item() == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-6)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="prepacking needs MKL")
def test_prepacked_decoding_agrees_and_is_undone(tiny_model):
    x = torch.randn(len(PROMPTS), 1, tiny_model.args.dim)
    with torch.no_grad(), prepacked_linears(tiny_model, rows=len(PROMPTS)):
        assert "forward" in vars(tiny_model.output)
        torch.testing.assert_close(tiny_model.output(x), x @ tiny_model.output.weight.T, atol=1e-5, rtol=0)
    assert "forward" not in vars(tiny_model.output)
    plain, packed = generate(tiny_model, PROMPTS, 10), generate(tiny_model, PROMPTS, 10, prepack=True)
    assert packed.tokens == plain.tokens
    torch.testing.assert_close(torch.tensor(packed.logprobs), torch.tensor(plain.logprobs), atol=1e-5, rtol=0)


def test_restores_training_mode_and_rejects_bad_arguments(tiny_model):
    tiny_model.train()
    generate(tiny_model, [[1, 2]], max_new_tokens=2)
    assert tiny_model.training
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny_model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny_model, [[1] * 100], max_new_tokens=29)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, [[1]], max_new_tokens=2, top_p=0.0)


def test_real_stories260k_greedy_from_bos(asset):
    model = load_model(asset("models/stories260K.bin"))
    steps = 32
    cached = generate(model, [[1]], max_new_tokens=steps)
    assert generate(model, [[1]], max_new_tokens=steps) == cached
    assert cached.tokens[0][: len(STORIES260K_GREEDY)] == STORIES260K_GREEDY
    seq = [1]
    with torch.no_grad():
        for _ in range(steps):  # the cache-free path: a full forward over the whole sequence each step
            seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert cached.tokens[0] == seq[1:]
