"""FLUX.1 (dev, schnell): MMDiT + single-stream transformer on 2x2-packed latents, CLIP-L + T5-XXL, AutoencoderKL.

Latents stay unpacked, [16, H/8, W/8], everywhere outside `_predict` (noise, samplers and NFT losses
see image-shaped latents as for the other families); `_predict` packs them into the transformer's
token sequence and unpacks its output.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from rollout.pipeline_policy import PipelinePolicy
from rollout.policy import Conditioning

DEFAULT_DISTILLED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale for FLUX.1-dev


class FluxPolicy(PipelinePolicy):
    family = "flux"
    pipeline_class = FluxPipeline
    # "attn.*" also matches the single-stream blocks' attention (to_q/to_k/to_v; they have no to_out).
    lora_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )
    default_max_sequence_length: ClassVar[int] = 512
    latent_multiple = 2

    def __init__(self, *args, distilled_guidance: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.transformer.config.guidance_embeds:
            self.distilled_guidance = DEFAULT_DISTILLED_GUIDANCE if distilled_guidance is None else distilled_guidance
        elif distilled_guidance is not None:
            raise ValueError(
                "distilled_guidance is set, but this FLUX transformer has no guidance embedding (guidance_embeds=False, e.g. FLUX.1-schnell)"
            )
        else:
            self.distilled_guidance = None

    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def default_resolution(self) -> int:
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    def schedule_options(self, steps: int) -> dict[str, Any]:
        """FluxPipeline's: sigmas = linspace(1, 1/steps, steps) and mu, linear in the image token count
        (the scheduler applies mu only with use_dynamic_shifting; with use_flow_sigmas it takes no grid)."""
        config = self.pipeline.scheduler.config
        image_tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        grid = {} if config.get("use_flow_sigmas", False) else {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        return grid | {"mu": mu}

    def _encode(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, pooled_prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}).to(self.device, self.dtype)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        prompt_embeds = cond.tensors["prompt_embeds"].to(self.dtype)
        guidance = None if self.distilled_guidance is None else torch.full((batch,), self.distilled_guidance, device=x_t.device)
        packed = self.transformer(
            hidden_states=FluxPipeline._pack_latents(x_t.to(self.dtype), batch, channels, height, width),
            timestep=t.float(),  # in [0, 1] (the pipeline passes timestep / 1000); the transformer casts it to its dtype itself
            guidance=guidance,
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device, dtype=self.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, self.dtype),
            return_dict=False,
        )[0]
        vae_scale = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(packed, height * vae_scale, width * vae_scale, vae_scale)
