"""Prompt sources: which P prompts an iteration trains on, deterministic per (run seed, step).

A source is a text file (one prompt per line) or "name:set", where `name` is a plug-in's
`solray.prompts` entry point: a mapping from set names to prompt lists (the tiny testbed's
"tiny:train", "tiny:eval", "tiny:curriculum").
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

ENTRY_POINT_GROUP = "solray.prompts"


def load_prompts(spec: str) -> list[str]:
    """A registered prompt set ("tiny:eval") or a text file with one prompt per line (blank lines ignored)."""
    entries = {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}
    name, colon, subset = spec.partition(":")
    if colon and name in entries and subset in (prompt_sets := entries[name].load()):
        return list(prompt_sets[subset])
    path = Path(spec)
    if not path.is_file():
        sets = {name: entry.load() for name, entry in entries.items()}  # only now: to list them
        registered = ", ".join(f"'{name}:{subset}'" for name, subsets in sets.items() for subset in subsets)
        raise ValueError(f"prompt source {spec!r} is neither {registered or 'a registered prompt set'} nor an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {spec!r} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompts")
    return prompts


class PromptSource:
    """P distinct prompts per step, drawn without replacement from a fixed list (with replacement if P exceeds it)."""

    def __init__(self, spec: str, run_seed: int) -> None:
        self.prompts = load_prompts(spec)
        self.run_seed = run_seed

    def batch(self, step: int, count: int) -> list[str]:
        rng = np.random.default_rng([self.run_seed, step])
        replace = count > len(self.prompts)
        return [self.prompts[i] for i in rng.choice(len(self.prompts), size=count, replace=replace)]
