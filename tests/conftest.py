import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run under the CPU interpreter; it must be on before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # note every interpreted launch, to compile them all for sm_90 at the end (tests/test_triton_sm90.py)
        from tests import triton_sm90
        triton_sm90.record()
    except ImportError:  # (no triton: its tests skip)
        pass

LAST = "test_triton_sm90.py::test_every_launch_compiles_for_sm90"


def pytest_collection_modifyitems(config, items):
    # The sm_90 compile check runs last: it compiles every launch the tests before it made.
    items.sort(key=lambda item: item.nodeid.endswith(LAST))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Different random data per test, the same in every run: the seed comes from the test's name
    # through a stable hash (Python's hash() of a str changes per process). VKERN_TEST_SEED shifts
    # every seed, to look for inputs the fixed seeds miss.
    offset = int(os.environ.get("VKERN_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + offset) % 2**31)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Runs a test on the CPU (CI) and, marked gpu, on the GPU (`pytest -m gpu`)."""
    return torch.device(request.param)
