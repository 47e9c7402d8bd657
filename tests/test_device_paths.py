"""The training path on the test device (LORAPAR_TEST_DEVICE; cpu unless bench/gpu_suite.py asks for cuda).

On the CPU these check the fp32 path against itself moved through `.to(device)`; on a GPU they are the
CUDA checks: the kernels inside a real model, bf16 autocast, MaskedAdamW on device tensors, decoding.
"""

from __future__ import annotations

import copy

import torch

from lorapar.generate import generate
from lorapar.lora import LoraArgs, apply_lora, named_lora_parameters, set_masks
from lorapar.loss import answer_nll
from lorapar.optim import MaskedAdamW
from lorapar.precision import autocast

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64, 3, 8], [3, 3, 8, 120, 0, 11, 42, 17, 99, 4]])


def masked_model(tiny_model, seed=0):
    model = copy.deepcopy(tiny_model)
    apply_lora(model, LoraArgs(init="gaussian", r=4))
    gen = torch.Generator().manual_seed(seed)
    set_masks(model, {key: torch.rand(p.shape, generator=gen) < 0.4 for key, p in named_lora_parameters(model)})
    return model.train()


def grads_of(model, device, use_autocast=False):
    ids = TOKENS.to(device)
    labels = ids.clone()
    labels[:, :3] = -100
    with autocast(device) if use_autocast else torch.autocast(device.type, enabled=False):
        nll, n = answer_nll(model, ids, labels)
    (nll / n).backward()
    return (nll / n).item(), {key: p.grad.detach().cpu().clone() for key, p in named_lora_parameters(model)}


def test_fp32_gradients_on_the_device_match_the_cpu_and_respect_the_masks(tiny_model, device):
    cpu_model = masked_model(tiny_model)
    dev_model = copy.deepcopy(cpu_model).to(device)
    cpu_loss, cpu_grads = grads_of(cpu_model, torch.device("cpu"))
    dev_loss, dev_grads = grads_of(dev_model, device)
    assert abs(cpu_loss - dev_loss) < 1e-4
    masks = {
        key: m.mask_A if key.endswith("lora_A.weight") else m.mask_B
        for key, m in ((k, dict(dev_model.named_modules())[n]) for k, n in _key_modules(dev_model))
    }
    for key, grad in dev_grads.items():
        torch.testing.assert_close(grad, cpu_grads[key], rtol=1e-3, atol=1e-5)
        assert not grad[~masks[key].cpu()].any(), f"{key}: a frozen element received a gradient"


def _key_modules(model):
    from lorapar.lora import lora_modules
    from lorapar.lora_names import peft_key

    for name in lora_modules(model):
        yield peft_key(name, "A"), name
        yield peft_key(name, "B"), name


def test_autocast_loss_is_close_to_fp32(tiny_model, device):
    model = masked_model(tiny_model).to(device)
    fp32_loss, _ = grads_of(model, device)
    model.zero_grad(set_to_none=True)
    mixed_loss, mixed_grads = grads_of(model, device, use_autocast=True)
    assert abs(mixed_loss - fp32_loss) < 0.02 * abs(fp32_loss)  # bf16 on CUDA; identical on the CPU
    assert all(torch.isfinite(g).all() for g in mixed_grads.values())


def test_masked_adamw_on_the_device_never_moves_frozen_elements(tiny_model, device):
    model = masked_model(tiny_model).to(device)
    before = {key: p.detach().clone() for key, p in named_lora_parameters(model)}
    optimizer = MaskedAdamW.for_model(model, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grads_of(model, device, use_autocast=True)
        optimizer.clip_grad_norm_(0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for (key, p), (_, name) in zip(named_lora_parameters(model), _key_modules(model)):
        module = dict(model.named_modules())[name]
        mask = module.mask_A if key.endswith("lora_A.weight") else module.mask_B
        assert torch.equal(p[~mask], before[key][~mask]), f"{key}: a frozen element moved"
        assert not torch.equal(p[mask], before[key][mask]), f"{key}: no active element moved"
        assert optimizer.state[p]["exp_avg"].numel() == int(mask.sum())


def test_greedy_decoding_on_the_device_matches_the_cpu(tiny_model, device):
    prompts = [[1, 5, 9], [3, 3, 8, 120, 7]]
    on_cpu = generate(tiny_model, prompts, 6)
    on_device = generate(copy.deepcopy(tiny_model).to(device), prompts, 6)
    assert on_device.tokens == on_cpu.tokens
