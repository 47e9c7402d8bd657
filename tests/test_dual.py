"""Dual-Module Collaborative LoRA: init, merge, orthogonality loss, budget schedule, screening, training."""

from __future__ import annotations

import pytest
import torch

from lorapar.budget import SensitivityEMA, budget_at, component_scores, select_survivors


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
