"""ImageReward (Xu et al. 2023): BLIP ViT-L image encoder, BERT text encoder cross-attending to it, MLP head.

ImageReward ships as one torch state dict (`ImageReward.pt`) in the layout of its own BLIP code; it
is converted here to transformers' BlipVisionModel / BlipTextModel names, so no ImageReward or
BLIP package (nor torchvision) is needed. The architecture (config) and the processor (BERT
tokenizer with BLIP's [DEC]/[ENC] tokens, CLIP normalisation) come from a transformers BLIP
retrieval checkpoint, `base`; the image size is read from the checkpoint (224 for ImageReward v1.0).

  score = (MLP(text_encoder(prompt | image)[CLS]) - 0.16717) / 1.03334   (the release's normalisation)
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import numpy as np
import torch
from transformers import AutoProcessor, BlipConfig, BlipTextModel, BlipVisionModel

from rewards.base import register_reward
from rewards.pretrained import PretrainedReward, ScoreHead, load_strict, load_weights

# The BLIP ViT's layer norms use eps 1e-6 (BLIP's vit.py); transformers' BLIP config default is 1e-5.
BLIP_VIT_LAYER_NORM_EPS = 1e-6
# (pattern, replacement), applied in order to BLIP visual_encoder names, after transformers' BLIP conversion script.
_VISION_RENAMES = [
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.norm1\.", ".layer_norm1."),
    (r"\.norm2\.", ".layer_norm2."),
    (r"\.attn\.qkv\.", ".self_attn.qkv."),
    (r"\.attn\.proj\.", ".self_attn.projection."),
    (r"^norm\.", "post_layernorm."),
]


@register_reward
class ImageReward(PretrainedReward):
    name = "imagereward"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.125}  # 0.45 B parameters
    mean, std = 0.16717362830052426, 1.0333394966054072
    max_tokens = 35  # the release tokenizes prompts to 35 tokens

    def __init__(
        self,
        checkpoint: str = "THUDM/ImageReward/ImageReward.pt",
        base: str = "Salesforce/blip-itm-large-coco",
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        """checkpoint: ImageReward.pt, local or "owner/repo/file" on the hub; base: transformers BLIP directory or hub id."""
        super().__init__(device, precision, batch_size)
        vision_state, text_state, head_state = split_imagereward_state(load_weights(checkpoint))
        config = BlipConfig.from_pretrained(base)
        vision_config = config.vision_config
        patches = vision_state["embeddings.position_embedding"].shape[1] - 1
        vision_config.image_size = math.isqrt(patches) * vision_config.patch_size
        vision_config.layer_norm_eps = BLIP_VIT_LAYER_NORM_EPS
        vision, text = BlipVisionModel(vision_config), BlipTextModel(config.text_config, add_pooling_layer=False)
        head = ScoreHead(config.text_config.hidden_size)
        for module, state in ((vision, vision_state), (text, text_state), (head, head_state)):
            load_strict(module, state, checkpoint)
        self.vision, self.text, self.head = self._prepare(vision), self._prepare(text), self._prepare(head)
        self.processor = AutoProcessor.from_pretrained(base)
        self.image_size = {"height": vision_config.image_size, "width": vision_config.image_size}

    def _score(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        text = self.processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt").to(
            self.device
        )
        pixels = self.processor.image_processor(images, size=self.image_size, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.text(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return (self.head(hidden[:, 0]).float() - self.mean) / self.std


def split_imagereward_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageReward.pt -> (BlipVisionModel, BlipTextModel, ScoreHead) state dicts; other BLIP parts are unused."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_RENAMES:
                name = re.sub(pattern, replacement, name)
            vision[name] = value
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    if not (vision and text and head):
        raise ValueError("not an ImageReward state dict: expected blip.visual_encoder.*, blip.text_encoder.* and mlp.* weights")
    return vision, text, head
