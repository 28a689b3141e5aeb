import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # CUDA tests run only where a GPU is visible (the lent machine); elsewhere they are skipped.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "device" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
