"""What rewards backed by pretrained torch models share: device and dtype, batching, weight files, the MLP score head."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rewards.base import Reward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PretrainedReward(Reward):
    """A Reward around torch models: scores `batch_size` images per forward, without gradients.

    Declares a GPU share by default: these models hold 0.4-1 B parameters (1.7-4 GB in fp32), small
    enough for several to share a GPU with each other or with a policy worker.
    """

    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0, "num_gpus": 0.25}

    def __init__(self, device: str | None = None, precision: str = "fp32", batch_size: int = 32) -> None:
        if precision not in DTYPES:
            raise ValueError(f"reward {self.name!r}: precision must be one of {tuple(DTYPES)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[precision]
        self.batch_size = batch_size

    @abc.abstractmethod
    def _score(self, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
        """Scores [b] of one batch of uint8 [H, W, 3] images against their prompts."""

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        scores = [
            self._score(list(images[start : start + self.batch_size]), prompts[start : start + self.batch_size]).float().cpu()
            for start in range(0, len(images), self.batch_size)
        ]
        return torch.cat(scores).numpy().astype(np.float64)

    def _prepare(self, module: nn.Module) -> nn.Module:
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)


class ScoreHead(nn.Module):
    """The 5-layer MLP of the LAION aesthetic predictor and of ImageReward (no activations, as published).

    Parameter names (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`) match both releases.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


def resolve_file(spec: str) -> Path:
    """A local file, or "owner/repo/path/in/repo" fetched from the Hugging Face hub."""
    if Path(spec).is_file():
        return Path(spec)
    parts = spec.split("/")
    if len(parts) < 3:
        raise FileNotFoundError(f"{spec!r} is neither a local file nor a hub file 'owner/repo/path/in/repo'")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))


def load_weights(spec: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (loaded with weights_only: no pickled code runs).

    A checkpoint that nests its weights under "state_dict" (open_clip training checkpoints) is unwrapped.
    """
    path = resolve_file(spec)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names what is missing or left over (only non-persistent-style position_ids may differ)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
