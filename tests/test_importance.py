import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lorapar.data import Example
from lorapar.dist import DistInfo
from lorapar.importance import (
    ImportanceArgs,
    accumulate_moments,
    encode_for_scoring,
    importance_from_moments,
    score_rows,
    select_examples,
)
from lorapar.lora import apply_lora, named_lora_parameters
from lorapar.loss import IGNORE_INDEX


def scoring_model(tiny_model, init="gaussian"):
    apply_lora(tiny_model, ImportanceArgs(rank=4, lora_alpha=8.0, init=init, init_std=0.05).lora_args())
    return tiny_model


def random_rows(n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = 2 + i % 3
        rows.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def hand_importance(model, rows):
    """Every per-example gradient kept explicitly (loss from full logits), then the formulas."""
    named = named_lora_parameters(model)
    per_example = []
    for ids, labels in rows:
        ids, labels = torch.tensor(ids), torch.tensor(labels)
        logits = model(ids[None])[0, :-1]
        loss = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX)  # mean over answer tokens
        per_example.append(torch.autograd.grad(loss, [p for _, p in named]))
    second, first = {}, {}
    for j, (key, p) in enumerate(named):
        g = torch.stack([grads[j] for grads in per_example])  # (n_examples, *shape)
        phi = p.detach()
        second[key] = ((g * phi).mean(0) - 0.5 * (g**2).mean(0) * phi**2).abs()
        first[key] = (g * phi).mean(0).abs()
    return second, first


def test_scores_equal_hand_computation(tiny_model):
    model = scoring_model(tiny_model)
    rows = random_rows(5)
    second, first = hand_importance(model, rows)
    moments = accumulate_moments(model, rows)
    assert moments.count == 5 and moments.tokens == sum(sum(x != IGNORE_INDEX for x in lab[1:]) for _, lab in rows)
    for order, expected in (("second", second), ("first", first)):
        scores = importance_from_moments(model, moments, order)
        assert list(scores) == [k for k, _ in named_lora_parameters(model)]
        for key, value in expected.items():
            assert scores[key].shape == value.shape
            torch.testing.assert_close(scores[key], value, rtol=1e-4, atol=1e-5 * float(value.max()))
    assert all(v.abs().sum() > 0 for v in second.values())  # a test that can see a zero-score bug
    assert not torch.equal(second[next(iter(second))], first[next(iter(first))])


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_per_example_gradients_equal_the_loop(tiny_model, batch_size):
    model = scoring_model(tiny_model)
    rows = random_rows(5)  # lengths 6..10: batches are right-padded
    loop = accumulate_moments(model, rows)
    batched = accumulate_moments(model, rows, batch_size=batch_size)
    assert (batched.count, batched.tokens) == (loop.count, loop.tokens)
    for mine, reference in ((batched.sum_grad, loop.sum_grad), (batched.sum_grad_sq, loop.sum_grad_sq)):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))
    assert loop.sum_grad_sq.min() >= 0 and loop.sum_grad_sq.max() > 0


def test_zero_B_init_gives_zero_A_scores(tiny_model):
    """Why the scoring adapter is gaussian: with peft's init (B = 0) no gradient reaches A."""
    model = scoring_model(tiny_model, init="lora")
    scores, _ = score_rows(model, random_rows(2))
    assert all(not v.any() for k, v in scores.items() if ".lora_A." in k)


def test_scoring_leaves_model_mode_and_grads_alone(tiny_model):
    model = scoring_model(tiny_model).train()
    accumulate_moments(model, random_rows(2))
    assert model.training and all(p.grad is None for p in model.parameters())


