"""Sampling schedules: the sigmas [steps + 1] from noise (about 1) to data (0) that a sampler steps through.

Every family samples on the schedule its own diffusers pipeline uses (what `pipeline(...,
num_inference_steps=steps)` passes to its scheduler's `set_timesteps`), so that a recipe reproduces
the reference code's trajectories:

  family  scheduler (checkpoint config)       what the pipeline passes to set_timesteps
  sd3     FlowMatchEulerDiscreteScheduler     steps (static shift, 3.0 for SD3.5)
  flux    FlowMatchEulerDiscreteScheduler     sigmas = linspace(1, 1/steps, steps) and mu, the dynamic
                                              shift linear in the image token count (FluxPipeline)
  sana    DPMSolverMultistepScheduler         steps (flow sigmas with the static flow_shift)
  tiny    FlowMatchEulerDiscreteScheduler     steps (static shift from policy.json)

`model.schedule: linear` samples on linspace(1, 0, steps + 1) instead, as Sol-RL samples SANA.
A static `shift` override (model.shift, sampler.shift) replaces the scheduler config's shift and
turns dynamic shifting off; the sigma grid stays the pipeline's. Sigmas are fp32, as diffusers
keeps them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

SHIFT_KEYS = ("shift", "flow_shift")  # FlowMatchEulerDiscreteScheduler's and DPMSolverMultistepScheduler's static shift


def flow_match_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sigmas [steps + 1] from 1 to 0, exactly as FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps)."""
    _check_steps(steps)
    return torch.tensor(_flow_match(steps, float(shift)), dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _flow_match(steps: int, shift: float) -> tuple[float, ...]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return tuple(scheduler.sigmas.tolist())


def linear_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sigmas [steps + 1] = linspace(1, 0, steps + 1), statically shifted: Sol-RL's SANA sampler
    (diffusion/post_training pipeline_with_logprob, no shift there)."""
    _check_steps(steps)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def scheduler_sigmas(
    scheduler_class: type, config: Mapping[str, Any], steps: int, shift: float | None = None, **set_timesteps: Any
) -> torch.Tensor:
    """Sigmas [steps + 1] of `scheduler_class.from_config(config)` after `set_timesteps(steps, **set_timesteps)`.

    shift: a static shift in place of the config's (dynamic shifting off); None keeps the config's.
    set_timesteps: what the family's pipeline passes besides the step count (FLUX: sigmas and mu);
    a `sigmas` grid replaces the step count, as in the pipeline.
    """
    _check_steps(steps)
    config = dict(config)
    if shift is not None:
        config |= {key: float(shift) for key in SHIFT_KEYS if key in config} | {"use_dynamic_shifting": False}
    scheduler = scheduler_class.from_config(config)
    if "sigmas" in set_timesteps:
        scheduler.set_timesteps(**set_timesteps)
    else:
        scheduler.set_timesteps(steps, **set_timesteps)
    sigmas = scheduler.sigmas.float().cpu()
    if sigmas.shape != (steps + 1,) or sigmas[-1] != 0:
        raise ValueError(
            f"{scheduler_class.__name__} gave {len(sigmas)} sigmas ending at {float(sigmas[-1])} for {steps} steps; the samplers need {steps + 1} ending at 0"
        )
    return sigmas


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
