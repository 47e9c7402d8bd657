import math

import pytest
import torch

from lorapar.partition import (
    REGIONS,
    PartitionArgs,
    partition,
    partition_report,
    random_stage_masks,
    round_half_up,
    stage_overlap,
    top_count_mask,
    top_mass_mask,
)


def reference_top_mass(x: torch.Tensor, theta: float) -> torch.Tensor:
    """The definition, spelled out: stable descending sort, fp64 cumsum, first prefix reaching theta
    (theta = 1 means every non-zero element, whatever the rounding of the sums)."""
    if theta == 1.0:
        return x > 0
    order = torch.sort(x, descending=True, stable=True).indices
    cumulative = x[order].double().cumsum(0)
    count = int((cumulative < theta * cumulative[-1]).sum()) + 1
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[order[:count]] = True
    return keep & (x > 0)


def key(layer: int, module: str, matrix: str) -> str:
    kind = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj")) else "mlp"
    return f"base_model.model.model.layers.{layer}.{kind}.{module}.lora_{matrix}.weight"


def test_known_vectors_give_known_sets():
    k_a, k_b = key(0, "q_proj", "A"), key(0, "q_proj", "B")
    s1 = {k_a: torch.tensor([[8.0, 1.0], [0.0, 1.0]]), k_b: torch.tensor([[4.0], [6.0]])}  # total 20
    s2 = {k_a: torch.tensor([[0.0, 9.0], [1.0, 0.0]]), k_b: torch.tensor([[3.0], [7.0]])}  # total 20
    # theta 0.8 -> 16: S1 keeps 8, 6, 4 (=18); S2 keeps 9, 7 (=16).
    p = partition(s1, s2, PartitionArgs(theta=0.8))
    flat = lambda m: torch.cat([m[k_a].flatten(), m[k_b].flatten()]).tolist()  # noqa: E731
    T, F = True, False
    assert flat(p.masks("system1")) == [T, F, F, F, T, T]
    assert flat(p.masks("system2")) == [F, T, F, F, F, T]
    assert flat(p.masks("system1_only")) == [T, F, F, F, T, F]
    assert flat(p.masks("system2_only")) == [F, T, F, F, F, F]
    assert flat(p.masks("shared")) == [F, F, F, F, F, T]
    assert flat(p.masks("neither")) == [F, F, T, T, F, F]
    assert flat(p.masks("stage1")) == [T, F, F, F, T, T]
    assert flat(p.masks("stage2")) == [F, T, F, F, F, T]
    p0 = partition(s1, s2, PartitionArgs(theta=0.8, alpha=0.0, beta=0.0))
    assert flat(p0.masks("stage1")) == flat(p.masks("system1_only"))
    assert flat(p0.masks("stage2")) == flat(p.masks("system2_only"))
    assert p.masks("stage1")[k_a].shape == (2, 2) and p.masks("stage1")[k_b].dtype == torch.bool


def test_ties_are_broken_by_position():
    x = torch.full((10,), 2.0)
    assert top_mass_mask(x, 0.5).tolist() == [True] * 5 + [False] * 5
    assert top_count_mask(x, 3).tolist() == [True] * 3 + [False] * 7
    y = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0])
    assert top_mass_mask(y, 0.7).tolist() == [True, True, False, True, False]  # 3+3+1 = 7 >= 6.3


