"""The tiny testbed policy: a diffusers SD3 (MMDiT) transformer in pixel space with a tiny CLIP text encoder.

Stored in diffusers' pipeline layout, so it loads through the same `from_pretrained` calls as a
real checkpoint:
  weights/transformer/    config.json + diffusion_pytorch_model.safetensors  (SD3Transformer2DModel)
  weights/text_encoder/   config.json + model.safetensors                    (CLIPTextModel)
  weights/tokenizer/      tokenizer.json (word level: the tiny world's vocabulary)
  weights/policy.json     sampling facts (shift)
The "latent" is the image itself, [3, 32, 32] in [-1, 1]; decoding is a rescale to uint8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from rollout.images import to_uint8
from rollout.policy import Conditioning, Policy, torch_dtype
from rollout.schedules import flow_match_sigmas
from rollout.tiny.world import ALL_PROMPTS, IMAGE_SIZE, TASKS, parse_prompt, prompt_set

WEIGHTS_DIR = Path(__file__).parent / "weights"
CALIBRATION_PROMPTS_PER_TASK = 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")
MAX_TOKENS = 12
TEXT_DIM = 64
SHIFT = 1.0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word of the tiny world's prompts, with <bos>/<eos> added."""
    words = sorted({word for prompt in ALL_PROMPTS for word in prompt.split()})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_TOKENS
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=128,
        pooled_projection_dim=TEXT_DIM,
        pos_embed_max_size=IMAGE_SIZE // 4,
    )


class TinyPolicy(Policy):
    family = "tiny"
    # The first CALIBRATION_PROMPTS_PER_TASK train prompts of each task type.
    calibration_prompts = tuple(
        p for task in TASKS for p in [q for q in prompt_set("train") if parse_prompt(q).task == task][:CALIBRATION_PROMPTS_PER_TASK]
    )
    latent_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
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

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerFast,
        shift: float,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.precision = precision
        self.shift = shift
        self.transformer = transformer.to(device=device, dtype=torch_dtype(precision)).eval()
        self.text_encoder = text_encoder.to(device=device).eval().requires_grad_(False)
        self.transformer.requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def recognizes(cls, path: str) -> bool:
        """ "tiny" (the shipped weights) or a directory save_pretrained wrote."""
        return path == "tiny" or (Path(path) / "policy.json").is_file()

    @classmethod
    def from_pretrained(
        cls, path: str | Path = WEIGHTS_DIR, precision: str = "fp32", device: str | torch.device = "cpu", **options
    ) -> TinyPolicy:
        """The shipped weights ("tiny") or a saved tiny policy; the tiny model takes none of the diffusers families' options."""
        if options:
            raise ValueError(f"model options {sorted(options)} apply to the diffusers families (sd3, flux, sana), not to the tiny model")
        path = WEIGHTS_DIR if str(path) == "tiny" else Path(path)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, subfolder="tokenizer")
        shift = json.loads((path / "policy.json").read_text())["shift"]
        return cls(transformer, text_encoder, tokenizer, shift, precision, device)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        (path / "policy.json").write_text(json.dumps({"shift": self.shift}, indent=2) + "\n")

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids

    def text_embeddings(self, input_ids: torch.Tensor) -> Conditioning:
        """Text encoder forward (with grad when the caller enables it: pretraining trains it)."""
        out = self.text_encoder(input_ids=input_ids.to(self.device))
        return Conditioning({"prompt_embeds": out.last_hidden_state, "pooled_prompt_embeds": out.pooler_output})

    def _encode(self, prompts: list[str]) -> Conditioning:
        return self.text_embeddings(self.tokenize(prompts)).to(self.device, self.dtype)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=x_t.to(self.dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.dtype),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.dtype),
            timestep=t.float() * 1000,  # fp32, as the reference pipelines pass it: bf16 would round 913.3 to 912
            return_dict=False,
        )[0]

    def sigmas(self, steps: int, shift: float | None = None) -> torch.Tensor:
        return flow_match_sigmas(steps, self.shift if shift is None else shift)

    def decode(self, x0: torch.Tensor) -> np.ndarray:
        return to_uint8(x0)

    @staticmethod
    def encode_images(images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> latents [B, 3, H, W] in [-1, 1] (the inverse of `decode`)."""
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
