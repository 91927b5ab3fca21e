import pytest

from rollout import load_policy


@pytest.fixture(scope="session")
def tiny_policy():
    """The shipped tiny policy in fp32 (tests must not add adapters to it; load a fresh one for that)."""
    return load_policy("tiny")
