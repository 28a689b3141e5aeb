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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: on a shared 2-core machine two threads cost
    more than they give (measured 10x slower under load). Restored afterwards for the other modules.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mixture():
    """A factory of analytic Gaussian-mixture velocity fields (exact ground truth, any dimension)."""
    from bespoke_ext.models.oracle import GaussianMixtureFlow

    def make(dim: int = 4, *, components: int = 5, std: float = 0.15, seed: int = 0):
        return GaussianMixtureFlow.random(dim=dim, components=components, std=std, seed=seed)

    return make
