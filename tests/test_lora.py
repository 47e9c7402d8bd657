"""LoRALinear, the inits, targets, peft keys, masks on the model, merging and adapter files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import masked_lora_linear
from lorapar import lora
from lorapar.adapter import load_adapter, save_adapter
from lorapar.lora import (
    LoraArgs,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    disable_adapter,
    get_masks,
    lora_modules,
    merge,
    named_lora_parameters,
    set_masks,
    unmerge,
)
from lorapar.lora_names import module_name_of, peft_key, resolve_targets
from lorapar.model import Transformer

ALL = ("q", "k", "v", "o", "gate", "up", "down")
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64], [3, 3, 8, 120, 0, 11, 42, 17]])


def fresh_model(tiny_args) -> Transformer:
    model = Transformer(tiny_args)
    model.init_weights(seed=0)
    return model.eval()


def perturb(model, std=0.05, seed=1):
    """Give every A and B a trained-looking value, so that B != 0 and the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in named_lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * std)


# ----------------------------------------------------------------------------- the module


def test_lora_linear_matches_its_equation_and_rslora_scale():
    torch.manual_seed(0)
    W, x = torch.randn(12, 10), torch.randn(3, 5, 10)
    m = LoRALinear(W.clone(), r=4, alpha=8.0)
    torch.nn.init.normal_(m.lora_A), torch.nn.init.normal_(m.lora_B)
    expected = x @ W.T + 2.0 * (x @ m.lora_A.T) @ m.lora_B.T
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert LoRALinear(W, r=4, alpha=8.0, use_rslora=True).scale == 4.0
    assert LoraArgs(r=16, alpha=64.0, use_rslora=True).scale == 16.0
    with pytest.raises(ValueError, match="exceeds"):
        LoRALinear(W, r=11, alpha=1.0)


@pytest.mark.parametrize("alpha, dropout, exact", [(64.0, 0.0, True), (20.0, 0.0, False), (64.0, 0.25, False)])
def test_the_layers_pytorch_path_gives_what_the_kernels_reference_gives(alpha, dropout, exact):
    """Off CUDA LoRALinear.forward writes the equation out and autograd forms the backward. It must give
    what masked_lora_linear's PyTorch reference gives (kernels/reference.py): bit for bit at a power-of-two
    scale without dropout (the same products, rounded alike), to rounding otherwise (s multiplies before
    or after a product; dropout's dX is formed in another order), from the same dropout draw."""
    torch.manual_seed(0)
    W, x, dy = torch.randn(24, 16), torch.randn(3, 7, 16), torch.randn(3, 7, 24)
    layer = LoRALinear(W, r=4, alpha=alpha, dropout=dropout).train()
    torch.nn.init.normal_(layer.lora_A), torch.nn.init.normal_(layer.lora_B)
    layer.set_masks(torch.rand(4, 16) < 0.5, torch.rand(24, 4) < 0.5)

    def outputs_and_grads(forward):
        x_in = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # one dropout draw for both
        y = forward(x_in)
        y.backward(dy)
        return y, x_in.grad, layer.lora_A.grad, layer.lora_B.grad

    ours = outputs_and_grads(layer)
    reference = outputs_and_grads(
        lambda x_in: masked_lora_linear(
            x_in, layer.weight, layer.lora_A, layer.lora_B, layer.scale, layer.mask_A, layer.mask_B, dropout, True
        )
    )
    for name, got, want in zip(("y", "dX", "dA", "dB"), ours, reference):
        if exact:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    assert all((g == 0).any() for g in ours[2:])  # the masks did zero some entries


