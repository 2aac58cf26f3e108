import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Matrices this small gain nothing from threads, and a busy 2-core CI box makes them crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
