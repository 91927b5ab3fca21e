"""Which linear layers of a transformer run in NVFP4 (W4A4), and which stay in high precision.

Rule (DESIGN.md section 5), applied to every nn.Linear of the transformer, first match wins:
  1. outside the transformer blocks (embedders, final norm and projection)   kept  "outside_blocks"
  2. name matches one of the family's keep patterns                          kept  "keep_pattern:<p>"
  3. in_features or out_features <= min_features                             kept  "small"
  4. otherwise                                                                quantized
Keep patterns are regular expressions searched in the module's qualified name (re.search): a plain
word such as "norm" matches as a substring, "^proj_out$" only the top-level layer of that name.
Convolutions, norms, embeddings and every other non-linear module always stay in high precision.

Defaults
  * The blocks are the `transformer_blocks` / `single_transformer_blocks` ModuleLists that SD3,
    FLUX and SANA share in diffusers.
  * "norm" keeps the adaLN modulation linears (norm1.linear, norm1_context.linear, norm.linear):
    they turn the timestep embedding into every block's scale, shift and gate, and they see one row
    per sample, so FP4 would save nothing there and add error where it multiplies everything.
  * MIN_FEATURES = 64: a linear with a side of 64 or less has at most 4 blocks per row and costs a
    negligible share of compute. Every block linear of SD3.5, FLUX.1 and SANA is >= 1152 wide and the
    tiny testbed's are 128, so the threshold only spares toy-sized layers (tests pass their own).
The expected transformer is a plain one: quant.explore merges LoRA adapters before selecting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

BLOCK_PATTERN = r"^(single_)?transformer_blocks\.\d+\."
MIN_FEATURES = 64

_SD3_KEEP = ("pos_embed", "time_text_embed", "context_embedder", "norm", "^proj_out$")
FAMILY_KEEP_PATTERNS: dict[str, tuple[str, ...]] = {
    "tiny": _SD3_KEEP,
    "sd3": _SD3_KEEP,
    # Only the top-level proj_out: each FLUX single block has its own proj_out, which is quantized.
    "flux": ("x_embedder", "time_text_embed", "context_embedder", "norm", "^proj_out$"),
    "sana": ("patch_embed", "time_embed", "caption_projection", "caption_norm", "norm", "^proj_out$"),
}


@dataclass
class LayerSelection:
    """The quantization report of one transformer: which linears run in NVFP4 and how much of it that is."""

    family: str
    min_features: int
    keep_patterns: tuple[str, ...]
    quantized: list[str] = field(default_factory=list)  # qualified names of the NVFP4 linears
    kept: dict[str, str] = field(default_factory=dict)  # every other linear -> reason it stays high precision
    quantized_params: int = 0  # weight elements of the NVFP4 linears (their biases stay high precision)
    total_params: int = 0  # every parameter of the transformer

    @property
    def kept_params(self) -> int:
        return self.total_params - self.quantized_params

    @property
    def quantized_fraction(self) -> float:
        return self.quantized_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        """Plain, JSON-serialisable form for run logs."""
        return {
            "family": self.family,
            "min_features": self.min_features,
            "keep_patterns": list(self.keep_patterns),
            "quantized_layers": list(self.quantized),
            "kept_layers": dict(self.kept),
            "num_quantized_layers": len(self.quantized),
            "num_kept_linears": len(self.kept),
            "quantized_params": self.quantized_params,
            "kept_params": self.kept_params,
            "quantized_fraction": self.quantized_fraction,
        }


def select_layers(
    transformer: nn.Module,
    family: str,
    min_features: int = MIN_FEATURES,
    keep_patterns: Sequence[str] | None = None,
) -> LayerSelection:
    """Apply the module's rule to every linear of `transformer`; keep_patterns default to the family's."""
    if keep_patterns is None:
        if family not in FAMILY_KEEP_PATTERNS:
            raise ValueError(f"no default keep patterns for family {family!r} (known: {', '.join(FAMILY_KEEP_PATTERNS)}); pass keep_patterns")
        keep_patterns = FAMILY_KEEP_PATTERNS[family]
    selection = LayerSelection(family, min_features, tuple(keep_patterns))
    selection.total_params = sum(p.numel() for p in transformer.parameters())
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = _keep_reason(name, module, selection.keep_patterns, min_features)
        if reason is None:
            selection.quantized.append(name)
            selection.quantized_params += module.weight.numel()
        else:
            selection.kept[name] = reason
    return selection


def _keep_reason(name: str, linear: nn.Linear, keep_patterns: tuple[str, ...], min_features: int) -> str | None:
    """Why `linear` stays in high precision, or None when it is quantized."""
    if not re.match(BLOCK_PATTERN, name):
        return "outside_blocks"
    for pattern in keep_patterns:
        if re.search(pattern, name):
            return f"keep_pattern:{pattern}"
    if min(linear.in_features, linear.out_features) <= min_features:
        return "small"
    return None
