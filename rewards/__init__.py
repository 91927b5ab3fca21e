"""Rewards: the Reward interface, the registry, plugin loading, and the built-in rewards."""

from rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from rewards import clip_models as _clip_models  # noqa: F401  (pickscore, hpsv2, clipscore, aesthetic)
from rewards import image_reward as _image_reward  # noqa: F401  (imagereward)
from rewards import remote as _remote  # noqa: F401  (remote)
from rewards import vlm_judge as _vlm_judge  # noqa: F401  (vlm_judge)
from rewards.base import Reward, RewardError, build_reward, register_reward, registered_rewards

__all__ = ["Reward", "RewardError", "build_reward", "register_reward", "registered_rewards"]
