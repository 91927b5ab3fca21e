import pytest
import ray  # noqa: F401  (its "ray" logger's handler keeps the sys.stderr of its import: see below)
import torch
import transformers.generation.continuous_batching.utils  # noqa: F401  (creates its logger's handler: see below)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from rollout import load_policy

# diffusers, transformers and ray bind their log handlers to sys.stderr when they first log (or import);
# inside a capsys test that is the capture stream, closed after the test, and every later warning
# then prints a logging error. Binding them here, at collection, keeps them on the real stderr.
diffusers_logging.get_logger("diffusers").info("bound to the real stderr")
transformers_logging.get_logger("transformers").info("bound to the real stderr")


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
