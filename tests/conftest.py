import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def digits():
    from jointcompress.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """A LeNet-300-100 trained on digits for a few epochs (shared, never modified by tests)."""
    from jointcompress.pipeline import train_teacher

    return train_teacher("lenet300", digits, epochs=8, lr=2e-3)
