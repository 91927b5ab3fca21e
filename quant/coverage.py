"""Which linear layers of a transformer run in NVFP4 (W4A4), and which stay in high precision: Sol-RL's rule.

Sol-RL (NVlabs/Sana train_scripts/sol_rl/train_utils.py, replace_linear_with_te; values in
configs/sol_rl/{sd3,flux1,sana}.py) swaps every nn.Linear of the transformer for an FP4 one except
  1. a linear whose qualified name contains one of the family's `skip_modules`   kept  "skip:<p>"
  2. a linear with max(in_features, out_features) <= `min_dim`                   kept  "small"
solray applies that rule, with the recipe's `sol.keep_high_precision` patterns as one more skip list
(kept "keep:<p>") checked after the family's. Patterns are regular expressions searched in the
name (re.search): a plain name such as "norm1" matches as a substring, as in Sol-RL ("norm1" also
matches "norm1_context"). Convolutions, norms, embeddings and every other non-linear module stay in
high precision.

Family rules (diffusers' module names; Sol-RL's are the original code's where they differ)
  sd3   skip pos_embed, context_embedder, time_text_embed, norm_out, norm1, ff_context; min_dim 2432
        (SD3.5-L's width): on SD3.5-L only the image stream's feed-forward is left in NVFP4
  flux  skip x_embedder, context_embedder, time_text_embed, norm_out; min_dim 1000: every block
        linear of FLUX.1 (the adaLN modulation linears too) and the final proj_out
  sana  Sol-RL skips t_embedder, t_block, cfg_embedder, y_embedder, x_embedder, final_layer,
        logvar_linear and attn.qkv with min_dim 2240. Diffusers' names for those are time_embed,
        caption_projection, patch_embed, the final proj_out and attn1.to_q/k/v (SANA's code fuses
        q, k, v into one linear). Its cross-attention kv_linear (2240 -> 4480) is attn2.to_k and
        attn2.to_v here (2240 -> 2240 each): `fused` makes siblings that are one linear in the
        reference count as one for the size test (their outputs add up), so they stay in NVFP4 as in
        Sol-RL, while attn2.to_q, both out projections (2240 x 2240) stay in BF16. The feed-forward
        is convolutional (GLUMBConv): in BF16, as in Sol-RL since 4b72423 dropped replace_conv1x1.
  tiny  the sd3 rule scaled to the testbed: its skip list, and min_dim 128 = the tiny width (as 2432
        is SD3.5-L's), so again only the image stream's feed-forward runs in NVFP4.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class QuantRule:
    """One family's NVFP4 coverage: Sol-RL's skip list and min_dim, and the siblings fused in the reference."""

    skip_modules: tuple[str, ...]
    min_dim: int
    fused: tuple[str, ...] = ()


_SD3_SKIP = ("pos_embed", "context_embedder", "time_text_embed", "norm_out", "norm1", "ff_context")
FAMILY_RULES: dict[str, QuantRule] = {
    "sd3": QuantRule(_SD3_SKIP, 2432),
    "flux": QuantRule(("x_embedder", "context_embedder", "time_text_embed", "norm_out"), 1000),
    "sana": QuantRule(
        ("time_embed", "caption_projection", "patch_embed", "^proj_out$", r"attn1\.to_[qkv]$"), 2240, fused=(r"attn2\.to_[kv]$",)
    ),
    "tiny": QuantRule(_SD3_SKIP, 128),
}


@dataclass
class LayerSelection:
    """The quantization report of one transformer: which linears run in NVFP4 and how much of it that is."""

    family: str
    skip_modules: tuple[str, ...]
    min_dim: int
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
            "skip_modules": list(self.skip_modules),
            "min_dim": self.min_dim,
            "keep_patterns": list(self.keep_patterns),
            "quantized_layers": list(self.quantized),
            "kept_layers": dict(self.kept),
            "num_quantized_layers": len(self.quantized),
            "num_kept_linears": len(self.kept),
            "quantized_params": self.quantized_params,
            "kept_params": self.kept_params,
            "quantized_fraction": self.quantized_fraction,
        }


def family_rule(family: str) -> QuantRule:
    if family not in FAMILY_RULES:
        raise ValueError(f"no NVFP4 rule for family {family!r} (known: {', '.join(FAMILY_RULES)}); pass skip_modules and min_dim")
    return FAMILY_RULES[family]


def select_layers(
    transformer: nn.Module,
    family: str,
    *,
    skip_modules: Sequence[str] | None = None,
    min_dim: int | None = None,
    keep_patterns: Sequence[str] = (),
) -> LayerSelection:
    """Apply the module's rule to every linear of `transformer`; skip_modules and min_dim default to the family's."""
    rule = family_rule(family) if skip_modules is None or min_dim is None else None
    fused = FAMILY_RULES[family].fused if family in FAMILY_RULES else ()
    selection = LayerSelection(
        family,
        tuple(rule.skip_modules if skip_modules is None else skip_modules),
        rule.min_dim if min_dim is None else min_dim,
        tuple(keep_patterns),
    )
    selection.total_params = sum(p.numel() for p in transformer.parameters())
    linears = {name: module for name, module in transformer.named_modules() if isinstance(module, nn.Linear)}
    sizes = _reference_sizes(linears, fused)
    for name, module in linears.items():
        reason = _keep_reason(name, sizes[name], selection)
        if reason is None:
            selection.quantized.append(name)
            selection.quantized_params += module.weight.numel()
        else:
            selection.kept[name] = reason
    return selection


def _reference_sizes(linears: dict[str, nn.Linear], fused: tuple[str, ...]) -> dict[str, int]:
    """max(in, out) of each linear as the reference sees it: siblings matching one `fused` pattern are one linear."""
    out_features: dict[tuple[str, str], int] = defaultdict(int)
    groups = {}
    for name, linear in linears.items():
        pattern = next((p for p in fused if re.search(p, name)), None)
        if pattern is not None:
            groups[name] = (name.rsplit(".", 1)[0], pattern)  # the attention module holding to_k / to_v
            out_features[groups[name]] += linear.out_features
    return {
        name: max(linear.in_features, out_features[groups[name]] if name in groups else linear.out_features)
        for name, linear in linears.items()
    }


def _keep_reason(name: str, size: int, selection: LayerSelection) -> str | None:
    """Why a linear stays in high precision, or None when it is quantized."""
    for pattern in selection.skip_modules:
        if re.search(pattern, name):
            return f"skip:{pattern}"
    for pattern in selection.keep_patterns:
        if re.search(pattern, name):
            return f"keep:{pattern}"
    if size <= selection.min_dim:
        return "small"
    return None