def test_masked_out_gradients_stay_zero_next_to_an_overflowing_one():
    """A masked-out element's gradient is set to 0.0, not multiplied by 0: where a neighbour's gradient
    overflows to inf, 0 * inf would be nan and the frozen element would move."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.randn(8, 6), r=2, alpha=16.0)
    torch.nn.init.normal_(layer.lora_A), torch.nn.init.normal_(layer.lora_B)
    mask_A = torch.tensor([[True] * 6, [False] * 6])
    layer.set_masks(mask_A, torch.ones(8, 2, dtype=torch.bool))
    x = torch.randn(5, 6)
    x[0, 0] = 3e38  # dA[:, 0] = s (dY B)^T x[:, 0] overflows
    layer(x).sum().backward()
    grad = layer.lora_A.grad
    assert torch.isinf(grad[0, 0]) and torch.equal(grad[1], torch.zeros(6))


@pytest.mark.parametrize("init", ["lora", "pissa", "olora"])
def test_inits_leave_the_output_unchanged(tiny_args, init):
    model = fresh_model(tiny_args)
    before = model(TOKENS)
    apply_lora(model, LoraArgs(init=init, targets=ALL))
    after = model(TOKENS)
    if init == "lora":
        assert torch.equal(before, after)  # B = 0: the LoRA term is exactly zero
    else:
        torch.testing.assert_close(after, before, rtol=0, atol=2e-5)
        assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())


def test_lora_init_is_peft_kaiming_and_deterministic(tiny_args):
    a, b, c = fresh_model(tiny_args), fresh_model(tiny_args), fresh_model(tiny_args)
    apply_lora(a, LoraArgs(seed=3)), apply_lora(b, LoraArgs(seed=3)), apply_lora(c, LoraArgs(seed=4))
    for (_, pa), (_, pb), (_, pc) in zip(named_lora_parameters(a), named_lora_parameters(b), named_lora_parameters(c)):
        assert torch.equal(pa, pb) and (pa.abs().sum() == 0 or not torch.equal(pa, pc))
    A = lora_modules(a)["layers.0.attention.wq"].lora_A
    bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    assert all(m.lora_B.abs().sum() == 0 for m in lora_modules(a).values())


def test_gaussian_init_has_the_requested_std_and_changes_the_output(tiny_args):
    model = fresh_model(tiny_args)
    before = model(TOKENS)
    apply_lora(model, LoraArgs(init="gaussian", init_std=0.01, r=8))
    values = torch.cat([p.flatten() for _, p in named_lora_parameters(model)])
    assert abs(values.std().item() - 0.01) < 1e-3 and abs(values.mean().item()) < 1e-3
    assert not torch.equal(model(TOKENS), before)


def test_pissa_is_the_principal_part_and_randomized_svd_is_close(tiny_args):
    model = fresh_model(tiny_args)
    W0 = model.layers[0].feed_forward.w1.weight.detach().clone()
    args = LoraArgs(init="pissa", r=4)
    apply_lora(model, args)
    m = lora_modules(model)["layers.0.feed_forward.w1"]
    U, S, Vh = torch.linalg.svd(W0)
    principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(m.scale * m.lora_B @ m.lora_A, principal, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.weight, W0 - principal, rtol=0, atol=1e-5)
    assert torch.equal(m.init_A, m.lora_A) and torch.equal(m.init_B, m.lora_B)
    # A = sqrt(S) V^T / sqrt(s): its rows are orthogonal with squared norms S / s
    torch.testing.assert_close(m.lora_A @ m.lora_A.T, torch.diag(S[:4]) / m.scale, rtol=1e-4, atol=1e-5)

    # randomized SVD: exact residual split always; close to the exact top-r on a decaying spectrum
    fast = fresh_model(tiny_args)
    with torch.no_grad():
        fast.layers[0].feed_forward.w1.weight.copy_(U[:, :64] @ torch.diag(0.5 ** torch.arange(64.0)) @ Vh)
    W1 = fast.layers[0].feed_forward.w1.weight.detach().clone()
    apply_lora(fast, LoraArgs(init="pissa", r=4, pissa_niter=4))
    n = lora_modules(fast)["layers.0.feed_forward.w1"]
    torch.testing.assert_close(n.scale * n.lora_B @ n.lora_A + n.weight, W1, rtol=0, atol=1e-5)
    top = U[:, :4] @ torch.diag(0.5 ** torch.arange(4.0)) @ Vh[:4]
    torch.testing.assert_close(n.scale * n.lora_B @ n.lora_A, top, rtol=0, atol=1e-3)


def test_olora_is_the_qr_part_as_in_peft(tiny_args):
    model = fresh_model(tiny_args)
    W0 = model.layers[1].attention.wv.weight.detach().clone()
    apply_lora(model, LoraArgs(init="olora", r=4))
    m = lora_modules(model)["layers.1.attention.wv"]
    Q, R = torch.linalg.qr(W0)
    assert torch.equal(m.lora_B, Q[:, :4]) and torch.equal(m.lora_A, R[:4])
    torch.testing.assert_close(m.weight, W0 - m.scale * Q[:, :4] @ R[:4], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- targets, freezing, names


def test_target_spellings_map_to_the_same_modules(tiny_args):
    names = []
    for targets in (
        ("q", "gate", "up", "down"),
        ("wq", "w1", "w3", "w2"),
        ("q_proj", "gate_proj", "up_proj", "down_proj"),
    ):
        model = fresh_model(tiny_args)
        names.append(sorted(apply_lora(model, targets=targets, r=2, alpha=4.0)))
    assert names[0] == names[1] == names[2]
    assert "layers.0.feed_forward.w1" in names[0] and "layers.0.feed_forward.w3" in names[0]  # gate = w1, up = w3
    assert "layers.0.attention.wk" not in names[0]
    assert resolve_targets("down,gate") == ["w1", "w2"]


def test_unknown_target_lists_the_valid_ones(tiny_args):
    with pytest.raises(ValueError, match=r"unknown LoRA target 'qkv'.*gate/w1/gate_proj"):
        apply_lora(fresh_model(tiny_args), targets=("q", "qkv"))


def test_apply_lora_freezes_the_base_and_keeps_state_dict_keys(tiny_args):
    model = fresh_model(tiny_args)
    base_keys = set(model.state_dict())
    modules = apply_lora(model, LoraArgs(targets=ALL, r=4))
    assert len(modules) == 7 * tiny_args.n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{w}" for name in modules for w in "AB"}
    assert base_keys <= set(model.state_dict())  # the base keeps its names: <module>.weight
    with pytest.raises(RuntimeError, match="already has LoRA"):
        apply_lora(model, LoraArgs())


def test_peft_keys_are_exact_and_invertible():
    expected = {
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w1": "mlp.gate_proj",
        "w3": "mlp.up_proj",
        "w2": "mlp.down_proj",
    }
    for leaf, hf in expected.items():
        block = "attention" if leaf.startswith("wq") or leaf in ("wk", "wv", "wo") else "feed_forward"
        name = f"layers.12.{block}.{leaf}"
        key = peft_key(name, "B")
        assert key == f"base_model.model.model.layers.12.{hf}.lora_B.weight"
        assert module_name_of(key) == (name, "B")
    assert (
        peft_key("module.layers.0.attention.wq", "A")
        == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    with pytest.raises(ValueError):
        peft_key("layers.0.attention.wq", "C")
    with pytest.raises(ValueError, match="not a peft LoRA key"):
        module_name_of("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight")


# ----------------------------------------------------------------------------- masks on the model


def test_set_masks_validates_and_masks_reach_the_gradients(tiny_args):
    model = fresh_model(tiny_args)
    apply_lora(model, LoraArgs(init="gaussian", r=4))
    gen = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(p.shape, generator=gen) < 0.4 for k, p in named_lora_parameters(model)}
    set_masks(model, masks)
    assert all(torch.equal(get_masks(model)[k], v) for k, v in masks.items())
    model.train()
    model(TOKENS).logsumexp(-1).sum().backward()
    for key, p in named_lora_parameters(model):
        assert p.grad[~masks[key]].abs().sum() == 0 and p.grad[masks[key]].abs().sum() > 0

    key = next(iter(masks))
    with pytest.raises(KeyError, match="missing"):
        set_masks(model, {k: v for k, v in masks.items() if k != key})
    with pytest.raises(KeyError, match="unexpected"):
        set_masks(model, {**masks, key.replace("layers.0", "layers.9"): masks[key]})
    with pytest.raises(ValueError, match=f"{key} has shape"):
        set_masks(model, {**masks, key: masks[key].T})
    with pytest.raises(TypeError, match="bool"):
        set_masks(model, {**masks, key: masks[key].float()})
    set_masks(model, None)
    assert all(m.mask_A is None for m in lora_modules(model).values())
    assert all(v.all() for v in get_masks(model).values())


# ----------------------------------------------------------------------------- merge, disable


@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_merge_then_forward_equals_unmerged_and_unmerge_is_exact(tiny_args, init):
    model = fresh_model(tiny_args)
    apply_lora(model, LoraArgs(init=init, targets=ALL))
    perturb(model)
    weights = {n: m.weight.detach().clone() for n, m in lora_modules(model).items()}
    unmerged = model(TOKENS)
    merge(model)
    torch.testing.assert_close(model(TOKENS), unmerged, rtol=0, atol=1e-5)
    assert not all(torch.equal(weights[n], m.weight) for n, m in lora_modules(model).items())
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    unmerge(model)
    assert all(torch.equal(weights[n], m.weight) for n, m in lora_modules(model).items())  # bit for bit
    assert torch.equal(model(TOKENS), unmerged)


@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_disable_adapter_runs_the_original_base(tiny_args, init):
    model = fresh_model(tiny_args)
    base = model(TOKENS)
    apply_lora(model, LoraArgs(init=init, targets=ALL))
    perturb(model)
    adapted = model(TOKENS)
    with disable_adapter(model):
        torch.testing.assert_close(model(TOKENS), base, rtol=0, atol=2e-5)
        merge(model)  # the merged path also honours the switch
        torch.testing.assert_close(model(TOKENS), base, rtol=0, atol=2e-5)
        unmerge(model)
    assert torch.equal(model(TOKENS), adapted)


def test_bf16_base_with_fp32_adapter_runs_on_cpu(tiny_args):
    model = fresh_model(tiny_args).to(torch.bfloat16)
    apply_lora(model, LoraArgs(init="gaussian"))
    m = lora_modules(model)["layers.0.attention.wq"]
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    model.train()
    model(TOKENS).sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_A.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- adapter files


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_adapter_round_trip_onto_the_original_base(tiny_args, tmp_path, init):
    model = fresh_model(tiny_args)
    args = LoraArgs(init=init, targets=("q", "k", "v", "gate", "up", "down"), r=4, alpha=16.0, seed=5)
    apply_lora(model, args)
    perturb(model)
    save_adapter(model, tmp_path, args)

    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert set(weights) == {peft_key(n, w) for n in lora_modules(model) for w in "AB"}
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert weights[key].shape == (4, tiny_args.ffn_hidden_dim)  # A is (r, in)
    assert weights["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"].shape == (tiny_args.ffn_hidden_dim, 4)
    assert torch.equal(weights[key], adapter_state_dict(model)[key])
    assert (tmp_path / "adapter_init.safetensors").exists() == (init in ("pissa", "olora"))

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert config["init_lora_weights"] == {"gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[init]

    other = fresh_model(tiny_args)
    assert load_adapter(other, tmp_path) == args
    for (name, m), n in zip(lora_modules(model).items(), lora_modules(other).values()):
        for attr in ("weight", "lora_A", "lora_B"):
            assert torch.equal(getattr(m, attr), getattr(n, attr)), (name, attr)  # residual base rebuilt bit for bit
    assert torch.equal(other(TOKENS), model(TOKENS))

    # onto a model that already has the same LoRA applied (resuming): pissa/olora init factors must agree
    again = fresh_model(tiny_args)
    apply_lora(again, args)
    load_adapter(again, tmp_path)
    assert torch.equal(again(TOKENS), model(TOKENS))


def test_q_and_k_lora_b_rows_are_stored_in_hf_order(tiny_args, tmp_path):
    """HF permutes q/k rows for its rotary layout; the stored lora_B must follow (checkpoint/names.py's rule)."""
    from lorapar.checkpoint.names import meta_to_hf_state_dict

    model = fresh_model(tiny_args)
    args = LoraArgs(init="gaussian", targets=("q", "v"), r=2, alpha=2.0)
    apply_lora(model, args)
    save_adapter(model, tmp_path, args)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    B = lora_modules(model)["layers.0.attention.wq"].lora_B.detach()
    hf = meta_to_hf_state_dict({"layers.0.attention.wq.weight": B}, tiny_args)["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(hf, B) and torch.equal(
        weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], hf
    )
    v_key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    assert torch.equal(weights[v_key], lora_modules(model)["layers.0.attention.wv"].lora_B)


