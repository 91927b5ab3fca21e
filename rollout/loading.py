"""`load_policy`: one entry point from a model name, path or hub id to a Policy of the right family."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from rollout.policy import PRECISIONS, Policy
from rollout.tiny.model import WEIGHTS_DIR, TinyPolicy

FAMILIES = ("tiny",)


class ModelConfig(BaseModel):
    """The recipe's `model` section."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field("tiny", description='"tiny" for the shipped testbed model, else a local directory or hub id')
    family: Literal["auto", "tiny"] = Field("auto", description="model family; auto reads it from the checkpoint")
    shift: float | None = Field(None, gt=0, description="timestep shift; None uses the family's default")


def _family(path: str) -> str:
    if path == "tiny" or (Path(path) / "policy.json").is_file():
        return "tiny"
    raise ValueError(
        f"cannot tell the model family of {path!r}: it is neither 'tiny' nor a directory holding a tiny policy "
        f"(policy.json); supported families: {', '.join(FAMILIES)}"
    )


def load_policy(model: str | ModelConfig = "tiny", precision: str = "fp32", device: str | torch.device = "cpu") -> Policy:
    """A Policy for `model` ("tiny", a local path or hub id, or a ModelConfig) in fp32, bf16 or nvfp4."""
    config = ModelConfig(path=model) if isinstance(model, str) else model
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    family = _family(config.path) if config.family == "auto" else config.family
    base_precision = "bf16" if precision == "nvfp4" else precision
    if family == "tiny":
        policy: Policy = TinyPolicy.from_pretrained(WEIGHTS_DIR if config.path == "tiny" else config.path, base_precision, device)
    if config.shift is not None:
        policy.shift = config.shift
    if precision == "nvfp4":
        from quant import quantize_policy  # quant imports rollout.policy: import here to avoid a cycle

        policy = quantize_policy(policy, "nvfp4")
    return policy
