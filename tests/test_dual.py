"""Dual-Module Collaborative LoRA: init, merge, orthogonality loss, budget schedule, screening, training."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton decides at kernel decoration (first import) whether to interpret.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.function import triton_kernels  # noqa: E402
from lorapar.adapter import load_adapter as lora_load_adapter  # noqa: E402
from lorapar.dmlora.args import DualArgs  # noqa: E402
from lorapar.dmlora.budget import budget_at, schedule_steps  # noqa: E402
from lorapar.dmlora.files import is_dual_adapter, load_dual_adapter, save_dual_adapter  # noqa: E402
from lorapar.dmlora.modules import adapter_key, apply_dual, dual_modules, get_dual_masks  # noqa: E402
from lorapar.dmlora.screening import ExpertScreener, SensitivityEMA, component_scores, select_survivors  # noqa: E402
from lorapar.dmlora.training import ORTH_EPS, orthogonality_loss  # noqa: E402
from lorapar.lora import disable_adapter, merge, unmerge  # noqa: E402

SMALL = dict(dual_rank=12, dual_shared_rank=4, dual_alpha=12.0, dual_target_rank=5.0)  # r_e = 8, s = 1
N_MODULES = 2 * 7  # the tiny model's 2 layers x q, k, v, o, gate, up, down


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


def test_schedule_phases_are_fractions_of_the_run_or_whole_steps():
    args = DualArgs()
    assert args.schedule(1562) == (235, 780)  # the supplement's train.sh: tinit 235, tfinal 780 of 1,562 steps
    assert args.schedule(233) == (35, 116)  # the real-input pipeline's run length, which absolute 200/200 broke
    assert DualArgs(dual_t_init=200.0, dual_t_final=0.0).schedule(1000) == (200, 0)  # >= 1: absolute steps
    assert schedule_steps(1, 50, "--x") == 1 and schedule_steps(0.5, 7, "--x") == 4
    with pytest.raises(ValueError, match=r"--dual-t-final: expected a fraction .* got 2.5"):
        DualArgs(dual_t_final=2.5)
    with pytest.raises(ValueError, match="--dual-t-init"):
        DualArgs(dual_t_init=-0.1)


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
    assert len(modules) == N_MODULES and all(m.expert_E.abs().sum() == 0 for m in modules.values())
    assert "layers.1.attention.wo" in modules  # the supplement adapts o as well
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
    from lorapar.dmlora.layer import DualLoRALinear

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
        results.append(
            (
                y.detach(),
                *(getattr(module, p).grad.clone() for p in ("lora_A", "lora_B", "expert_A", "expert_B", "expert_E")),
            )
        )
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

    from lorapar.checkpoint.names import meta_to_hf_state_dict
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
        adapter_key("layers.0.attention.wq", "lora_A")
        == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
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


def test_orthogonality_loss_is_the_mean_over_matrices_not_modules(tiny_model):
    """Hand-computed: A_e = c * (orthonormal rows) gives A A^T - (1 - eps) I = (c^2 - 1 + eps) I, whose
    Frobenius norm is |c^2 - 1 + eps| sqrt(r); B_e = 0 gives (1 - eps) sqrt(r). The supplement (and
    peft's AdaLoRA) divide the sum by the number of matrices, 2 per module."""
    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    r = 8
    with torch.no_grad():
        for k, m in enumerate(modules.values()):
            c = 2.0 if k == 0 else 1.0  # module 0's A_e has squared norm 4 per row, the others' are orthonormal
            m.expert_A.copy_(c * torch.linalg.qr(torch.randn(m.expert_A.shape[1], r, dtype=torch.float64)).Q.T)
            m.expert_B.zero_()
    norm_A0 = (4.0 - 1.0 + ORTH_EPS) * r**0.5  # 3 sqrt(8)
    norm_A = ORTH_EPS * r**0.5  # orthonormal rows: only eps is left
    norm_B = (1.0 - ORTH_EPS) * r**0.5
    expected = (norm_A0 + (N_MODULES - 1) * norm_A + N_MODULES * norm_B) / (2 * N_MODULES)
    assert orthogonality_loss(tiny_model).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx((3 + 14) * 8**0.5 / 28, rel=1e-5)  # ~1.717; a per-module mean gives twice it


def test_orthogonality_loss_gradient_matches_the_hand_derived_formula(tiny_model):
    modules = apply_dual(tiny_model, DualArgs(**SMALL))
    tiny_model.double()
    loss = orthogonality_loss(tiny_model)
    loss.backward()
    n = 2 * len(modules)  # the mean is over matrices
    for m in modules.values():
        A, B = m.expert_A.detach(), m.expert_B.detach()
        M = A @ A.T - (1 - ORTH_EPS) * torch.eye(A.shape[0], dtype=A.dtype)
        N = B.T @ B - (1 - ORTH_EPS) * torch.eye(B.shape[1], dtype=B.dtype)
        torch.testing.assert_close(m.expert_A.grad, 2 * M @ A / torch.linalg.norm(M) / n)
        torch.testing.assert_close(m.expert_B.grad, 2 * B @ N / torch.linalg.norm(N) / n)


# ----------------------------------------------------------------------------- training with screening


def _dual_run(
    model,
    steps: int,
    t_init: float,
    t_final: float,
    delta_t: int,
    weight_decay: float = 0.1,
    lr: float = 1e-2,
    pruning: str = "regrow",
    args: DualArgs = None,
):
    """Train on a fixed tiny next-token task; yields (step, loss, record, dual) after each screened optimizer step.
    `args` (if given) replaces SMALL; the schedule arguments apply on top."""
    import dataclasses

    from lorapar.dmlora.training import DualTraining
    from lorapar.optim import MaskedAdamW

    args = dataclasses.replace(
        args or DualArgs(**SMALL), dual_t_init=t_init, dual_t_final=t_final, dual_delta_t=delta_t, dual_pruning=pruning
    )
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


def test_freeze_pruned_components_stay_bit_identical_and_budget_meets_target(tiny_model):
    steps, t_init, t_final = 14, 2, 4
    frozen = {}  # (module, component) -> (A row, B column) when pruned
    live_by_step = {}
    for step, _, record, dual in _dual_run(tiny_model, steps, t_init, t_final, delta_t=3, pruning="freeze"):
        live_by_step[step] = record["live_experts"]
        for name, m in dual.modules.items():
            for i in (~m.expert_alive).nonzero().flatten().tolist():
                assert m.expert_E[i] == 0
                if (name, i) in frozen:
                    A_row, B_col = frozen[name, i]
                    assert torch.equal(m.expert_A[i], A_row) and torch.equal(m.expert_B[:, i], B_col)
                else:
                    frozen[name, i] = (m.expert_A[i].clone(), m.expert_B[:, i].clone())
    initial, target, prune_end = N_MODULES * 8, N_MODULES * 5, steps - t_final  # r_e 8 -> average 5
    expected = initial
    for s in range(1, steps + 1):
        if t_init < s <= prune_end and (s % 3 == 0 or s == prune_end):  # the screening steps
            expected = budget_at(s, steps, initial, target, t_init, t_final)
        assert live_by_step[s] == expected, (s, live_by_step)
    assert live_by_step[3] > target and live_by_step[prune_end] == target
    assert len(frozen) == initial - target


def test_regrow_gated_components_grow_back_until_the_final_mask(tiny_model):
    """AdaLoRA's and the supplement's rule: a screening zeroes the losers' gates and masks nothing, so a
    gated component that gets gradient regrows (and may be kept at the next screening); from the last
    screening at T - t_final on, the final mask holds its losers bit-identical and gated."""
    steps, t_init, t_final, delta_t = 14, 2, 4, 3
    prune_end = steps - t_final
    gated_at: dict[int, dict] = {}  # screening step -> {(module, i): (A row, B column)} of the zeroed components
    regrown, moved, rekept = 0, 0, 0
    final: dict = {}
    for step, _, record, dual in _dual_run(tiny_model, steps, t_init, t_final, delta_t=delta_t):
        modules = dual.modules
        if step < prune_end:
            assert all(m.mask_expert_E is None and m.mask_expert_A is None for m in modules.values())  # nothing masked
        previous = gated_at.get(step - 1)
        if previous is not None:  # the step after a screening: its zeroed gates got a gradient and moved
            for (name, i), (A_row, B_col) in previous.items():
                regrown += bool(modules[name].expert_E[i] != 0)
                moved += not torch.equal(modules[name].expert_A[i], A_row)
        if "expert_budget" in record:
            assert record["live_experts"] == record["expert_budget"]
            zeroed = {
                (n, i): (m.expert_A[i].clone(), m.expert_B[:, i].clone())
                for n, m in modules.items()
                for i in (~dual.screener.kept[n]).nonzero().flatten().tolist()
            }
            assert zeroed and all(modules[n].expert_E[i] == 0 for n, i in zeroed)
            assert len(zeroed) == N_MODULES * 8 - record["expert_budget"]
            if gated_at:  # kept now though zeroed at the last screening: it won its place back
                last = gated_at[max(gated_at)]
                rekept += sum(dual.screener.kept[n][i].item() for n, i in last)
            gated_at[step] = zeroed
        if step == prune_end - 1:
            ema = {k: v.clone() for k, v in dual.screener.state_dict().items() if not k.startswith("kept.")}
        if step == prune_end:  # as peft's AdaLoRA: the final screening ranks the EMAs of the steps before it
            scores = [
                component_scores(*(ema[f"sensitivity.{n}.{p}"] * ema[f"uncertainty.{n}.{p}"] for p in "ABE"))
                for n in modules
            ]
            expected = select_survivors(scores, [torch.ones(8, dtype=torch.bool)] * N_MODULES, N_MODULES * 5)
            assert all(torch.equal(m.expert_alive, e) for m, e in zip(modules.values(), expected))
            assert not dual.screener.ema.sensitivity  # dropped once the mask is final
            assert record["live_experts"] == N_MODULES * 5
            final = {
                n: (m.expert_alive.clone(), m.expert_A.detach().clone(), m.expert_B.detach().clone())
                for n, m in modules.items()
            }
            assert sum(int(alive.sum()) for alive, _, _ in final.values()) == N_MODULES * 5
        if step > prune_end:  # the final mask is fixed: the losers do not move, the rest train
            for n, m in modules.items():
                alive, A0, B0 = final[n]
                assert torch.equal(m.expert_alive, alive) and bool((m.expert_E[~alive] == 0).all())
                assert torch.equal(m.expert_A[~alive], A0[~alive]) and torch.equal(m.expert_B[:, ~alive], B0[:, ~alive])
            assert record["live_experts"] == N_MODULES * 5
    assert regrown > 0 and moved > 0, (regrown, moved)
    assert rekept > 0  # with a monotone rule this is impossible
    assert any(
        not torch.equal(m.expert_A[alive], A0[alive])  # and the kept ones kept training
        for (alive, A0, _), m in zip(final.values(), modules.values())
    )


def test_short_training_run_lowers_the_loss(tiny_model):
    losses = [loss for _, loss, _, _ in _dual_run(tiny_model, steps=12, t_init=3, t_final=3, delta_t=2, lr=3e-2)]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses


@pytest.mark.parametrize("pruning", ["regrow", "freeze"])
def test_screener_state_roundtrip_resumes_exactly(tiny_model, tiny_args, tmp_path, pruning):
    from lorapar.dmlora.training import DualTraining
    from lorapar.model import Transformer
    from lorapar.optim import MaskedAdamW

    run = _dual_run(tiny_model, steps=14, t_init=2, t_final=4, delta_t=3, pruning=pruning)
    for step, _, _, dual in run:
        if step == 7:  # after the screenings at 3 and 6 (regrow: gates zeroed at 6, some regrown at 7)
            break
    dual.save(str(tmp_path))
    fresh = Transformer(tiny_args)
    fresh.init_weights(seed=0)
    resumed = DualTraining(fresh, dual.args)
    optimizer = MaskedAdamW.for_model(fresh, lr=1e-2, weight_decay=0.1)
    resumed.start(optimizer, total_steps=14)
    resumed.resume(str(tmp_path), optimizer)
    assert resumed.screener.live_components() == dual.screener.live_components() < N_MODULES * 8
    assert resumed.screener.state_dict().keys() == dual.screener.state_dict().keys()
    for key, value in dual.screener.state_dict().items():
        assert torch.equal(resumed.screener.state_dict()[key], value)
    masked = sum(m.mask_expert_E is not None for m in resumed.modules.values())
    assert (masked == 0) if pruning == "regrow" else (masked > 0)
    x = tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), tiny_model.eval()(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- train_sft.py --adapter dual

from test_sft import TINY_RECIPE, setup  # noqa: E402,F401  (setup: the tiny base model + arithmetic data fixture)


def _sft(setup, asset, out, *extra):
    import json
    from pathlib import Path

    import train_sft

    _, base, data = setup
    argv = [
        "--ckpt",
        base,
        "--tokenizer",
        str(asset("models/llama2-tokenizer.model")),
        "--data",
        data,
        "--out",
        str(out),
        *TINY_RECIPE,
        "--weight-decay",
        "0.1",
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--adapter",
        "dual",
        "--dual-rank",
        "12",
        "--dual-shared-rank",
        "4",
        "--dual-alpha",
        "12",
        "--dual-target-rank",
        "5",
        "--dual-t-init",
        "1",
        "--dual-t-final",
        "3",
        "--dual-delta-t",
        "2",
        *extra,
    ]
    train_sft.main(argv)
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("pruning", ["regrow", "freeze"])
def test_train_sft_dual_prunes_to_budget_and_resumes_bit_identically(setup, asset, tmp_path, pruning):
    from safetensors.torch import load_file

    straight = _sft(setup, asset, tmp_path / "straight", "--dual-pruning", pruning)
    assert straight[-1]["loss"] < straight[0]["loss"]
    n = N_MODULES
    assert [m["live_experts"] for m in straight] == [n * 8] + [
        budget_at(s, 8, n * 8, n * 5, 1, 3) for s in (2, 2, 4, 5, 5, 5)
    ] + [n * 5]
    _sft(setup, asset, tmp_path / "resumed", "--dual-pruning", pruning, "--halt-at", "3")
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003" / "dual_screener.safetensors").exists()
    resumed = _sft(setup, asset, tmp_path / "resumed", "--dual-pruning", pruning, "--resume")
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


def test_dmlora_preset_is_the_supplements_recipe(setup, asset, capsys):
    import train_sft

    _, base, data = setup
    common = ["--ckpt", base, "--tokenizer", str(asset("models/llama2-tokenizer.model")), "--data", data, "--out", "x"]
    sft, train, dual = train_sft.parse_config(["--preset", "dmlora", *common])
    assert (sft.adapter, sft.max_len, sft.overflow, sft.template) == ("dual", 380, "truncate", "alpaca")
    assert (train.lr, train.schedule, train.warmup_ratio, train.weight_decay, train.epochs) == (
        1e-5,
        "cosine",
        0.03,
        0.0,
        1,
    )
    assert (train.global_batch, train.batch_size) == (64, 4)
    assert isinstance(dual, DualArgs)
    assert (dual.dual_rank, dual.dual_shared_rank, dual.expert_rank, dual.dual_alpha, dual.dual_target_rank) == (
        128,
        32,
        96,
        128.0,
        80.0,
    )
    assert (dual.dual_delta_t, dual.dual_orth_lambda, dual.dual_beta1, dual.dual_beta2) == (10, 0.1, 0.85, 0.85)
    assert dual.schedule(1562) == (235, 780) and dual.dual_pruning == "regrow"
    assert set(dual.dual_targets) == {"q", "k", "v", "o", "gate", "up", "down"}
    _, train, dual = train_sft.parse_config(["--preset", "dmlora", *common, "--lr", "3e-5", "--dual-pruning", "freeze"])
    assert train.lr == 3e-5 and dual.dual_pruning == "freeze"  # flags override the preset
    with pytest.raises(SystemExit):
        train_sft.parse_config(["--preset", "dmlora", "--adapter", "lora", *common])
    assert "--preset dmlora is for --adapter dual" in capsys.readouterr().err


def test_released_expert_init_gets_no_gradient_through_the_expert(tiny_model):
    """The supplement's code starts B_e = E = 0 (A_e kaiming): every gradient through the expert is a
    product with one of them, so after training only A_e has moved (by the regulariser alone) and the
    adapter's output is the shared module's. --dual-expert-init released reproduces that."""
    import copy

    args = DualArgs(**SMALL, dual_expert_init="released")
    initial = apply_dual(copy.deepcopy(tiny_model), args)  # the same init (one seed): the starting point
    wq = initial["layers.0.attention.wq"]
    bound = 1 / wq.expert_A.shape[1] ** 0.5  # kaiming-uniform with a = sqrt(5)
    assert 0 < wq.expert_A.abs().max() <= bound and wq.expert_B.abs().sum() == 0
    A0 = {n: m.expert_A.detach().clone() for n, m in initial.items()}
    for _, _, _, dual in _dual_run(tiny_model, steps=6, t_init=1, t_final=1, delta_t=2, args=args):
        pass
    for name, m in dual.modules.items():
        assert m.expert_B.abs().sum() == 0 and m.expert_E.abs().sum() == 0, name
        assert not torch.equal(m.expert_A, A0[name])  # the orthogonality term moves A_e, to no effect


def test_released_shared_init_factors_a_random_matrix_and_leaves_w0(tiny_model, tiny_args, tmp_path):
    """The supplement's code runs PiSSA on the layer's own random kaiming weight before the pretrained
    W0 is assigned: s B_s A_s is the rank-r_s SVD part of a random matrix, W0 is not touched, so the
    output moves at init. The adapter saves no residual factors and loads back onto W0 exactly."""
    from lorapar.model import Transformer

    x = tokens()
    before = tiny_model(x)
    w0 = tiny_model.layers[0].attention.wq.weight.detach().clone()
    args = DualArgs(**SMALL, dual_shared_init="released", dual_seed=5)
    modules = apply_dual(tiny_model, args)
    wq = modules["layers.0.attention.wq"]
    assert torch.equal(wq.weight, w0) and wq.init_A is None
    generator = torch.Generator().manual_seed(5)  # the first draw of the init's generator is q's random weight
    random_weight = torch.empty(w0.shape)
    torch.nn.init.kaiming_uniform_(random_weight, a=5**0.5, generator=generator)
    U, S, Vh = torch.linalg.svd(random_weight)
    torch.testing.assert_close(wq.scale * wq.lora_B @ wq.lora_A, U[:, :4] * S[:4] @ Vh[:4], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (tiny_model(x) - before).abs().max() > 1e-3  # not output-preserving
        with disable_adapter(tiny_model):
            assert torch.equal(tiny_model(x), before)
    _train_a_little(tiny_model)
    save_dual_adapter(tiny_model, str(tmp_path), args)
    fresh = Transformer(tiny_args)
    fresh.init_weights(seed=0)
    assert load_dual_adapter(fresh, str(tmp_path)) == args
    assert torch.equal(fresh.layers[0].attention.wq.weight, w0)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), tiny_model(x), atol=0, rtol=0)


