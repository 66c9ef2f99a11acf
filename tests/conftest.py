"""Shared test setup: every test starts seeded, with an empty Pyro param store and
Pyro's validation on; ``gpu``-marked tests are skipped on machines without CUDA.

The ``slow`` and ``gpu`` markers are registered in ``pyproject.toml``.
"""

from __future__ import annotations

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def reset_pyro():
    """Seed torch/NumPy/random (``pyro.set_rng_seed(0)``), clear Pyro's global param
    store and enable validation before each test."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests when ``torch.cuda.is_available()`` is False."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
