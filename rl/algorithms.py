"""The RL algorithms a recipe's algorithm.name picks from (rl.algorithm's interface)."""

from __future__ import annotations

from rl.algorithm import Algorithm
from rl.grpo import GRPO
from rl.nft import NFT

ALGORITHMS: dict[str, type[Algorithm]] = {algorithm.name: algorithm for algorithm in (NFT, GRPO)}
