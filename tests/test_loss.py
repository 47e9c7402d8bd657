"""The chunked output-layer log-probabilities against plain full-logits PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorapar.loss import IGNORE_INDEX, LinearLogSoftmaxGather, answer_nll, selected_logprobs, target_logprobs


def reference_logprobs(hidden, weight, targets, temperature=1.0):
    return torch.log_softmax(hidden @ weight.t() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen-W-jacobian-in-forward", "trained-W-recompute"])
def test_gradcheck_in_float64(temperature, weight_trains):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=weight_trains)
    targets = torch.tensor([0, 6, 3, 3, 1])
    inputs = (hidden, weight) if weight_trains else (hidden,)
    fn = (
        (lambda h, w: LinearLogSoftmaxGather.apply(h, w, targets, temperature, True))
        if weight_trains
        else (lambda h: LinearLogSoftmaxGather.apply(h, weight, targets, temperature, True))
    )
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 64])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_values_and_grads_equal_full_logits(chunk_tokens, weight_trains):
    gen = torch.Generator().manual_seed(1)
    output = torch.nn.Linear(16, 50, bias=False).requires_grad_(weight_trains)
    with torch.no_grad():
        output.weight.copy_(torch.randn(50, 16, generator=gen))
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    targets = torch.randint(50, (11,), generator=gen)
    upstream = torch.randn(11, generator=gen)

    ours = selected_logprobs(output, hidden, targets, temperature=0.8, chunk_tokens=chunk_tokens)
    (ours * upstream).sum().backward()
    ours_grads = hidden.grad.clone(), output.weight.grad
    hidden.grad = output.weight.grad = None
    expected = reference_logprobs(hidden, output.weight, targets, 0.8)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grads[0], hidden.grad, rtol=1e-5, atol=1e-5)
    if weight_trains:
        torch.testing.assert_close(ours_grads[1], output.weight.grad, rtol=1e-5, atol=1e-5)
    else:
        assert ours_grads[1] is None and output.weight.grad is None


def test_no_grad_calls_skip_the_jacobian_gemm():
    """Evaluation and GRPO's old/reference log-probs run under no_grad: one GEMM per chunk, not two."""
    output = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long)

    def gemms(grad: bool) -> int:
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            selected_logprobs(output, hidden, targets, chunk_tokens=4)
        return sum(event.count for event in prof.key_averages() if event.key == "aten::mm")

    assert (gemms(False), gemms(True)) == (2, 4)


def test_extreme_logits_stay_finite():
    """A logit of 1e4 overflows exp() unless the row maximum is subtracted first."""
    hidden = torch.tensor([[1e4, 0.0], [0.0, -1e4]], requires_grad=True)
    weight = torch.eye(2)
    logp = LinearLogSoftmaxGather.apply(hidden, weight, torch.tensor([1, 1]), 1.0, True)
    torch.testing.assert_close(logp, torch.tensor([-1e4, -1e4]))
    logp.sum().backward()
    assert torch.isfinite(hidden.grad).all()


def test_answer_nll_and_target_logprobs_match_cross_entropy(tiny_model):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(tiny_model.args.vocab_size, (3, 9), generator=gen)
    labels = ids.clone()
    labels[0, :4] = labels[1, :] = labels[2, 7:] = IGNORE_INDEX
    logits = tiny_model(ids)[:, :-1]
    full = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    nll, count = answer_nll(tiny_model, ids, labels, chunk_tokens=4)
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 11
    torch.testing.assert_close(nll, full, rtol=1e-5, atol=1e-5)
    logp, mask = target_logprobs(tiny_model, ids, labels, temperature=0.5, chunk_tokens=4)
    expected = torch.log_softmax(logits / 0.5, -1).gather(2, labels[:, 1:].clamp_min(0)[..., None]).squeeze(2)
    torch.testing.assert_close(logp[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert (logp[~mask] == 0).all()


@pytest.mark.parametrize("weight_trains", [False, True])
def test_bf16_autocast_runs_the_gemm_in_bf16_and_keeps_fp32_statistics(weight_trains):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 32, generator=gen, requires_grad=True)
    output = torch.nn.Linear(32, 40, bias=False).requires_grad_(weight_trains)
    targets = torch.randint(40, (6,), generator=gen)
    upstream = torch.randn(6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = selected_logprobs(output, hidden, targets)
    assert logp.dtype == torch.float32
    (logp * upstream).sum().backward()
    assert hidden.grad.dtype == torch.float32
    h16 = hidden.detach().bfloat16().float().requires_grad_()
    w16 = output.weight.detach().bfloat16().float().requires_grad_()
    expected = reference_logprobs(h16, w16, targets)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(logp, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(hidden.grad, h16.grad, rtol=2e-2, atol=2e-2)
    if weight_trains:
        torch.testing.assert_close(output.weight.grad, w16.grad, rtol=2e-2, atol=2e-2)


def test_output_with_bias_is_rejected():
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        selected_logprobs(torch.nn.Linear(4, 5), torch.randn(2, 4), torch.tensor([0, 1]))


def test_a_batch_without_labelled_tokens_still_backpropagates(tiny_model):
    """A micro-batch whose answers were all cut off contributes 0 to the step, not an error."""
    from lorapar.lora import LoraArgs, apply_lora

    apply_lora(tiny_model, LoraArgs(r=2))
    ids = torch.randint(tiny_model.args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    nll, count = answer_nll(tiny_model, ids, torch.full_like(ids, IGNORE_INDEX))
    assert count == 0 and nll.item() == 0.0
    nll.backward()
    assert all(p.grad is None or not p.grad.any() for p in tiny_model.parameters() if p.requires_grad)


def test_double_backward_is_a_clear_error():
    hidden = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logp = selected_logprobs(
        torch.nn.Linear(4, 6, bias=False).double().requires_grad_(False), hidden, torch.tensor([0, 1, 2])
    )
    (grad,) = torch.autograd.grad(logp.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()
