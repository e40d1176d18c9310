import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the same hypothesis examples every time (a red CI must be reproducible); locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")

# The suite runs in pytest-xdist workers (pyproject addopts), one thread each, for the tests and for the
# processes they start: while one worker waits on a subprocess or a signal, the others use the two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

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


class _CurrentStderr:
    """Lightning's log handlers keep the stderr of the moment they were made: in-process runs of the CLI in later
    tests then wrote to a stream pytest had closed. This one is always the test's own stderr."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True, scope="session")
def _lightning_logs_to_the_current_stderr():
    import lightning  # noqa: F401  (sets up its handlers)
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(_CurrentStderr())