def test_select_examples_is_seeded_and_filters_by_system():
    examples = [Example(f"q{i}", f"a{i}", None, 1 + (i % 3 == 0), {}, line=i + 1) for i in range(30)]
    chosen, available = select_examples(examples, system=2, samples=4, seed=3)
    assert available == 10 and len(chosen) == 4 and all(e.system == 2 for e in chosen)
    assert [e.line for e in chosen] == sorted(e.line for e in chosen)  # file order
    assert chosen == select_examples(examples, 2, 4, seed=3)[0]
    assert chosen != select_examples(examples, 2, 4, seed=4)[0]
    everything, available = select_examples(examples, system=1, samples=100, seed=0)
    assert available == 20 and len(everything) == 20


class CharTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [3 + ord(c) % 100 for c in text] + [self.eos_id] * eos


def test_encoding_counts_truncated_and_unscorable_examples():
    examples = [Example("hi", "yes", None, 1, {}), Example("x" * 40, "long answer", None, 1, {})]
    args = ImportanceArgs(max_len=20, template="plain")
    encoded = encode_for_scoring(examples, CharTokenizer(), args)
    # "Question: hi\nAnswer:" is 20 chars + BOS: the first example's answer is cut away entirely too
    assert (len(encoded.rows), encoded.truncated, encoded.no_answer_tokens) == (0, 2, 2)
    encoded = encode_for_scoring(examples, CharTokenizer(), ImportanceArgs(max_len=30, template="plain"))
    assert (len(encoded.rows), encoded.truncated, encoded.no_answer_tokens) == (1, 1, 1)
    assert all(len(ids) <= 30 for ids, _ in encoded.rows)


def test_lorapar_rows_batched_equal_one_at_a_time_to_1e_6(tiny_model):
    """example.py backpropagates one example at a time; the default batched per-example path gives the
    same moments, to 1e-6 of the largest, on rows encoded as the authors' collate_fn (no BOS, question
    + EOS, the answer with no final EOS) and of different lengths, so batches are padded."""
    assert ImportanceArgs().batch_size > 1 and ImportanceArgs().template == "lorapar"
    examples = [Example("q" * n, "a" * (3 + 2 * n), None, 1, {}) for n in range(1, 6)]
    rows = encode_for_scoring(examples, CharTokenizer(), ImportanceArgs()).rows
    assert rows[0][0] == [3 + ord("q") % 100, 2] + [3 + ord("a") % 100] * 5  # no BOS, EOS after the question
    model = scoring_model(tiny_model)
    loop = accumulate_moments(model, rows)
    batched = accumulate_moments(model, rows, batch_size=ImportanceArgs().batch_size)
    for mine, reference in ((batched.sum_grad, loop.sum_grad), (batched.sum_grad_sq, loop.sum_grad_sq)):
        assert float((mine - reference).abs().max()) <= 1e-6 * float(reference.abs().max())


def test_bad_importance_args():
    with pytest.raises(ValueError, match="samples must be >= 1"):
        ImportanceArgs(samples=0)
    with pytest.raises(ValueError, match="order must be one of"):
        ImportanceArgs(order="third")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ImportanceArgs(batch_size=0)


# ----------------------------------------------------------------------------- two processes, gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir):
    import torch.distributed as dist

    from lorapar.config import ModelArgs
    from lorapar.model import Transformer
    from tests.conftest import TINY_ARGS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = Transformer(ModelArgs(**TINY_ARGS))
        model.init_weights(seed=0)
        model = scoring_model(model.eval())
        scores, moments = score_rows(
            model, random_rows(5), info=DistInfo(rank=rank, world_size=world_size), batch_size=2
        )
        torch.save((scores, moments.count, moments.tokens), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_all_reduce_to_the_single_process_scores(tiny_model, tmp_path):
    """Two gloo ranks, batched, against one process with the one-at-a-time loop."""
    single, moments = score_rows(scoring_model(tiny_model), random_rows(5))
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        scores, count, tokens = torch.load(tmp_path / f"rank{rank}.pt")
        assert (count, tokens) == (5, moments.tokens)  # 3 + 2 examples
        for key, value in single.items():
            torch.testing.assert_close(scores[key], value, rtol=1e-5, atol=1e-6 * float(value.max()))
