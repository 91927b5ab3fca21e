"""Stable Diffusion 3 / 3.5 (Medium, Large): MMDiT transformer, CLIP-L + CLIP-G + T5-XXL text encoders, AutoencoderKL."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import StableDiffusion3Pipeline

from rollout.pipeline_policy import PipelinePolicy
from rollout.policy import Conditioning


class SD3Policy(PipelinePolicy):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    # Flow-GRPO / DiffusionNFT SD3.5 LoRA targets: joint attention, image and text streams.
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
    default_max_sequence_length: ClassVar[int] = 256

    @property
    def latent_multiple(self) -> int:
        return self.transformer.config.patch_size

    def _encode(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, _, pooled_prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}).to(self.device, self.dtype)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=x_t.to(self.dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.dtype),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.dtype),
            timestep=t.float() * 1000,  # fp32 as StableDiffusion3Pipeline passes it (bf16 would round 913.3 to 912)
            return_dict=False,
        )[0]
