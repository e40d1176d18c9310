import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the same hypothesis examples every time (a red CI must be reproducible); locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "reference" / "official_biformer.pt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def reference():
    """Tensors recorded from the original implementation (../shared/reference/). Required under CI."""
    if not FIXTURE.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"reference fixture missing: {FIXTURE}")
        pytest.skip(f"reference fixture not found at {FIXTURE}")
    return torch.load(FIXTURE, weights_only=True)
