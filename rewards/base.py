"""The Reward interface, the registry, and plugin loading (registry name, dotted path, entry point).

A reward scores a batch: __call__(images uint8 [B, H, W, 3], prompts, metadata) -> float [B],
NaN meaning "not applicable". The runtime always goes through `Reward.score`, which checks the
inputs and the result and names the reward in every error. A score must be NaN or within
+-MAX_ABS_SCORE: an infinite or huge one is refused like a failed call (rewards.on_reward_error).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np

ENTRY_POINT_GROUP = "solray.rewards"
# The driver combines and normalises scores in float32 (max 3.4e38): deviations up to 2e9 square to
# 4e18, so no batch's mean, std or weighted sum overflows. A larger score is a reward bug (log(0), a
# missing normalisation), not a signal; 1e308 would even turn into inf on the cast to float32.
MAX_ABS_SCORE = 1e9
_REGISTRY: dict[str, type[Reward]] = {}


class RewardError(RuntimeError):
    """A reward failed or returned something unusable; the message names the reward."""


class Reward:
    """Subclasses set `name` and implement __call__; `resources` tells a RewardGroup what to reserve."""

    name: ClassVar[str] = ""
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0}

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        raise NotImplementedError(f"reward {type(self).__name__} must implement __call__")

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]] | None = None) -> np.ndarray:
        """Validated call: float64 [B] scores, or RewardError naming this reward and the problem."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
            raise RewardError(f"reward {self.name!r}: images must be a uint8 array [B, H, W, 3], got {got}")
        batch = len(images)
        metadata = [{} for _ in range(batch)] if metadata is None else metadata
        if len(prompts) != batch or len(metadata) != batch:
            raise RewardError(f"reward {self.name!r}: {batch} images but {len(prompts)} prompts and {len(metadata)} metadata entries")
        try:
            scores = self(images, list(prompts), list(metadata))
        except Exception as error:
            raise RewardError(f"reward {self.name!r} raised {type(error).__name__}: {error}") from error
        scores = np.asarray(scores)
        if scores.shape != (batch,):
            raise RewardError(f"reward {self.name!r} returned shape {scores.shape}, expected ({batch},) (one score per image)")
        if not np.issubdtype(scores.dtype, np.floating):
            raise RewardError(f"reward {self.name!r} returned dtype {scores.dtype}, expected a float dtype (NaN = not applicable)")
        out_of_range = np.abs(scores) > MAX_ABS_SCORE  # False for NaN
        if out_of_range.any():
            index = int(out_of_range.argmax())
            raise RewardError(
                f"reward {self.name!r} returned {float(scores[index])!r} at index {index}: scores must lie within +-{MAX_ABS_SCORE:g} "
                "(NaN = not applicable)"
            )
        return scores.astype(np.float64)

    def eval_metrics(self, scores: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Extra evaluation metrics from this reward's scores [B] of an eval probe (e.g. the tiny verifier's strict
        accuracy per task); the driver logs them as eval/<key>. None by default."""
        return {}


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof 1) over the finite values; NaN where undefined."""
    finite = values[np.isfinite(values)]
    se = float(finite.std(ddof=1) / np.sqrt(finite.size)) if finite.size > 1 else float("nan")
    return (float(finite.mean()) if finite.size else float("nan")), se


def register_reward(cls: type[Reward]) -> type[Reward]:
    """Class decorator: make a Reward buildable by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise TypeError(f"register_reward expects a Reward subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"reward class {cls.__qualname__} must set a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"reward name {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_rewards() -> list[str]:
    """Names build_reward takes: rewards registered in this process and `solray.rewards` entry points (plug-ins)."""
    return sorted(set(_REGISTRY) | {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)})


def _load_dotted(path: str) -> Callable[..., Reward]:
    module_name, _, attr = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except Exception as error:  # a plug-in module may fail to import in any way (syntax error, its own imports, ...)
        raise ValueError(f"cannot load reward {path!r}: {type(error).__name__}: {error}") from error
    return target


def _entry_point(name: str) -> Callable[..., Reward] | None:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            try:
                return entry.load()
            except Exception as error:  # the plug-in package is broken: name it, as for a dotted path
                raise ValueError(f"cannot load reward {name!r} (entry point {entry.value}): {type(error).__name__}: {error}") from error
    return None


def check_reward_name(name_or_path: str) -> str:
    """A name build_reward will resolve: registered or an entry point's (found without importing the plug-in), or a
    dotted path to a Reward (imported: its module must load); ValueError naming it otherwise."""
    if name_or_path not in registered_rewards():
        reward_factory(name_or_path)
    return name_or_path


def reward_factory(name_or_path: str) -> Callable[..., Reward]:
    """What builds the reward a registry name, a dotted path "pkg.module:Class" or a `solray.rewards` entry point
    names; ValueError naming it when there is none, it does not import, or it is a class but not a Reward."""
    if name_or_path in _REGISTRY:
        factory: Callable[..., Reward] | None = _REGISTRY[name_or_path]
    elif ":" in name_or_path:
        factory = _load_dotted(name_or_path)
    else:
        factory = _entry_point(name_or_path)
    if factory is None:
        available = ", ".join(registered_rewards())
        raise ValueError(f"unknown reward {name_or_path!r}; registered: {available}; or give a dotted path 'pkg.module:Class'")
    if isinstance(factory, type) and not issubclass(factory, Reward):
        raise ValueError(f"reward {name_or_path!r} is the class {factory.__qualname__}, not a rewards.Reward subclass")
    return factory


def build_reward(name_or_path: str, **kwargs: Any) -> Reward:
    """A Reward from a registry name, a dotted path "pkg.module:Class", or a `solray.rewards` entry point."""
    reward = reward_factory(name_or_path)(**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward {name_or_path!r} built a {type(reward).__name__}, not a rewards.Reward")
    return reward
