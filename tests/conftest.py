import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # `cuda` tests run on a GPU machine (`pytest -m cuda`), `multi_gpu` tests on one with 2 or more GPUs
    # (`pytest -m multi_gpu`); without them they are skipped, and CI (CPU) runs the rest.
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needs = {"cuda": (1, "needs a CUDA GPU"), "multi_gpu": (2, f"needs 2 CUDA GPUs, found {gpus}")}
    for marker, (count, reason) in needs.items():
        if gpus >= count:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
