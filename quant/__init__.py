"""Explore precision: NVFP4 numerics, layer selection, quantized explore copies, re-quantization, fidelity metrics."""

from quant.explore import BACKENDS, ExploreState, lora_merged_weights, quantize_policy, requantize
from quant.layers import NVFP4Linear
from quant.nvfp4 import nvfp4_fake_quantize
from quant.selection import FAMILY_KEEP_PATTERNS, MIN_FEATURES, LayerSelection, select_layers

__all__ = [
    "BACKENDS",
    "FAMILY_KEEP_PATTERNS",
    "MIN_FEATURES",
    "ExploreState",
    "LayerSelection",
    "NVFP4Linear",
    "lora_merged_weights",
    "nvfp4_fake_quantize",
    "quantize_policy",
    "requantize",
    "select_layers",
]
