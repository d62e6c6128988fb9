"""Fixtures shared by several test files."""
import os

import pytest
import torch
from tiny_runs import TINY_RUN, invoke


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n 2`), each worker is one of the CPU's cores: one torch thread per
    worker, and the same for the subprocesses it starts (OMP_NUM_THREADS), so workers never oversubscribe the
    cores with spinning thread pools. A test that wants more threads sets them itself."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors, many steps: one thread is fastest, and two threads stall badly on a busy 2-core machine.
    A module uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder trained for 2 steps with TINY_RUN (tests/tiny_runs.py), shared by the command-line tests that
    only need some trained model: sampling, grid optimisation, restoration."""
    d = tmp_path_factory.mktemp("tiny_run")
    args = ["train", "--run", d, "--no-progress"]
    for s in TINY_RUN:
        args += ["--set", s]
    invoke(args)
    return d
