"""The masked LoRA linear: reference against plain autograd, gradcheck, masks, and every Triton kernel
against the reference (under TRITON_INTERPRET=1 on a CPU; natively on a GPU when there is one)."""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # Triton decides at kernel decoration (first import) whether to interpret.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import masked_lora_linear, reference  # noqa: E402
from kernels.function import triton_kernels  # noqa: E402

TRITON = triton_kernels()
needs_triton = pytest.mark.skipif(TRITON is None, reason="triton is not importable")
N, IN, OUT = 37, 40, 24  # none a multiple of the 16-wide interpreter tiles
SCALE = 0.75


def make(rank, dtype=torch.float32, mask="random", seed=0, n=N, n_in=IN, n_out=OUT):
    """(x, W, A, B, mask_A, mask_B) with masks 'random' (40% active), 'none' (all false), 'all', or None."""
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(n, n_in, generator=gen), torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    lora_A, lora_B = torch.randn(rank, n_in, generator=gen), torch.randn(n_out, rank, generator=gen)
    masks = [None, None]
    if mask is not None:
        masks = [
            {
                "random": torch.rand(shape, generator=gen) < 0.4,
                "none": torch.zeros(shape, dtype=torch.bool),
                "all": torch.ones(shape, dtype=torch.bool),
            }[mask]
            for shape in ((rank, n_in), (n_out, rank))
        ]
    tensors = [t.to(DEVICE, dtype) for t in (x, weight, lora_A, lora_B)]
    return (*tensors, *[None if m is None else m.to(DEVICE) for m in masks])


def naive(x, weight, lora_A, lora_B, mask_A, mask_B, dy, keep=None, p=0.0):
    """Plain autograd, masks applied to the finished gradients: the specification."""
    x, lora_A, lora_B = (t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B))
    x_d = x if keep is None else x * keep / (1 - p)
    y = x @ weight.t() + SCALE * (x_d @ lora_A.t()) @ lora_B.t()
    y.backward(dy)
    grad_A = lora_A.grad if mask_A is None else lora_A.grad * mask_A
    grad_B = lora_B.grad if mask_B is None else lora_B.grad * mask_B
    return y.detach(), x.grad, grad_A, grad_B


def assert_close(actual, expected, dtype, name=""):
    """Tolerance relative to the largest magnitude: bf16 keeps ~3 significant digits, fp16 ~4, fp32 ~7."""
    tolerance = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    bound = tolerance * expected.abs().max().clamp(min=1.0).item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def wide(*tensors):
    return [None if t is None else t.float() if t.is_floating_point() else t for t in tensors]


# ----------------------------------------------------------------------------------- reference path


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_matches_plain_autograd(p):
    x, weight, lora_A, lora_B, mask_A, mask_B = make(8)
    keep = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= p).to(DEVICE) if p else None
    dy = torch.randn(N, OUT, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y, xa = reference.forward(x, weight, lora_A, lora_B, SCALE, keep, p)
    grads = reference.backward(dy, x, xa, weight, lora_A, lora_B, SCALE, mask_A, mask_B, keep, p)
    for name, got, want in zip(
        ("y", "dx", "dA", "dB"), (y, *grads), naive(x, weight, lora_A, lora_B, mask_A, mask_B, dy, keep, p)
    ):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(p):
    # All-true masks: gradcheck differentiates the unmasked function numerically; the masked
    # entries are checked in test_frozen_entries_exactly_zero.
    x, weight, lora_A, lora_B, mask_A, mask_B = make(3, torch.float64, mask="all", n=6, n_in=7, n_out=5)
    x = x.reshape(2, 3, 7)  # 3-D input

    def fn(x, lora_A, lora_B):
        torch.manual_seed(0)  # the same dropout mask on every call gradcheck makes
        return masked_lora_linear(x, weight, lora_A, lora_B, SCALE, mask_A, mask_B, p, training=True)

    inputs = [t.detach().requires_grad_() for t in (x, lora_A, lora_B)]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf, on purpose
@pytest.mark.parametrize("path", ["reference", pytest.param("triton", marks=needs_triton)])
def test_frozen_entries_exactly_zero(path, monkeypatch):
    if path == "triton":
        monkeypatch.setenv("LORAPAR_FORCE_TRITON", "1")
    x, weight, lora_A, lora_B, mask_A, mask_B = make(8)
    x[0, 0] = float("inf")  # frozen gradient entries must stay 0.0 even next to an inf
    lora_A.requires_grad_(), lora_B.requires_grad_()
    masked_lora_linear(x, weight, lora_A, lora_B, SCALE, mask_A, mask_B).nan_to_num().sum().backward()
    assert (lora_A.grad[~mask_A] == 0).all() and (lora_B.grad[~mask_B] == 0).all()
    assert (lora_A.grad[mask_A] != 0).any() and (lora_B.grad[mask_B] != 0).any()


def test_bad_inputs_raise_clear_errors():
    x, weight, lora_A, lora_B, mask_A, _ = make(8)
    with pytest.raises(ValueError, match="must be frozen"):
        masked_lora_linear(x, weight.requires_grad_(), lora_A, lora_B, SCALE)
    weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"lora_B has shape \(24, 4\), expected \(24, 8\)"):
        masked_lora_linear(x, weight, lora_A, lora_B[:, :4], SCALE)
    with pytest.raises(ValueError, match="mask_A must be a bool tensor"):
        masked_lora_linear(x, weight, lora_A, lora_B, SCALE, mask_A.float())
    with pytest.raises(ValueError, match="dropout_p"):
        masked_lora_linear(x, weight, lora_A, lora_B, SCALE, dropout_p=1.0)


