"""Dual-Module Collaborative LoRA: init, merge, orthogonality loss, budget schedule, screening, training."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton decides at kernel decoration (first import) whether to interpret.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.function import triton_kernels  # noqa: E402
from lorapar.adapter import load_adapter as lora_load_adapter  # noqa: E402
from lorapar.budget import ExpertScreener, SensitivityEMA, budget_at, component_scores, select_survivors
from lorapar.dual import (  # noqa: E402
    DualArgs,
    adapter_key,
    apply_dual,
    dual_modules,
    get_dual_masks,
    is_dual_adapter,
    load_dual_adapter,
    orthogonality_loss,
    save_dual_adapter,
)
from lorapar.lora import disable_adapter, merge, unmerge  # noqa: E402

SMALL = dict(dual_rank=12, dual_shared_rank=4, dual_alpha=12.0, dual_target_rank=5.0)  # r_e = 8, s = 1


def tokens(vocab: int = 128, batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- budget and screening math


def test_budget_schedule_warmup_quadratic_and_final_phase():
    T, t_init, t_final, initial, target = 110, 10, 20, 96_000, 80_000  # 1000 modules, r_e 96 -> 80
    budgets = [budget_at(s, T, initial, target, t_init, t_final) for s in range(0, T + 1)]
    assert budgets[: t_init + 1] == [initial] * (t_init + 1)
    assert budgets[T - t_final - 1] > target and budgets[T - t_final] == target
    assert all(b == target for b in budgets[T - t_final :])
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never grows
    # Quadratic: a quarter of the way through the pruning phase, (3/4)^2 of the excess remains.
    step = t_init + (T - t_final - t_init) // 4
    assert budgets[step] == int(target + (initial - target) * 0.75**2)
    assert budget_at(step, T, initial, target, t_init, t_final, power=3.0) == int(target + (initial - target) * 0.75**3)


def test_budget_schedule_rejects_phases_longer_than_training():
    with pytest.raises(ValueError, match="t_init"):
        budget_at(1, 50, 96, 80, t_init=30, t_final=20)
    with pytest.raises(ValueError, match="target budget"):
        budget_at(1, 50, 96, 120, t_init=0, t_final=0)


def test_sensitivity_ema_matches_adalora_recurrence():
    ema = SensitivityEMA(beta1=0.85, beta2=0.5)
    w = torch.tensor([1.0, -2.0, 0.0])
    grads = [torch.tensor([0.5, 1.0, 3.0]), torch.tensor([-1.0, 0.25, 1.0])]
    i_bar, u_bar = torch.zeros(3), torch.zeros(3)
    for g in grads:
        ema.update("p", w, g)
        current = (w * g).abs()
        i_bar = 0.85 * i_bar + 0.15 * current
        u_bar = 0.5 * u_bar + 0.5 * (current - i_bar).abs()
    torch.testing.assert_close(ema.score("p"), i_bar * u_bar)
    assert ema.score("p")[2] == 0  # a zero weight is never sensitive
    with pytest.raises(RuntimeError, match="no gradient"):
        ema.update("q", w, None)


def test_component_scores_and_global_selection_are_monotone():
    score_A = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])  # (r=3, in=2): row means 2, 0, 2
    score_B = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 2.0]])  # (out=2, r=3): column means 1, 0, 1
    score_E = torch.tensor([0.0, 5.0, 1.0])
    torch.testing.assert_close(component_scores(score_A, score_B, score_E), torch.tensor([3.0, 5.0, 4.0]))

    scores = [torch.tensor([3.0, 5.0, 4.0]), torch.tensor([9.0, 1.0])]
    alive = [torch.tensor([True, True, True]), torch.tensor([False, True])]  # 9.0 is already pruned
    kept = select_survivors(scores, alive, budget=2)
    assert [k.tolist() for k in kept] == [[False, True, True], [False, False]]
    same = select_survivors(scores, alive, budget=10)
    assert [k.tolist() for k in same] == [a.tolist() for a in alive]


# ----------------------------------------------------------------------------- the module


def test_output_unchanged_at_init_and_shared_module_is_principal(tiny_model):
    x = tokens()
    before = tiny_model(x)
    w0 = tiny_model.layers[0].attention.wq.weight.detach().clone()
    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    assert len(modules) == 2 * 6 and all(m.expert_E.abs().sum() == 0 for m in modules.values())
    torch.testing.assert_close(tiny_model(x), before, atol=2e-5, rtol=1e-5)
    wq = modules["layers.0.attention.wq"]
    U, S, Vh = torch.linalg.svd(w0)
    torch.testing.assert_close(wq.scale * wq.lora_B @ wq.lora_A, U[:, :4] * S[:4] @ Vh[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wq.weight + wq.scale * wq.lora_B @ wq.lora_A, w0, atol=1e-5, rtol=1e-5)
    assert 0.015 < wq.expert_A.std() < 0.025 and 0.015 < wq.expert_B.std() < 0.025
    with disable_adapter(tiny_model):
        torch.testing.assert_close(tiny_model(x), before, atol=2e-5, rtol=1e-5)


def test_every_part_gets_gradient_after_the_first_step(tiny_model):
    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    wq = modules["layers.0.attention.wq"]
    tiny_model(tokens()).logsumexp(-1).mean().backward()
    assert wq.expert_E.grad.abs().min() > 0  # E = 0 but its gradient is b_i^T g a_i x
    assert wq.expert_A.grad.abs().sum() == 0 and wq.expert_B.grad.abs().sum() == 0  # both scaled by E = 0
    with torch.no_grad():
        wq.expert_E -= 0.1 * wq.expert_E.grad  # one SGD step moves the gates ...
    tiny_model.zero_grad()
    tiny_model(tokens()).logsumexp(-1).mean().backward()
    assert wq.expert_A.grad.abs().min() > 0 and wq.expert_B.grad.abs().min() > 0  # ... and A_e, B_e follow


@pytest.mark.skipif(triton_kernels() is None, reason="triton is not importable")
def test_triton_path_matches_reference_with_pruned_components(monkeypatch):
    from lorapar.dual import DualLoRALinear

    torch.manual_seed(0)
    module = DualLoRALinear(torch.randn(24, 40) / 40**0.5, shared_rank=4, expert_rank=8, alpha=12.0)
    module.reset_dual(torch.Generator().manual_seed(0), init_std=0.02)
    with torch.no_grad():
        module.expert_E.normal_()
    module.prune_experts(torch.tensor([True, False] * 4))
    x = torch.randn(3, 7, 40)
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv("LORAPAR_FORCE_TRITON", force)
        module.zero_grad()
        y = module(x)
        y.square().sum().backward()
        results.append((y.detach(), *(getattr(module, p).grad.clone() for p in ("lora_A", "lora_B", "expert_A", "expert_B", "expert_E"))))
    for ref, tri in zip(*results):
        torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)
    grads = results[1]
    assert grads[3][1::2].abs().sum() == 0 and grads[4][:, 1::2].abs().sum() == 0 and grads[5][1::2].abs().sum() == 0


def _train_a_little(model, steps: int = 3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for step in range(steps):
        model(tokens(seed=step)).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def test_merged_forward_equals_unmerged_and_unmerge_is_exact(tiny_model, tmp_path):
    from lorapar.checkpoint import load_model
    from lorapar.lora import export_merged

    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    _train_a_little(tiny_model)
    assert all(m.expert_E.abs().sum() > 0 for m in modules.values())
    x = tokens(seed=7)
    residual = modules["layers.1.feed_forward.w2"].weight.detach().clone()
    with torch.no_grad():
        unmerged = tiny_model(x)
        merge(tiny_model)
        torch.testing.assert_close(tiny_model(x), unmerged, atol=2e-5, rtol=1e-5)
        unmerge(tiny_model)
    assert torch.equal(modules["layers.1.feed_forward.w2"].weight, residual)
    export_merged(tiny_model, str(tmp_path / "merged"))  # a plain checkpoint anyone can load
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "merged"))(x), unmerged, atol=2e-5, rtol=1e-5)


def test_save_load_roundtrip_on_the_original_base(tiny_model, tiny_args, tmp_path):
    from safetensors.torch import load_file

    from lorapar.checkpoint import meta_to_hf_state_dict
    from lorapar.model import Transformer

    args = DualArgs(**SMALL, dual_seed=3)
    modules = apply_dual(tiny_model, args)
    _train_a_little(tiny_model)
    wq = modules["layers.0.attention.wq"]
    wq.prune_experts(torch.tensor([True, False] * 4))
    save_dual_adapter(tiny_model, str(tmp_path), args)

    fresh = Transformer(tiny_args)
    fresh.init_weights(seed=0)
    assert load_dual_adapter(fresh, str(tmp_path)) == args
    x = tokens(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), tiny_model(x), atol=0, rtol=0)
    loaded_masks, masks = get_dual_masks(fresh), get_dual_masks(tiny_model)
    assert loaded_masks.keys() == masks.keys() and all(torch.equal(loaded_masks[k], masks[k]) for k in masks)
    assert adapter_key("layers.0.attention.wq", "expert_E") in masks
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    hf_rows = meta_to_hf_state_dict({"layers.0.attention.wq.weight": wq.expert_B.detach()}, tiny_args)
    assert torch.equal(saved[adapter_key("layers.0.attention.wq", "expert_B")], next(iter(hf_rows.values())))
    assert not torch.equal(saved[adapter_key("layers.0.attention.wq", "expert_B")], wq.expert_B.detach())
    assert (
        adapter_key("layers.0.attention.wq", "lora_A") == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    )


# ----------------------------------------------------------------------------- orthogonality regulariser


def test_orthogonality_loss_is_zero_for_orthonormal_factors(tiny_model):
    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    assert orthogonality_loss(tiny_model) > 0
    with torch.no_grad():
        for m in modules.values():
            r = m.expert_E.shape[0]
            m.expert_A.copy_(torch.linalg.qr(torch.randn(m.expert_A.shape[1], r)).Q.T)
            m.expert_B.copy_(torch.linalg.qr(torch.randn(m.expert_B.shape[0], r)).Q)
    assert orthogonality_loss(tiny_model) < 1e-5


def test_orthogonality_loss_gradient_matches_the_hand_derived_formula(tiny_model):
    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    tiny_model.double()
    loss = orthogonality_loss(tiny_model)
    loss.backward()
    n = len(modules)
    for m in modules.values():
        A, B = m.expert_A.detach(), m.expert_B.detach()
        M = A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)
        N = B.T @ B - torch.eye(B.shape[1], dtype=B.dtype)
        torch.testing.assert_close(m.expert_A.grad, 2 * M @ A / torch.linalg.norm(M) / n)
        torch.testing.assert_close(m.expert_B.grad, 2 * B @ N / torch.linalg.norm(N) / n)


# ----------------------------------------------------------------------------- training with screening


def _dual_run(model, steps: int, t_init: int, t_final: int, delta_t: int, weight_decay: float = 0.1, lr: float = 1e-2):
    """Train on a fixed tiny next-token task; yields (step, loss) after each screened optimizer step."""
    from lorapar.dual_training import DualTraining
    from lorapar.masks import MaskedAdamW

    args = DualArgs(**{**SMALL, "dual_t_init": t_init, "dual_t_final": t_final, "dual_delta_t": delta_t})
    dual = DualTraining(model, args)
    optimizer = MaskedAdamW.for_model(model, lr=lr, weight_decay=weight_decay)
    dual.start(optimizer, total_steps=steps)
    data = tokens(batch=4, length=12, seed=11)
    model.train()
    for step in range(1, steps + 1):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        (loss + dual.regulariser()).backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        record = dual.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        yield step, loss.item(), record, dual


def test_pruned_components_stay_bit_identical_and_budget_meets_target(tiny_model):
    steps, t_init, t_final = 14, 2, 4
    frozen = {}  # (module, component) -> (A row, B column) when pruned
    live_by_step = {}
    for step, _, record, dual in _dual_run(tiny_model, steps, t_init, t_final, delta_t=3):
        live_by_step[step] = record["live_experts"]
        for name, m in dual.modules.items():
            for i in (~m.expert_alive).nonzero().flatten().tolist():
                assert m.expert_E[i] == 0
                if (name, i) in frozen:
                    A_row, B_col = frozen[name, i]
                    assert torch.equal(m.expert_A[i], A_row) and torch.equal(m.expert_B[:, i], B_col)
                else:
                    frozen[name, i] = (m.expert_A[i].clone(), m.expert_B[:, i].clone())
    initial, target, prune_end = 12 * 8, 12 * 5, steps - t_final  # 12 modules, r_e 8 -> average 5
    expected = initial
    for s in range(1, steps + 1):
        if t_init < s <= prune_end and (s % 3 == 0 or s == prune_end):  # the screening steps
            expected = budget_at(s, steps, initial, target, t_init, t_final)
        assert live_by_step[s] == expected, (s, live_by_step)
    assert live_by_step[3] > target and live_by_step[prune_end] == target
    assert len(frozen) == initial - target


def test_short_training_run_lowers_the_loss(tiny_model):
    losses = [loss for _, loss, _, _ in _dual_run(tiny_model, steps=12, t_init=3, t_final=3, delta_t=2, lr=3e-2)]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses


def test_screener_state_roundtrip_resumes_exactly(tiny_model, tiny_args, tmp_path):
    from lorapar.masks import MaskedAdamW
    from lorapar.model import Transformer
    from lorapar.dual_training import DualTraining

    run = _dual_run(tiny_model, steps=14, t_init=2, t_final=4, delta_t=3)
    for step, _, _, dual in run:
        if step == 6:
            break
    dual.save(str(tmp_path))
    fresh = Transformer(tiny_args)
    fresh.init_weights(seed=0)
    resumed = DualTraining(fresh, dual.args)
    optimizer = MaskedAdamW.for_model(fresh, lr=1e-2, weight_decay=0.1)
    resumed.start(optimizer, total_steps=14)
    resumed.resume(str(tmp_path), optimizer)
    assert resumed.screener.live_components() == dual.screener.live_components() < 12 * 8
    for key, value in dual.screener.state_dict().items():
        assert torch.equal(resumed.screener.state_dict()[key], value)
    x = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), tiny_model.eval()(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- train_sft.py --adapter dual

from test_sft import setup  # noqa: E402,F401  (the tiny base model + arithmetic data fixture)


def _sft(setup, asset, out, *extra):
    import json
    from pathlib import Path

    import train_sft

    _, base, data = setup
    argv = ["--ckpt", base, "--tokenizer", str(asset("models/llama2-tokenizer.model")), "--data", data,
            "--out", str(out), "--template", "plain", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2",
            "--warmup-ratio", "0", "--weight-decay", "0.1", "--max-steps", "8", "--save-every", "2",
            "--adapter", "dual", "--dual-rank", "12", "--dual-shared-rank", "4", "--dual-alpha", "12",
            "--dual-target-rank", "5", "--dual-t-init", "1", "--dual-t-final", "3", "--dual-delta-t", "2", *extra]
    train_sft.main(argv)
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_train_sft_dual_prunes_to_budget_and_resumes_bit_identically(setup, asset, tmp_path):
    from safetensors.torch import load_file

    straight = _sft(setup, asset, tmp_path / "straight")
    assert straight[-1]["loss"] < straight[0]["loss"]
    n_modules = 2 * 6
    assert [m["live_experts"] for m in straight] == [n_modules * 8] + [
        budget_at(s, 8, n_modules * 8, n_modules * 5, 1, 3) for s in (2, 2, 4, 5, 5, 5)
    ] + [n_modules * 5]
    _sft(setup, asset, tmp_path / "resumed", "--halt-at", "3")
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003" / "dual_screener.safetensors").exists()
    resumed = _sft(setup, asset, tmp_path / "resumed", "--resume")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    assert not (tmp_path / "straight" / "dual_screener.safetensors").exists()  # finished: no EMAs in the adapter
    for name in ("adapter_model.safetensors", "masks.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_loading_a_bad_adapter_names_the_file_and_the_problem(tiny_model, tiny_args, tmp_path):
    import json
    import shutil

    from lorapar.model import Transformer

    args = DualArgs(**SMALL)
    apply_dual(tiny_model, args)
    save_dual_adapter(tiny_model, str(tmp_path / "good"), args)

    def fresh(**overrides):
        model = Transformer(type(tiny_args)(**{**tiny_args.__dict__, **overrides}))
        model.init_weights(seed=0)
        return model

    with pytest.raises(ValueError, match=r"good/adapter_model.safetensors: \d+ tensor\(s\) of the wrong shape"):
        load_dual_adapter(fresh(dim=32, hidden_dim=48, n_heads=4, n_kv_heads=2), str(tmp_path / "good"))
    assert is_dual_adapter(str(tmp_path / "good"))
    with pytest.raises((KeyError, ValueError), match="DUAL_LORA|lora_expert"):  # never half-loaded as plain LoRA
        lora_load_adapter(fresh(), str(tmp_path / "good"))
    shutil.copytree(tmp_path / "good", tmp_path / "no_masks")
    (tmp_path / "no_masks" / "masks.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_masks/masks.safetensors"):
        load_dual_adapter(fresh(), str(tmp_path / "no_masks"))
    shutil.copytree(tmp_path / "good", tmp_path / "plain")
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="plain/adapter_config.json: not a dual-LoRA adapter"):
        load_dual_adapter(fresh(), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="t_init"):
        ExpertScreener(dual_modules(tiny_model), total_steps=10, target_rank=5, t_init=6, t_final=4, delta_t=1)
    screener = ExpertScreener(dual_modules(tiny_model), total_steps=10, target_rank=5, t_init=2, t_final=2, delta_t=1)
    with pytest.raises(RuntimeError, match="EMAs are missing"):  # a resume that lost them mid-pruning
        screener.step(5)
