"""Built-in rewards that need no download."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from rewards.base import Reward, register_reward
from rollout.tiny.alignment import alignment
from rollout.tiny.verifier import verify
from rollout.tiny.world import ALL_PROMPTS


@register_reward
class TinyVerifier(Reward):
    """Partial credit of the tiny world's verifier in [0, 1] (1.0 = strict pass); NaN for other prompts."""

    name = "tiny_verifier"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        return np.array([verify(image, p) if p in ALL_PROMPTS else np.nan for image, p in zip(images, prompts)])


@register_reward
class TinyAlignment(Reward):
    """Dense prompt alignment of the tiny world in [0, 1] (rollout.tiny.alignment): the verifier's checks made
    continuous; the testbed's PickScore, while the strict verifier stays the eval metric. NaN for other prompts."""

    name = "tiny_alignment"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        return np.array([alignment(image, p) if p in ALL_PROMPTS else np.nan for image, p in zip(images, prompts)])


@register_reward
class JpegCompressibility(Reward):
    """DDPO's compressibility: minus the JPEG size in kB at quality 95."""

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        sizes = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return -np.array(sizes)


@register_reward
class Brightness(Reward):
    """Mean luminance in [0, 1]; conflicts with the verifier, since every object darkens the light background."""

    name = "brightness"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        luminance = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return luminance.mean(axis=(1, 2)) / 255