def test_adapter_load_errors_name_the_key_or_file(tiny_args, tmp_path):
    model = fresh_model(tiny_args)
    args = LoraArgs(init="gaussian", targets=("q", "v"), r=2, alpha=4.0)
    apply_lora(model, args)
    save_adapter(model, tmp_path, args)
    weights_path = tmp_path / "adapter_model.safetensors"
    good = load_file(weights_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh_model(tiny_args), tmp_path / "nowhere")
    save_file({k: v for k, v in good.items() if k != key}, weights_path)
    with pytest.raises(KeyError, match=f"missing 1 LoRA tensor.*{key}"):
        load_adapter(fresh_model(tiny_args), tmp_path)
    save_file({**good, key: torch.zeros(3, tiny_args.dim)}, weights_path)
    with pytest.raises(ValueError, match=f"{key} has shape \\(3, 64\\)"):
        load_adapter(fresh_model(tiny_args), tmp_path)
    save_file({**good, key.replace("v_proj", "k_proj"): good[key].clone()}, weights_path)
    with pytest.raises(KeyError, match="unexpected.*k_proj"):
        load_adapter(fresh_model(tiny_args), tmp_path)
    save_file({**good, "base_model.model.lm_head.lora_A.weight": good[key].clone()}, weights_path)
    with pytest.raises(KeyError, match="lm_head"):
        load_adapter(fresh_model(tiny_args), tmp_path)
    save_file(good, weights_path)
    wrong_rank = fresh_model(tiny_args)
    apply_lora(wrong_rank, LoraArgs(targets=("q", "v"), r=4, alpha=4.0))
    with pytest.raises(ValueError, match="r=4.*r=2"):
        load_adapter(wrong_rank, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: invalid JSON"):
        load_adapter(fresh_model(tiny_args), tmp_path)


def test_pissa_adapter_refuses_a_model_with_another_base(tiny_args, tmp_path):
    model = fresh_model(tiny_args)
    args = LoraArgs(init="pissa", r=2)
    apply_lora(model, args)
    save_adapter(model, tmp_path, args)
    plain = fresh_model(tiny_args)
    apply_lora(plain, LoraArgs(init="lora", r=2))
    with pytest.raises(ValueError, match="different pissa base"):
        load_adapter(plain, tmp_path)


def test_export_merged_writes_the_merged_model(tiny_args, tmp_path):
    from lorapar.checkpoint import load_model

    model = fresh_model(tiny_args)
    apply_lora(model, LoraArgs(init="pissa", targets=ALL))
    perturb(model)
    expected = model(TOKENS)
    lora.export_merged(model, tmp_path / "merged")
    assert not any(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(load_model(tmp_path / "merged").eval()(TOKENS), expected, rtol=0, atol=1e-5)


def test_peft_and_transformers_reproduce_the_adapter(tiny_args, tmp_path):
    """Optional: with peft + transformers installed, PeftModel on the HF export computes the same logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lorapar.checkpoint import save_model

    for init in ("gaussian", "pissa", "olora"):
        model = fresh_model(tiny_args)
        save_model(model, tmp_path / init / "base")
        args = LoraArgs(init=init, targets=ALL, r=4, alpha=8.0)
        apply_lora(model, args)
        perturb(model)
        save_adapter(model, tmp_path / init / "adapter", args)
        assert isinstance(peft.LoraConfig.from_pretrained(tmp_path / init / "adapter"), peft.LoraConfig)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / init / "base", dtype=torch.float32)
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / init / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(TOKENS).logits, model(TOKENS), rtol=0, atol=1e-5)
