"""CLIP-based rewards: PickScore, HPSv2, CLIPScore and the LAION aesthetic predictor, on transformers' CLIPModel.

Every model loads with `from_pretrained` from a local directory or a hub id (a transformers CLIP
checkpoint with its processor). HPSv2 is released as an open_clip training checkpoint; open_clip
needs torchvision, so its state dict is converted to CLIPModel's layout here instead (`checkpoint`).

  reward      score                                             defaults (hub ids)
  pickscore   logit_scale * cos(image, text)  (about 18-24)     model yuvalkirstain/PickScore_v1,
                                                                processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K
  hpsv2       cos(image, text)                (about 0.2-0.35)  model laion/CLIP-ViT-H-14-laion2B-s32B-b79K (architecture
                                                                + processor), checkpoint xswu/HPSv2/HPS_v2.1_compressed.pt
  clipscore   2.5 * max(cos(image, text), 0)  (Hessel et al.)   model openai/clip-vit-large-patch14
  aesthetic   MLP(normalised CLIP image embedding), 1-10 scale  model openai/clip-vit-large-patch14, head: required file
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoProcessor, CLIPConfig, CLIPModel

from rewards.base import register_reward
from rewards.pretrained import PretrainedReward, ScoreHead, load_strict, load_weights


class ClipSimilarity(PretrainedReward):
    """Cosine similarity of CLIP image and text embeddings, mapped to a score by `_from_cosine`."""

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        """model: CLIP directory or hub id; processor: where the processor lives (default: model);
        checkpoint: open_clip weights to load into model's architecture instead of its own weights."""
        super().__init__(device, precision, batch_size)
        if checkpoint is None:
            clip = CLIPModel.from_pretrained(model)
        else:
            clip = CLIPModel(CLIPConfig.from_pretrained(model))
            load_strict(clip, clip_state_from_open_clip(load_weights(checkpoint)), checkpoint)
        self.model = self._prepare(clip)
        self.processor = AutoProcessor.from_pretrained(processor or model)

    def _score(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pixels = self.processor.image_processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        image_embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = self.model.text_projection(self.model.text_model(**text).pooler_output)
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return self._from_cosine(cosine)

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine


@register_reward
class PickScore(ClipSimilarity):
    name = "pickscore"

    def __init__(
        self, model: str = "yuvalkirstain/PickScore_v1", processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **kwargs
    ) -> None:
        super().__init__(model, processor, **kwargs)

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * cosine


@register_reward
class HPSv2(ClipSimilarity):
    name = "hpsv2"

    def __init__(
        self, model: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", checkpoint: str | None = "xswu/HPSv2/HPS_v2.1_compressed.pt", **kwargs
    ) -> None:
        super().__init__(model, checkpoint=checkpoint, **kwargs)


@register_reward
class CLIPScore(ClipSimilarity):
    name = "clipscore"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.125}  # ViT-L/14: 0.43 B parameters
    weight = 2.5  # Hessel et al. (2021) rescale cosines (about 0-0.4) to roughly [0, 1]

    def __init__(self, model: str = "openai/clip-vit-large-patch14", **kwargs) -> None:
        super().__init__(model, **kwargs)

    def _from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.weight * cosine.clamp_min(0)


@register_reward
class Aesthetic(PretrainedReward):
    """LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

    head: the MLP weights, e.g. `sac+logos+ava1-l14-linearMSE.pth` (improved-aesthetic-predictor
    release), as a torch file or .safetensors, local or "owner/repo/file" on the hub.
    """

    name = "aesthetic"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.125}

    def __init__(
        self,
        head: str,
        model: str = "openai/clip-vit-large-patch14",
        device: str | None = None,
        precision: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        super().__init__(device, precision, batch_size)
        clip = CLIPModel.from_pretrained(model)
        self.vision_model = self._prepare(clip.vision_model)
        self.visual_projection = self._prepare(clip.visual_projection)
        mlp = ScoreHead(clip.config.projection_dim)
        load_strict(mlp, load_weights(head), head)
        self.head = self._prepare(mlp)
        self.image_processor = AutoImageProcessor.from_pretrained(model)

    def _score(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        embeds = self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)
        return self.head(torch.nn.functional.normalize(embeds, dim=-1))


# --- open_clip -> transformers CLIPModel ----------------------------------------------------------

_OPEN_CLIP_NAMES = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# open_clip stores projections as x @ proj; nn.Linear as x @ W^T.
_OPEN_CLIP_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_OPEN_CLIP_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def clip_state_from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT image tower, default text tower) in transformers CLIPModel names."""
    converted = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_NAMES:
            converted[_OPEN_CLIP_NAMES[key]] = value
        elif key in _OPEN_CLIP_PROJECTIONS:
            converted[_OPEN_CLIP_PROJECTIONS[key]] = value.T.contiguous()
        elif key == "attn_mask":  # the text tower's causal mask buffer; CLIPTextModel builds its own
            continue
        elif match := _OPEN_CLIP_BLOCK.match(key):
            tower, layer, rest = match.groups()
            prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):  # fused q, k, v
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            module, _, param = rest.rpartition(".")
            if module not in _OPEN_CLIP_BLOCK_NAMES:
                raise ValueError(f"unknown open_clip block parameter {key!r}")
            converted[f"{prefix}{_OPEN_CLIP_BLOCK_NAMES[module]}.{param}"] = value
        else:
            raise ValueError(f"unknown open_clip parameter {key!r} (expected a ViT image tower and the default text tower)")
    return converted
