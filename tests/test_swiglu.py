"""SwiGLU and the feed-forward's rebuilt down-projection input: autograd's gradients with less saved."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from lorapar import model as model_module
from lorapar.lora import LoraArgs, apply_lora
from lorapar.swiglu import SwiGLU


def test_swiglu_gradients_equal_autograd_in_float64():
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 5, dtype=torch.float64, generator=gen) * 4).requires_grad_()
    b = torch.randn(3, 5, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(SwiGLU.apply, (a, b))
    torch.testing.assert_close(SwiGLU.apply(a, b), F.silu(a) * b, rtol=0, atol=0)


def plain_forward(self, x):
    """What autograd alone does: the multiply saves silu(a), w2 saves h."""
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


def lora_grads(model, tokens, monkeypatch, plain=False, checkpointing=False, wrap=None):
    with monkeypatch.context() as patch:
        if plain:
            patch.setattr(model_module.FeedForward, "forward", plain_forward)
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        with wrap() if wrap else torch.enable_grad():
            loss = model(tokens).logsumexp(-1).sum()
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def adapted(tiny_model):
    apply_lora(tiny_model, LoraArgs(targets=("up", "down"), init="gaussian", init_std=0.1))
    tokens = torch.randint(tiny_model.args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    return tiny_model.train(), tokens


@pytest.mark.parametrize("policy", ["none", "checkpointing", "save_on_cpu"])
def test_rebuilt_down_input_gives_autograds_gradients(adapted, policy, monkeypatch):
    """Alone, and under an outer saved-tensor policy (which then keeps its say over h)."""
    model, tokens = adapted
    ours = lora_grads(
        model,
        tokens,
        monkeypatch,
        checkpointing=policy == "checkpointing",
        wrap=torch.autograd.graph.save_on_cpu if policy == "save_on_cpu" else None,
    )
    plain = lora_grads(model, tokens, monkeypatch, plain=True)
    assert ours.keys() == plain.keys() and len(ours) == 8
    for name in ours:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_feed_forward_trains_like_the_eager_one():
    """Under torch.compile h.grad_fn is not SwiGLU's node, so the rebuild must stand aside."""
    torch.manual_seed(0)
    feed_forward = model_module.FeedForward(8, 16)  # all weights train: w2 saves h for dW
    x = torch.randn(3, 8)
    feed_forward(x).square().sum().backward()
    eager = [p.grad.clone() for p in feed_forward.parameters()]
    feed_forward.zero_grad(set_to_none=True)
    torch.compile(feed_forward, backend="eager")(x).square().sum().backward()
    for ours, expected in zip((p.grad for p in feed_forward.parameters()), eager, strict=True):
        torch.testing.assert_close(ours, expected)


def test_down_projection_does_not_keep_its_input_alive(tiny_model):
    """After forward nothing references h = silu(a) * b: the LoRA on w2 saved its recipe, not h."""
    apply_lora(tiny_model, LoraArgs(targets=("down",)))
    feed_forward = tiny_model.layers[0].feed_forward
    seen = []
    handle = feed_forward.w2.register_forward_hook(lambda module, args, out: seen.append(weakref.ref(args[0])))
    out = feed_forward(torch.randn(2, 3, tiny_model.args.dim, requires_grad=True))
    handle.remove()
    gc.collect()
    assert out.requires_grad and seen[0]() is None
    out.sum().backward()
    assert feed_forward.w2.lora_A.grad is not None


def test_in_place_change_of_a_saved_tensor_is_still_an_error(tiny_model):
    """Autograd skips its version check under saved-tensor hooks; the hooks must do it themselves."""
    apply_lora(tiny_model, LoraArgs(targets=("down",), init="gaussian"))
    feed_forward = tiny_model.layers[0].feed_forward
    out = feed_forward(torch.randn(2, 3, tiny_model.args.dim, requires_grad=True))
    with torch.no_grad():
        feed_forward.w2.lora_B.add_(1.0)  # e.g. an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_down_projection_that_changes_its_input_in_place_sees_its_own_input(tiny_model):
    """A tensor that shares h's memory but was changed after SwiGLU is not rebuilt from a and b."""

    class DoublingLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x.mul_(2.0))

    feed_forward = tiny_model.layers[0].feed_forward
    down = DoublingLinear(feed_forward.w2.in_features, feed_forward.w2.out_features, bias=False)
    with torch.no_grad():
        down.weight.copy_(feed_forward.w2.weight)
    feed_forward.w2 = down
    x = torch.randn(2, 3, tiny_model.args.dim, requires_grad=True)
    feed_forward(x).sum().backward()
    ours = down.weight.grad.clone()
    down.weight.grad = None
    plain_forward(feed_forward, x).sum().backward()
    torch.testing.assert_close(ours, down.weight.grad)
