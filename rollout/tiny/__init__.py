"""The embedded tiny testbed: a procedural GenEval-like world, its verifier, and a shipped tiny policy."""

from rollout.tiny.verifier import detect_objects, strict_pass, verify
from rollout.tiny.world import ALL_PROMPTS, TASKS, parse_prompt, prompt_set, render

__all__ = ["ALL_PROMPTS", "TASKS", "detect_objects", "parse_prompt", "prompt_set", "render", "strict_pass", "verify"]
