"""Image helpers shared by the CLI, tracking and benchmarks: grids and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] (rounded as diffusers' postprocess does)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """Tile uint8 images [B, H, W, 3] into one uint8 image, `columns` wide, upscaled by `scale`."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width, _ = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
