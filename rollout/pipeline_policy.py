"""The part every diffusers-pipeline family (SD3.5, FLUX.1, SANA) shares: loading, freezing, latent
geometry, classifier-free guidance and the VAE decode.

A family subclass names its pipeline class, encodes prompts with the pipeline's own `encode_prompt`,
and calls its transformer. The policy takes the transformer out of the pipeline, which keeps only
the text encoders, tokenizers, VAE and scheduler config: an explore copy (quant.quantize_policy
swaps `transformer` and shares the rest) then never keeps a second high-precision transformer alive
through the pipeline.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline

from rollout.images import to_uint8
from rollout.policy import Conditioning, Policy, torch_dtype
from rollout.schedules import linear_sigmas, scheduler_sigmas


class PipelinePolicy(Policy):
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # T5 / Gemma tokens per prompt when the recipe gives none (the pipeline's own default).
    default_max_sequence_length: ClassVar[int]
    # Latent height and width must be multiples of this (the transformer's patch, or FLUX's 2x2 packing).
    latent_multiple: int

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        resolution: int | None = None,
        cfg_scale: float = 1.0,
        max_sequence_length: int | None = None,
        schedule: str = "pipeline",
    ) -> None:
        super().__init__()
        self.precision = precision
        transformer, pipeline.transformer = pipeline.transformer, None
        self.pipeline = pipeline.to(device)
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)
        self.vae = pipeline.vae
        if transformer.dtype != torch_dtype(precision):
            transformer = transformer.to(dtype=torch_dtype(precision))
        self.transformer = transformer.to(device).eval().requires_grad_(False)
        self.cfg_scale = cfg_scale
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.resolution = resolution or self.default_resolution()
        multiple = pipeline.vae_scale_factor * self.latent_multiple
        if self.resolution % multiple:
            raise ValueError(
                f"{self.family} needs a resolution divisible by {multiple} (VAE factor x latent multiple), got {self.resolution}"
            )
        size = self.resolution // pipeline.vae_scale_factor
        self.latent_shape = (self.latent_channels(), size, size)
        self.shift = None  # the pipeline's own schedule; model.shift sets a static one
        self.schedule = schedule
        self._sigmas: dict[tuple[int, float | None], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, precision: str = "fp32", device: str | torch.device = "cpu", **options) -> PipelinePolicy:
        """Load a diffusers pipeline directory or hub id; options are those of __init__ (resolution, cfg_scale, ...)."""
        return cls(cls.pipeline_class.from_pretrained(path, torch_dtype=torch_dtype(precision)), precision, device, **options)

    # --- what a family defines or overrides ---------------------------------------------------

    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def default_resolution(self) -> int:
        return self.transformer.config.sample_size * self.pipeline.vae_scale_factor

    def schedule_options(self, steps: int) -> dict[str, Any]:
        """What the family's pipeline passes to its scheduler's set_timesteps besides the step count."""
        return {}

    @abc.abstractmethod
    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One transformer forward: the family's velocity v = eps - x0, without guidance."""

    # --- shared -----------------------------------------------------------------------------------

    def sigmas(self, steps: int, shift: float | None = None) -> torch.Tensor:
        """The pipeline's schedule for `steps` (rollout.schedules), from the checkpoint's scheduler config; or the
        linear one when the policy was loaded with schedule="linear"."""
        shift = self.shift if shift is None else shift
        if self.schedule == "linear":
            return linear_sigmas(steps, 1.0 if shift is None else shift)
        if (steps, shift) not in self._sigmas:
            scheduler = self.pipeline.scheduler
            self._sigmas[steps, shift] = scheduler_sigmas(type(scheduler), scheduler.config, steps, shift, **self.schedule_options(steps))
        return self._sigmas[steps, shift].clone()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.cfg_scale == 1.0:
            return self._predict(x_t, t, cond)
        # CFG: the empty prompt is the unconditional input, as the diffusers pipelines use it.
        uncond = self.encode_prompts([""] * len(x_t))
        v_uncond, v_cond = self._predict(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond])).chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> np.ndarray:
        config = self.vae.config
        latents = x0.to(self.device, self.vae.dtype) / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        # One image at a time: bounds VAE memory at 1024 px and keeps each image independent of its batch.
        return to_uint8(torch.cat([self.vae.decode(latent[None], return_dict=False)[0] for latent in latents]))
