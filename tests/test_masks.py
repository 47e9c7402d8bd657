"""Mask files and MaskedAdamW: frozen elements never move, packed state, AdamW parity, clipping, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from lorapar.lora import LoraArgs, apply_lora, named_lora_parameters, set_masks
from lorapar.masks import load_masks, param_masks, save_masks
from lorapar.model import Transformer
from lorapar.optim import MaskedAdamW

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64], [3, 3, 8, 120, 0, 11, 42, 17]])


def lora_model(tiny_args, fraction=0.4, seed=0):
    """Tiny LLaMA with a gaussian-initialised adapter and random masks keeping about `fraction`."""
    model = Transformer(tiny_args)
    model.init_weights(seed=0)
    apply_lora(model, LoraArgs(init="gaussian", r=4, targets=("q", "k", "v", "o", "gate", "up", "down")))
    gen = torch.Generator().manual_seed(seed)
    masks = {key: torch.rand(p.shape, generator=gen) < fraction for key, p in named_lora_parameters(model)}
    set_masks(model, masks)
    return model.train(), masks


def train_step(model, optimizer, step, clip=None):
    """One step on a deterministic batch; the loss makes every gradient element non-zero."""
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, model.args.vocab_size, (2, 8), generator=gen)
    optimizer.zero_grad()
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    if clip is not None:
        optimizer.clip_grad_norm_(clip)
    optimizer.step()


# ----------------------------------------------------------------------------- files


def test_mask_files_round_trip_flat_and_staged(tmp_path, tiny_args):
    _, masks = lora_model(tiny_args)
    other = {k: ~v for k, v in masks.items()}
    save_masks(tmp_path / "flat.safetensors", masks)
    save_masks(tmp_path / "staged.safetensors", {"stage1": masks, "stage2": other})
    flat = load_masks(tmp_path / "flat.safetensors")
    assert set(flat) == set(masks) and all(torch.equal(flat[k], masks[k]) for k in masks)
    stage2 = load_masks(tmp_path / "staged.safetensors", stage="stage2")
    assert all(torch.equal(stage2[k], other[k]) for k in masks)
    both = load_masks(tmp_path / "staged.safetensors")
    assert set(both) == {"stage1", "stage2"} and all(torch.equal(both["stage1"][k], masks[k]) for k in masks)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "staged.safetensors"), "pt") as handle:
        assert f"stage1.{next(iter(masks))}" in handle.keys()


def test_mask_file_errors(tmp_path, tiny_args):
    _, masks = lora_model(tiny_args)
    save_masks(tmp_path / "staged.safetensors", {"stage1": masks})
    with pytest.raises(KeyError, match=r"no masks for stage 'stage2'.*\['stage1'\]"):
        load_masks(tmp_path / "staged.safetensors", stage="stage2")
    key = next(iter(masks))
    save_file({key: masks[key].float()}, tmp_path / "float.safetensors")
    with pytest.raises(TypeError, match=f"{key} has dtype torch.float32, expected bool"):
        load_masks(tmp_path / "float.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_masks(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="bool"):
        save_masks(tmp_path / "bad.safetensors", {key: masks[key].int()})
    with pytest.raises(ValueError, match="mixture"):
        save_masks(tmp_path / "bad.safetensors", {"stage1": masks, key: masks[key]})


# ----------------------------------------------------------------------------- the optimizer


def test_frozen_elements_are_bit_identical_after_50_steps_with_decay_and_clipping(tiny_args):
    model, masks = lora_model(tiny_args)
    before = {k: p.detach().clone() for k, p in named_lora_parameters(model)}
    optimizer = MaskedAdamW.for_model(model, lr=1e-2, weight_decay=0.1)
    for step in range(50):
        train_step(model, optimizer, step, clip=0.1)
    for key, p in named_lora_parameters(model):
        frozen, active = ~masks[key], masks[key]
        assert torch.equal(p[frozen], before[key][frozen]), key
        assert (p[active] != before[key][active]).all(), key  # every active element did train


def test_plain_adamw_moves_frozen_elements_which_is_why_this_exists(tiny_args):
    """The authors' approach (masked gradients + AdamW) changes frozen elements through weight decay."""
    model, masks = lora_model(tiny_args)
    key, p = named_lora_parameters(model)[0]
    before = p.detach().clone()
    optimizer = torch.optim.AdamW([p for _, p in named_lora_parameters(model)], lr=1e-2, weight_decay=0.1)
    train_step(model, optimizer, 0)
    assert p.grad[~masks[key]].abs().sum() == 0  # the kernel did mask the gradient ...
    assert not torch.equal(p[~masks[key]], before[~masks[key]])  # ... yet decay moved the element