@pytest.mark.parametrize("theta", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_matches_full_sort_reference(theta):
    g = torch.Generator().manual_seed(0)
    # integers (exact sums, many ties) and a heavy-tailed continuous part spanning many buckets
    ints = torch.randint(0, 20, (3000,), generator=g).float()
    heavy = torch.rand(3000, generator=g) ** 6 * 1e-3
    for x in (ints, heavy, torch.cat([ints, heavy])):
        assert torch.equal(top_mass_mask(x, theta), reference_top_mass(x, theta))


def test_theta_one_keeps_every_nonzero_element():
    x = torch.tensor([0.0, 1e-40, 3.0, 0.0, 1e-30, 2.5e-7, 0.0])  # includes a denormal beside the zeros
    assert torch.equal(top_mass_mask(x, 1.0), x > 0)
    s = {key(0, "up_proj", "A"): x.view(1, -1)}
    p = partition(s, {key(0, "up_proj", "A"): x.flip(0).view(1, -1)}, PartitionArgs(theta=1.0))
    assert torch.equal(p.system1, x > 0) and torch.equal(p.system2, x.flip(0) > 0)


def test_top_count_is_exact_and_picks_the_largest():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (500,), generator=g).float()
    for k in (0, 1, 37, 250, 499, 500):
        chosen = top_count_mask(x, k)
        assert int(chosen.sum()) == k
        if 0 < k < 500:
            assert x[chosen].min() >= x[~chosen].max()


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.0, 0.0), (0.3, 0.7), (0.5, 0.25), (1 / 3, 2 / 3)])
def test_alpha_beta_fractions_are_exact(alpha, beta):
    g = torch.Generator().manual_seed(2)
    keys = [key(i, m, ab) for i in range(2) for m in ("q_proj", "down_proj") for ab in "AB"]
    s1 = {k: torch.rand(4, 9, generator=g) for k in keys}
    s2 = {k: torch.rand(4, 9, generator=g) for k in keys}
    p = partition(s1, s2, PartitionArgs(theta=0.9, alpha=alpha, beta=beta))
    shared, s1_only, s2_only = p.region("shared"), p.region("system1_only"), p.region("system2_only")
    n = int(shared.sum())
    assert n > 10
    assert int((p.stage1 & shared).sum()) == round_half_up(alpha * n)
    assert int((p.stage2 & shared).sum()) == round_half_up(beta * n)
    assert torch.equal(p.stage1 & ~shared, s1_only) and torch.equal(p.stage2 & ~shared, s2_only)
    flat1 = torch.cat([s1[k].flatten() for k in keys])
    in_stage, left_out = flat1[p.stage1 & shared], flat1[shared & ~p.stage1]
    if in_stage.numel() and left_out.numel():
        assert in_stage.min() > left_out.max()  # ranked by the S1 score


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49, 0.0)] == [1, 2, 3, 2, 0]


def test_report_counts_add_up():
    g = torch.Generator().manual_seed(3)
    keys = [key(i, m, ab) for i in range(3) for m in ("q_proj", "v_proj", "gate_proj") for ab in "AB"]
    s1 = {k: torch.rand(2, 5, generator=g) ** 3 for k in keys}
    s2 = {k: torch.rand(2, 5, generator=g) ** 3 for k in keys}
    p = partition(s1, s2, PartitionArgs(theta=0.8, alpha=0.5, beta=0.5))
    report = partition_report(p)
    total = report["total"]
    c = total["count"]
    assert total["elements"] == len(keys) * 10
    assert c["system1_only"] + c["system2_only"] + c["shared"] + c["neither"] == total["elements"]
    assert c["system1"] == c["system1_only"] + c["shared"]
    assert c["stage1"] == c["system1_only"] + round_half_up(0.5 * c["shared"])
    assert report["active_fraction"]["stage2"] == c["stage2"] / total["elements"]
    assert list(report["by_layer"]) == ["0", "1", "2"]
    assert set(report["by_module"]) == {"q_proj", "v_proj", "gate_proj"} and set(report["by_matrix"]) == {"A", "B"}
    for grouping in ("by_layer", "by_module", "by_matrix"):
        groups = report[grouping].values()
        assert sum(gr["elements"] for gr in groups) == total["elements"]
        for region in REGIONS:
            assert sum(gr["count"][region] for gr in groups) == c[region]
    assert report["overlap"]["shared_over_union"] == pytest.approx(
        c["shared"] / (c["system1"] + c["system2"] - c["shared"])
    )


def test_per_tensor_random_baseline_keeps_per_tensor_counts_and_is_seeded():
    g = torch.Generator().manual_seed(4)
    keys = [key(0, "k_proj", "A"), key(0, "k_proj", "B")]
    s1 = {k: torch.rand(8, 16, generator=g) for k in keys}
    s2 = {k: torch.rand(8, 16, generator=g) for k in keys}
    stages = partition(s1, s2).stage_masks()
    rand = random_stage_masks(stages, seed=7, scope="per_tensor")
    assert torch.equal(rand["stage1"][keys[0]], random_stage_masks(stages, 7, "per_tensor")["stage1"][keys[0]])
    assert not torch.equal(rand["stage1"][keys[0]], random_stage_masks(stages, 8, "per_tensor")["stage1"][keys[0]])
    for stage in ("stage1", "stage2"):
        for k in keys:
            assert rand[stage][k].shape == stages[stage][k].shape and rand[stage][k].dtype == torch.bool
            assert int(rand[stage][k].sum()) == int(stages[stage][k].sum())
        assert any(not torch.equal(rand[stage][k], stages[stage][k]) for k in keys)


