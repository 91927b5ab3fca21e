"""Rewards: the Reward interface, the registry, plugin loading, and the built-in rewards."""

from rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from rewards.base import Reward, RewardError, build_reward, register_reward, registered_rewards

__all__ = ["Reward", "RewardError", "build_reward", "register_reward", "registered_rewards"]