def test_load_merged_tells_a_dual_adapter_from_a_lora_one_by_its_config(tiny_model, tiny_args, tmp_path):
    """lorapar.adapter.load_merged (evaluation, the server) loads either kind through ADAPTER_LOADERS."""
    from lorapar.adapter import adapter_type, load_merged, save_adapter
    from lorapar.checkpoint import save_model
    from lorapar.lora import LoraArgs, apply_lora
    from lorapar.model import Transformer

    save_model(tiny_model, tmp_path / "base")
    x = tokens(seed=4)
    args = DualArgs(**SMALL)
    apply_dual(tiny_model, args)
    _train_a_little(tiny_model)
    save_dual_adapter(tiny_model, str(tmp_path / "dual"), args)
    lora_model = Transformer(tiny_args)
    lora_model.init_weights(seed=0)
    lora_args = LoraArgs(r=4, init="gaussian", targets=("q", "v"))
    apply_lora(lora_model, lora_args)
    save_adapter(lora_model, str(tmp_path / "lora"), lora_args)
    assert (adapter_type(str(tmp_path / "dual")), adapter_type(str(tmp_path / "lora"))) == ("dual_lora", "lora")
    with torch.no_grad():
        for trained, adapter in ((tiny_model, "dual"), (lora_model, "lora")):
            merged = load_merged(str(tmp_path / "base"), str(tmp_path / adapter))
            torch.testing.assert_close(merged(x), trained.eval()(x), atol=2e-5, rtol=1e-5)


def test_lora_code_never_loads_dmlora():
    """train_sft.py (parsing the --dual-* flags included), adapters, evaluation and the server import
    no DM-LoRA code beyond its settings: a LoRA-PAR run does not depend on the second method."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, train_sft, lorapar.adapter, lorapar.evaluate, lorapar.serve; train_sft.parse_config(["
        "'--ckpt', 'c', '--tokenizer', 't', '--data', 'd', '--out', 'o']); "
        "print(sorted(m for m in sys.modules if m.startswith('lorapar.dmlora')))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['lorapar.dmlora',", "'lorapar.dmlora.args',", "'lorapar.dmlora.budget']"]