def lopsided_scores() -> tuple[list[str], dict, dict]:
    """Importance concentrated in q_proj A: the importance stages take nearly all of it and little elsewhere."""
    g = torch.Generator().manual_seed(3)
    keys = [key(0, "q_proj", "A"), key(0, "q_proj", "B"), key(1, "down_proj", "A"), key(1, "down_proj", "B")]
    shapes = [(4, 32), (32, 4), (4, 48), (32, 4)]
    weight = [1000.0, 1.0, 1.0, 1.0]
    s1 = {k: torch.rand(shape, generator=g) * w for k, shape, w in zip(keys, shapes, weight)}
    s2 = {k: torch.rand(shape, generator=g) * w for k, shape, w in zip(keys, shapes, weight)}
    return keys, s1, s2


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 0.25), (0.0, 1.0)])
def test_global_random_baseline_has_the_partitions_sizes_and_overlap(alpha, beta):
    keys, s1, s2 = lopsided_scores()
    stages = partition(s1, s2, PartitionArgs(theta=0.9, alpha=alpha, beta=beta)).stage_masks()
    want = stage_overlap(stages)
    assert want["stage1"] > want["overlap"] < want["stage2"] and (want["overlap"] > 0) == (alpha > 0)
    rand = random_stage_masks(stages, seed=11)  # scope "global" is the default
    assert stage_overlap(rand) == want
    for stage in ("stage1", "stage2"):
        assert all(rand[stage][k].shape == stages[stage][k].shape and rand[stage][k].dtype == torch.bool for k in keys)
    # the overlap is counted by hand too, not only by the helper under test
    assert sum(int((rand["stage1"][k] & rand["stage2"][k]).sum()) for k in keys) == want["overlap"]


def test_global_random_baseline_is_not_per_tensor_and_is_seeded():
    keys, s1, s2 = lopsided_scores()
    stages = partition(s1, s2, PartitionArgs(theta=0.9)).stage_masks()
    counts = lambda masks: [int(masks[k].sum()) for k in keys]  # noqa: E731
    importance_counts = counts(stages["stage1"])
    assert importance_counts[0] > 0.7 * sum(importance_counts)  # the importance stage sits mostly in q_proj A
    rand = random_stage_masks(stages, seed=11)
    random_counts = counts(rand["stage1"])
    # spread over the adapter like its sizes (q_proj A holds 128 of 576 elements), not like the importance
    assert random_counts != importance_counts and random_counts[0] < 0.5 * sum(random_counts)
    assert all(c > 0 for c in random_counts)
    again = random_stage_masks(stages, seed=11)
    other = random_stage_masks(stages, seed=12)
    for stage in ("stage1", "stage2"):
        assert all(torch.equal(again[stage][k], rand[stage][k]) for k in keys)
    assert any(not torch.equal(other["stage1"][k], rand["stage1"][k]) for k in keys)
    with pytest.raises(ValueError, match="scope must be one of"):
        random_stage_masks(stages, seed=11, scope="layer")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(theta=0.0), r"theta must be in \(0, 1\]"),
        (dict(theta=1.5), r"theta must be in \(0, 1\]"),
        (dict(theta=math.nan), r"theta must be in \(0, 1\]"),
        (dict(alpha=-0.1), r"alpha must be in \[0, 1\]"),
        (dict(beta=1.01), r"beta must be in \[0, 1\]"),
    ],
)
def test_bad_fractions_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PartitionArgs(**kwargs)


def test_bad_scores_name_the_tensor():
    k_a, k_b = key(1, "up_proj", "A"), key(1, "up_proj", "B")
    good = {k_a: torch.ones(2, 3), k_b: torch.ones(3, 2)}
    for bad_value in (-1.0, math.nan, math.inf):
        bad = {k_a: torch.ones(2, 3), k_b: torch.ones(3, 2)}
        bad[k_b][1, 0] = bad_value
        with pytest.raises(ValueError, match=r"system 2 importance: .*up_proj\.lora_B.* must be finite and >= 0"):
            partition(good, bad)
    with pytest.raises(ValueError, match="system 1 importance is zero everywhere"):
        partition({k: torch.zeros_like(v) for k, v in good.items()}, good)
    with pytest.raises(ValueError, match=r"system 2 importance: keys differ.*missing"):
        partition(good, {k_a: torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"has shape \(2, 3\), expected \(3, 2\)"):
        partition(good, {k_a: torch.ones(2, 3), k_b: torch.ones(2, 3)})
