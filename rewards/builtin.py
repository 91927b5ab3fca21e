"""Built-in rewards that need no download."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from rewards.base import Reward, register_reward


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
