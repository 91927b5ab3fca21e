"""A reward for tests/test_remote_rewards.py, importable by a Ray Serve replica as tests.reward_server_helpers:Scripted."""

import json
import time
from collections import Counter
from pathlib import Path

from rewards import Reward


class Scripted(Reward):
    """Mean pixel value / 255, logging each call to `log`; per-image metadata steers it: "tag" names the test (its
    calls are logged under it), "fail_first": n fails the first n calls of that tag, "bad" fails every call, "delay"."""

    name = "scripted"

    def __init__(self, log: str) -> None:
        self.log, self.calls = Path(log), Counter()

    def __call__(self, images, prompts, metadata):
        tags = sorted({m.get("tag", "") for m in metadata})
        with self.log.open("a") as file:
            file.write(json.dumps({"tags": tags, "size": len(images)}) + "\n")
        time.sleep(max(m.get("delay", 0.0) for m in metadata))
        self.calls.update(tags)
        if any(self.calls[m.get("tag", "")] <= m.get("fail_first", 0) for m in metadata):
            raise RuntimeError("transient failure")
        if any(m.get("bad") for m in metadata):
            raise ValueError("bad metadata")
        return images.mean(axis=(1, 2, 3)) / 255
