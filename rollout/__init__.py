"""Policies (model adapters), samplers, seeded noise and the embedded tiny testbed. Knows nothing of Ray."""

from rollout.loading import ModelConfig, load_policy
from rollout.policy import Conditioning, Policy

__all__ = ["Conditioning", "ModelConfig", "Policy", "load_policy"]
