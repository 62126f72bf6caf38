"""GPU tests: run on the device machine with `pytest tests/gpu --confcutdir tests/gpu` (skipped without CUDA)."""

import pytest
import torch


def pytest_collection_modifyitems(items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            item.add_marker(skip)
