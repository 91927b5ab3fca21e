"""Tiny random-weight SD3, FLUX.1 and SANA pipelines, built in memory (nothing downloaded).

Each builder makes a diffusers pipeline from tiny configs, as diffusers' own fast tests do
(`get_dummy_components`), but with character-level tokenizers built here (rollout.char_tokenizers).
Saved with `save_pretrained`, a pipeline loads through `load_policy` as a real checkpoint directory does.
Used by tests/test_families.py and bench/gpu_check.py; imports diffusers and transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from rollout.char_tokenizers import clip_tokenizer, gemma_tokenizer, t5_tokenizer

TEXT_TOKENS = 32  # CLIP context of the tiny tokenizers, and the T5 / Gemma tokens per prompt
RESOLUTION = 32  # pixels; latents are 16x16 (VAE scale factor 2); SanaPipeline needs a multiple of 32


def clip_text_config(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8)
    )


def kl_vae(latent_channels: int, **factors) -> AutoencoderKL:
    """Two blocks: an 8x8 latent decodes to 16x16 pixels (VAE scale factor 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **factors,
    )


def sd3_pipeline() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    clip = clip_tokenizer(TEXT_TOKENS)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=8,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=kl_vae(4, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(clip, projection_dim=16)),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(clip, projection_dim=16)),
        tokenizer_2=clip_tokenizer(TEXT_TOKENS),
        text_encoder_3=t5_encoder(t5_tokenizer()),
        tokenizer_3=t5_tokenizer(),
    )


def flux_pipeline() -> FluxPipeline:
    torch.manual_seed(0)
    clip = clip_tokenizer(TEXT_TOKENS)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
        vae=kl_vae(4, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(clip_text_config(clip)),
        tokenizer=clip,
        text_encoder_2=t5_encoder(t5_tokenizer()),
        tokenizer_2=t5_tokenizer(),
    )


def sana_pipeline() -> SanaPipeline:
    torch.manual_seed(0)
    tokenizer = gemma_tokenizer()
    gemma = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    return SanaPipeline(
        transformer=SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=32,
            sample_size=8,
        ),
        scheduler=DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
        vae=AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        ),
        text_encoder=Gemma2Model(gemma),
        tokenizer=tokenizer,
    )


PIPELINE_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {"sd3": sd3_pipeline, "flux": flux_pipeline, "sana": sana_pipeline}
