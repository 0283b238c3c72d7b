"""Shared fixtures. Tests run on one torch thread: small matrix products are slower and noisier on two."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_models():
    from dare_pipeline import load_model

    return {fam: load_model(GOLDEN / fam) for fam in ("llada", "dream")}
