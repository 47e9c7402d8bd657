"""Shared fixtures: the real assets (skipped with a reason when absent, an error under CI=true)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorapar.config import ModelArgs
from lorapar.model import Transformer


def _assets_dir() -> Path | None:
    root = os.environ.get("LORAPAR_ASSETS")
    if root:
        return Path(root)
    fallback = Path(__file__).resolve().parents[2] / "shared" / "assets"  # a checkout beside ../shared
    return fallback if fallback.is_dir() else None


@pytest.fixture
def asset():
    """asset("models/stories260K.bin") -> Path, or skip (fail under CI=true) when it is missing."""

    def find(relative: str) -> Path:
        root = _assets_dir()
        path = root / relative if root is not None else None
        if path is None or not path.exists():
            reason = f"asset {relative!r} not found (set LORAPAR_ASSETS to the assets folder)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        return path

    return find


TINY_ARGS = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=128, hidden_dim=96, max_seq_len=128)


@pytest.fixture
def tiny_args() -> ModelArgs:
    return ModelArgs(**TINY_ARGS)


@pytest.fixture
def tiny_model(tiny_args) -> Transformer:
    """A 2-layer grouped-query LLaMA with deterministic random weights, in eval mode."""
    torch.manual_seed(0)
    model = Transformer(tiny_args)
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture
def device() -> torch.device:
    """The device of the tests that can run anywhere: LORAPAR_TEST_DEVICE (default cpu; bench/gpu_suite.py sets
    cuda). A CUDA request without a GPU is skipped with a reason (a failure under CI=true)."""
    name = os.environ.get("LORAPAR_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        reason = f"LORAPAR_TEST_DEVICE={name} but no CUDA device is available"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return torch.device(name)
