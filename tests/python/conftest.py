import zlib

import pytest
import torch
import torch.utils.deterministic

from utils import device_params


def pytest_configure(config):
    # Also registered in pyproject.toml; repeated so the suite runs from any rootdir.
    for line in ("cuda: needs a CUDA device", "sm90: needs a Hopper (sm_90) GPU",
                 "slow: long-running, excluded from CI", "multigpu: needs several GPUs"):
        config.addinivalue_line("markers", line)


def pytest_generate_tests(metafunc):
    """A `device` argument runs the test on the CPU and, where present, on CUDA (marked `cuda`).

    Tests that also use a `deterministic` fixture run on CUDA in both backward modes; the CPU
    backward is deterministic only."""
    names = metafunc.fixturenames
    if "device" not in names or any(m.name == "parametrize" and "device" in m.args[0]
                                    for m in metafunc.definition.iter_markers()):
        return
    if "deterministic" not in names:
        metafunc.parametrize("device", device_params())
        return
    cases = [pytest.param("cpu", True, id="cpu")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", True, id="cuda-deterministic", marks=pytest.mark.cuda),
                  pytest.param("cuda", False, id="cuda-default", marks=pytest.mark.cuda)]
    metafunc.parametrize("device,deterministic", cases)


@pytest.fixture(autouse=True)
def _seed(request):
    # crc32 rather than hash(): str hashes are salted per process, which would change the data.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """Every torch.empty (including the outputs the ops allocate) comes back NaN-filled, so an
    element the op forgets to write fails the comparison instead of passing on stale zeros.

    PyTorch only fills in deterministic mode; warn_only keeps PyTorch's own non-deterministic ops
    usable. Tests that need the non-deterministic kernels turn it off themselves."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


@pytest.fixture
def one_thread():
    """Runs a test with one intra-op thread (tiny models gain nothing from more), then restores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
