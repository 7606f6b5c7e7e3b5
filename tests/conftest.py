import os

import pytest
import torch

# under pytest-xdist (make test) each worker is a process: they share the cores, not oversubscribe them
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(scope="session")
def digits():
    from jointcompress.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """A LeNet-300-100 trained on digits for a few epochs (shared, never modified by tests)."""
    from jointcompress.pipeline import train_teacher

    return train_teacher("lenet300", digits, epochs=8, lr=2e-3)
