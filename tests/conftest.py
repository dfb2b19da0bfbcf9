import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """
    One torch thread for a module of tiny-model tests: fastest for them, and robust to
    other processes on the cores. Opt in with `pytestmark = pytest.mark.usefixtures(...)`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
