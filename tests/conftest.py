import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # `cuda` tests run on a GPU machine (`pytest -m cuda`); without one they are skipped, and CI (CPU) runs the rest.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
