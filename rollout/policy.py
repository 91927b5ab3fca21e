"""The one Policy interface every model family implements (tiny testbed, SD3.5, FLUX.1, SANA).

Flow-matching convention (DESIGN.md section 4): x_t = (1 - t) x0 + t eps, t = 1 is noise,
the model predicts v = eps - x0, so x0 = x_t - t v.

LoRA adapters live on `transformer` (a diffusers model, hence peft through PeftAdapterMixin):
  "policy"  the trainable adapter
  "old"     the sampling copy DiffusionNFT soft-updates towards "policy"
  reference = all adapters disabled (the base model)
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "nvfp4", "fp8")
QUANTIZED_PRECISIONS = ("nvfp4", "fp8")
TRAINABLE_ADAPTER = "policy"
OLD_ADAPTER = "old"


def unquantized_precision(precision: str) -> str:
    """The precision a policy loads in before any quantization: nvfp4 and fp8 quantize a bf16 copy."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "bf16" if precision in QUANTIZED_PRECISIONS else precision


def torch_dtype(precision: str) -> torch.dtype:
    """Compute dtype of a precision name; nvfp4 and fp8 keep bf16 outside the quantized linears."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float32 if precision == "fp32" else torch.bfloat16


@dataclass
class Conditioning:
    """Prompt embeddings in the form the family's transformer takes them, batch-first."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        return Conditioning(
            {
                k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
                for k, v in self.tensors.items()
            }
        )

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


class Policy(abc.ABC):
    """A text-to-image flow model seen as an RL policy: prompts -> conditioning -> velocity -> images."""

    family: str
    calibration_prompts: tuple[str, ...] = ()  # prompts of the NVFP4 activation calibration (quant.calibration); () = generic ones
    transformer: nn.Module
    latent_shape: tuple[int, int, int]
    # Module-name suffixes LoRA attaches to (peft `target_modules`).
    lora_target_modules: tuple[str, ...]
    # Static timestep shift of the sampling schedule; None (pipeline families) = the pipeline's own schedule.
    shift: float | None
    precision: str

    def __init__(self) -> None:
        self._prompt_cache: dict[str, Conditioning] = {}

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.precision)

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> Conditioning:
        """Run the text encoders on prompts the cache has not seen."""

    @abc.abstractmethod
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """v(x_t, t | cond) with t in [0, 1] of shape [B]; returns a tensor shaped like x_t."""

    @abc.abstractmethod
    def sigmas(self, steps: int, shift: float | None = None) -> torch.Tensor:
        """The sampling schedule, sigmas [steps + 1] from noise to 0 (rollout.schedules); shift overrides the policy's."""

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 images [B, H, W, 3]."""

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompt embeddings, cached per prompt string (text encoders never change during RL)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            encoded = self._encode(missing)
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = encoded.index(slice(i, i + 1))
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    # --- LoRA -----------------------------------------------------------------------------------

    def add_lora(self, rank: int, alpha: float, init_seed: int = 0) -> None:
        """Attach the trainable "policy" adapter and its "old" sampling copy (same initial weights)."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(self.lora_target_modules))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.transformer.add_adapter(config, adapter_name=TRAINABLE_ADAPTER)
        self.transformer.add_adapter(config, adapter_name=OLD_ADAPTER)
        # LoRA weights stay fp32 over bf16 base weights: lr-sized updates would round away in bf16.
        for adapter in (TRAINABLE_ADAPTER, OLD_ADAPTER):
            for param in self.adapter_parameters(adapter).values():
                param.data = param.data.float()
        self.copy_adapter(TRAINABLE_ADAPTER, OLD_ADAPTER)
        self.transformer.set_adapter(TRAINABLE_ADAPTER)
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(f".{TRAINABLE_ADAPTER}." in name)

    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        tag = f".{adapter}."
        return {name: p for name, p in self.transformer.named_parameters() if tag in name}

    @torch.no_grad()
    def copy_adapter(self, source: str, target: str) -> None:
        targets = self.adapter_parameters(target)
        for name, param in self.adapter_parameters(source).items():
            targets[name.replace(f".{source}.", f".{target}.")].copy_(param)

    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the transformer with one adapter active, or with none (name=None: the reference model)."""
        active = self.transformer.active_adapters()
        if name is None:
            self.transformer.disable_adapters()
        else:
            self.transformer.set_adapter(name)
        try:
            yield
        finally:
            if name is None:
                self.transformer.enable_adapters()
            self.transformer.set_adapter(active)
            # set_adapter also flips requires_grad; only the trainable adapter learns.
            for pname, param in self.transformer.named_parameters():
                param.requires_grad_(f".{TRAINABLE_ADAPTER}." in pname)
