"""SANA (1.6B / 600M): linear-attention DiT with cross-attention, Gemma-2 text encoder, DC-AE (32x) autoencoder."""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from diffusers import SanaPipeline

from rollout.pipeline_policy import PipelinePolicy
from rollout.policy import Conditioning

# SanaPipeline.__call__ prefixes every prompt with this instruction before Gemma encodes it, but its
# encode_prompt does not by default: take the pipeline's own default so both condition alike.
COMPLEX_HUMAN_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaPolicy(PipelinePolicy):
    family = "sana"
    pipeline_class = SanaPipeline
    # Self-attention (attn1: the linear-attention qkv and output projection) and cross-attention (attn2).
    lora_target_modules = (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    )
    default_max_sequence_length: ClassVar[int] = 300

    @property
    def latent_multiple(self) -> int:
        return self.transformer.config.patch_size

    def _encode(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, prompt_attention_mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=COMPLEX_HUMAN_INSTRUCTION,
        )
        return Conditioning({"prompt_embeds": prompt_embeds, "prompt_attention_mask": prompt_attention_mask}).to(self.device, self.dtype)

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        config = self.transformer.config
        v = self.transformer(
            x_t.to(self.dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.dtype),
            encoder_attention_mask=cond.tensors["prompt_attention_mask"],
            timestep=t.float() * 1000 * config.timestep_scale,  # fp32: the time embedding rounds to its own dtype
            return_dict=False,
        )[0]
        # Checkpoints trained with learned sigma predict [v, sigma] stacked on channels.
        return v.chunk(2, dim=1)[0] if config.out_channels // 2 == config.in_channels else v