def test_dropout_only_in_training():
    x, weight, lora_A, lora_B, *_ = make(8)
    y_eval = masked_lora_linear(x, weight, lora_A, lora_B, SCALE, dropout_p=0.5, training=False)
    y_train = masked_lora_linear(x, weight, lora_A, lora_B, SCALE, dropout_p=0.5, training=True)
    assert torch.equal(y_eval, reference.forward(x, weight, lora_A, lora_B, SCALE)[0])
    assert not torch.allclose(y_eval, y_train)


# ----------------------------------------------------------------------------------- Triton kernels


def run_triton_kernels(rank, dtype, mask, keep_seed=None, p=0.0, needs=(True, True, True)):
    """Every Triton kernel on one problem against the fp32 reference on the same (rounded) values."""
    x, weight, lora_A, lora_B, mask_A, mask_B = make(rank, dtype, mask)
    dy = torch.randn(N, OUT, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    seed = 0 if keep_seed is None else keep_seed
    y, xa = TRITON.forward(x, weight, lora_A, lora_B, SCALE, p, seed)
    grads = TRITON.backward(dy, x, xa, weight, lora_A, lora_B, SCALE, mask_A, mask_B, p, seed, needs)
    keep = triton_keep_mask(x, p, seed) if p else None
    want_y, want_xa = reference.forward(*wide(x, weight, lora_A, lora_B), SCALE, keep, p)
    want = reference.backward(*wide(dy, x, want_xa, weight, lora_A, lora_B), SCALE, mask_A, mask_B, keep, p, needs)
    for name, got, expected in zip(("y", "xa", "dx", "dA", "dB"), (y, xa, *grads), (want_y, want_xa, *want)):
        assert (got is None) == (expected is None), name
        if got is not None:
            assert_close(got, expected, dtype, name)
    return grads, mask_A, mask_B


def triton_keep_mask(x, p, seed):
    """The Philox keep mask the kernels draw for x, read back through the forward kernel: with A = I
    (rank = in) xa is x_d itself, and x has no zeros, so keep = xa != 0."""
    n_in = x.shape[1]
    eye = torch.eye(n_in, dtype=x.dtype, device=x.device)
    zeros = torch.zeros(1, n_in, dtype=x.dtype, device=x.device)
    _, x_d = TRITON.forward(x, zeros, eye, torch.zeros(1, n_in, dtype=x.dtype, device=x.device), 1.0, p, seed)
    return x_d != 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
def test_triton_kernels_random_masks(rank, dtype):
    run_triton_kernels(rank, dtype, "random")


@needs_triton
def test_triton_kernels_fp16():
    run_triton_kernels(8, torch.float16, "random")


@needs_triton
@pytest.mark.parametrize("mask", ["none", "all", None], ids=["all-false", "all-true", "no-mask"])
def test_triton_kernels_mask_kinds(mask):
    (_, grad_A, grad_B), *_ = run_triton_kernels(8, torch.float32, mask)
    if mask == "none":
        assert not grad_A.any() and not grad_B.any()


@needs_triton
def test_triton_without_input_grad():
    """dx not wanted: dY B is formed by torch instead of the dx kernel."""
    run_triton_kernels(8, torch.float32, "random", needs=(False, True, True))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_dropout_matches_reference_with_the_same_mask(dtype):
    p = 0.3
    keep = triton_keep_mask(make(8, dtype)[0], p, seed=1234)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    assert not torch.equal(keep, triton_keep_mask(make(8, dtype)[0], p, seed=1235))
    run_triton_kernels(8, dtype, "random", keep_seed=1234, p=p)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forced_triton_autograd_3d_matches_reference(dtype, monkeypatch):
    x, weight, lora_A, lora_B, mask_A, mask_B = make(8, dtype)
    x = x[:36].reshape(4, 9, IN)
    results = []
    for force in ("0", "1"):
        monkeypatch.setenv("LORAPAR_FORCE_TRITON", force)
        inputs = [t.detach().requires_grad_() for t in (x, lora_A, lora_B)]
        y = masked_lora_linear(inputs[0], weight, inputs[1], inputs[2], SCALE, mask_A, mask_B)
        y.backward(torch.ones_like(y))
        results.append((y, *(t.grad for t in inputs)))
    assert kernels.use_triton(x)  # the env var is still "1"
    for name, got, want in zip(("y", "dx", "dA", "dB"), results[1], results[0]):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_close(got, want.float(), dtype, name)