def test_state_holds_only_the_active_elements(tiny_args):
    model, masks = lora_model(tiny_args)
    optimizer = MaskedAdamW.for_model(model, lr=1e-3)
    train_step(model, optimizer, 0)
    for key, p in named_lora_parameters(model):
        state = optimizer.state[p]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == int(masks[key].sum())
    total_state = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert total_state == sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("mask_kind", ["all_true", "none"])
def test_all_true_masks_match_torch_adamw_over_20_steps(mask_kind):
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 32), (48, 8), (5,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    entries = [(p, torch.ones_like(p, dtype=torch.bool) if mask_kind == "all_true" else None) for p in ours]
    hyper = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    optimizer, reference = MaskedAdamW(entries, **hyper), torch.optim.AdamW(theirs, **hyper)
    for _ in range(20):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        torch.testing.assert_close(optimizer.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
        optimizer.step(), reference.step()
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-6


def test_clipping_counts_only_active_elements():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    p.grad = torch.full((4, 4), 100.0)
    p.grad[0] = torch.tensor([3.0, 0.0, 4.0, 0.0])  # active norm 5; the frozen rows would add 1200
    optimizer = MaskedAdamW([(p, mask)], lr=1e-3)
    assert optimizer.clip_grad_norm_(1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad[0], torch.tensor([0.6, 0.0, 0.8, 0.0]), rtol=1e-5, atol=1e-6)


def test_resume_from_state_dict_equals_an_uninterrupted_run(tiny_args, tmp_path):
    def run(steps, resume_from=None):
        model, _ = lora_model(tiny_args)
        optimizer = MaskedAdamW.for_model(model, lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        start = 0
        if resume_from is not None:
            saved = torch.load(resume_from, weights_only=True)
            with torch.no_grad():
                for (_, p), value in zip(named_lora_parameters(model), saved["params"]):
                    p.copy_(value)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            start = saved["step"]
        for step in range(start, steps):
            train_step(model, optimizer, step, clip=0.5)
            scheduler.step()
        return model, optimizer, scheduler

    straight, _, _ = run(10)
    model, optimizer, scheduler = run(4)
    torch.save(
        {
            "params": [p.detach() for _, p in named_lora_parameters(model)],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": 4,
        },
        tmp_path / "ckpt.pt",
    )
    resumed, optimizer, _ = run(10, resume_from=tmp_path / "ckpt.pt")
    for (key, a), (_, b) in zip(named_lora_parameters(straight), named_lora_parameters(resumed)):
        assert torch.equal(a, b), key
    masks_now = dict(zip(optimizer.param_groups[0]["names"], optimizer.param_groups[0]["masks"]))
    model_masks = {n: m for n, _, m in param_masks(resumed)}
    assert all(masks_now[n] is model_masks[n] for n in model_masks)  # still the model's own mask tensors


def test_load_state_dict_rejects_other_masks(tiny_args):
    model, _ = lora_model(tiny_args, seed=0)
    optimizer = MaskedAdamW.for_model(model, lr=1e-3)
    train_step(model, optimizer, 0)
    other, _ = lora_model(tiny_args, seed=1)
    with pytest.raises(ValueError, match=r"mask of layers\.0\.attention\.wq\.lora_A differs"):
        MaskedAdamW.for_model(other, lr=1e-3).load_state_dict(optimizer.state_dict())


def test_update_masks_keeps_the_state_of_elements_that_stay_active(tiny_args):
    model, masks = lora_model(tiny_args, fraction=0.6)
    optimizer = MaskedAdamW.for_model(model, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        train_step(model, optimizer, step)
    key, p = named_lora_parameters(model)[0]
    old_mask = masks[key]
    dense_before = torch.zeros_like(p).masked_scatter_(old_mask, optimizer.state[p]["exp_avg"])
    pruned = {k: m & (torch.arange(m.numel()).view(m.shape) % 2 == 0) for k, m in masks.items()}  # prune about half
    set_masks(model, pruned)
    optimizer.sync_masks(model)
    new_mask = pruned[key]
    assert optimizer.state[p]["exp_avg"].numel() == int(new_mask.sum())
    assert torch.equal(optimizer.state[p]["exp_avg"], dense_before[new_mask])
    before = {k: q.detach().clone() for k, q in named_lora_parameters(model)}
    for step in range(3, 6):
        train_step(model, optimizer, step, clip=0.1)
    for k, q in named_lora_parameters(model):
        assert torch.equal(q[~pruned[k]], before[k][~pruned[k]]), k
    with pytest.raises(KeyError, match="not in this optimizer"):
        optimizer.update_masks({torch.nn.Parameter(torch.zeros(2)): None})
    mask = optimizer.param_groups[0]["masks"][0]
    mask.fill_(True)  # edited in place, behind the optimizer's back
    with pytest.raises(RuntimeError, match="not in place"):
        train_step(model, optimizer, 6)


def test_bad_masks_and_params_are_rejected():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"mask of w must be a bool tensor of shape \(3, 4\)"):
        MaskedAdamW([("w", p, torch.ones(4, 3, dtype=torch.bool))])
    with pytest.raises(ValueError, match="bool"):
        MaskedAdamW([(p, torch.ones(3, 4))])
    with pytest.raises(ValueError, match="invalid hyper-parameters"):
        MaskedAdamW([p], lr=-1.0)
    frozen = Transformer.__new__(Transformer)
    torch.nn.Module.__init__(frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MaskedAdamW.for_model(frozen)


def test_param_groups_and_for_model_read_the_module_masks(tiny_args):
    model, masks = lora_model(tiny_args)
    optimizer = MaskedAdamW.for_model(model, lr=1e-3)
    group = optimizer.param_groups[0]
    assert len(group["params"]) == len(masks)
    modules = dict(model.named_modules())
    for name, mask in zip(group["names"], group["masks"]):
        module_name, param = name.rsplit(".", 1)
        assert mask is getattr(modules[module_name], {"lora_A": "mask_A", "lora_B": "mask_B"}[param])
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    two = MaskedAdamW([{"params": [a], "lr": 0.1}, {"params": [(b, None)], "weight_decay": 0.0}], lr=1e-3)
    assert [g["lr"] for g in two.param_groups] == [0.1, 1e-3] and two.param_groups[1]["weight_decay"] == 0.0
    copy.deepcopy(two.state_dict())


# ----------------------------------------------------------------------------- data parallel


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, world_size, port, out_dir):
    import os

    import torch.distributed as dist

    from lorapar.config import ModelArgs
    from tests.conftest import TINY_ARGS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, masks = lora_model(ModelArgs(**TINY_ARGS))
        before = [p.detach().clone() for _, p in named_lora_parameters(model)]
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = MaskedAdamW.for_model(ddp, lr=1e-2, weight_decay=0.1)
        for step in range(3):
            gen = torch.Generator().manual_seed(100 * step + rank)  # each rank sees its own batch
            tokens = torch.randint(0, 128, (2, 8), generator=gen)
            optimizer.zero_grad()
            logits = ddp(tokens)
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizer.clip_grad_norm_(0.1)
            optimizer.step()
        torch.save(
            ([p.detach() for _, p in named_lora_parameters(model)], before, masks),
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical_and_frozen_elements_never_move(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    after0, before, masks = torch.load(tmp_path / "rank0.pt")
    after1, _, _ = torch.load(tmp_path / "rank1.pt")
    for a0, a1, b, mask in zip(after0, after1, before, masks.values()):
        assert torch.equal(a0, a1)  # the all-reduced gradients give every rank the same norm and update
        assert torch.equal(a0[~mask], b[~mask]) and not torch.equal(a0[mask], b[mask])
