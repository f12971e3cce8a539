"""Suite-wide settings.

Tests run torch on one thread: the models here are tiny, and on a 2-core machine shared with other work two
threads spend more time waiting for each other than computing (a 3-step tiny sample: 18 s on 2 contended
threads, 0.1 s on 1). Set FLUXION_TEST_THREADS to use more (e.g. for the opt-in full-size tests).
"""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FLUXION_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
