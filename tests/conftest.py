import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from rollout import load_policy

# diffusers binds its log handler to sys.stderr when it first logs; inside a capsys test that is the
# capture stream, closed after the test, and every later diffusers warning then prints a logging error.
diffusers_logging.get_logger("diffusers").info("bound to the real stderr")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="gpu test: torch.cuda.is_available() is False (a CPU build of torch, or no GPU); bench/gpu_check.py runs these on a GPU"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_policy():
    """The shipped tiny policy in fp32 (tests must not add adapters to it; load a fresh one for that)."""
    return load_policy("tiny")
