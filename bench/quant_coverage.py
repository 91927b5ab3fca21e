"""NVFP4 coverage per family: which linears Sol-RL's rule leaves in NVFP4 and their share of the linear FLOPs.

Each transformer is built from its public diffusers config on the meta device (shapes only, no
weights) and run once at the recipe's resolution and text length, counting every nn.Linear's
rows x in x out. The NVFP4 share is that of the linears `quant.coverage.select_layers` quantizes
with the family's rule (Sol-RL's skip list and min_dim); for comparison, the rule solray applied
before it (every transformer-block linear except the adaLN "norm" linears and sides <= 64).

Configs: transformer/config.json of stabilityai/stable-diffusion-3.5-large, black-forest-labs/FLUX.1-dev
and Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers (the keys that differ from diffusers'
defaults), and the tiny testbed's shipped transformer.

Run: python bench/quant_coverage.py   (writes bench/results/quant_coverage.json; a few seconds)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

from quant.coverage import select_layers
from rollout.tiny.model import MAX_TOKENS, TEXT_DIM, build_transformer

OUT = Path("bench/results/quant_coverage.json")
PREVIOUS_RULE = (r"^(single_)?transformer_blocks\.\d+\.", "norm", 64)  # blocks only, adaLN kept, sides <= 64 kept

# family -> (model, recipe, transformer config, resolution in pixels, VAE factor, text tokens, text width)
MODELS = {
    "sd3": (
        "SD3.5-Large", "sd35l_solrl",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
             caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
        1024, 8, 77 + 128, 4096,
    ),
    "flux": (
        "FLUX.1-dev", "flux1_solrl",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        512, 8, 512, 4096,
    ),
    "sana": (
        "SANA-1600M", "sana_solrl",
        dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
             cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
             norm_elementwise_affine=False, norm_eps=1e-6),
        1024, 32, 300, 2304,
    ),
}  # fmt: skip
CLASSES = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel, "sana": SanaTransformer2DModel}


@torch.no_grad()
def linear_flops(transformer: torch.nn.Module, inputs: dict) -> dict[str, int]:
    """rows x in x out of every nn.Linear in one forward."""
    flops: dict[str, int] = {}

    def hook(name):
        return lambda module, args, output: flops.__setitem__(
            name, args[0].numel() // module.in_features * module.in_features * module.out_features
        )

    handles = [m.register_forward_hook(hook(n)) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        transformer(**inputs, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return flops


def forward_inputs(family: str, config: dict, resolution: int, vae_factor: int, text_tokens: int, text_width: int) -> dict:
    size = resolution // vae_factor
    if family == "flux":
        tokens = (size // 2) ** 2
        return {
            "hidden_states": torch.empty(1, tokens, config["in_channels"]), "encoder_hidden_states": torch.empty(1, text_tokens, text_width),
            "pooled_projections": torch.empty(1, config["pooled_projection_dim"]), "timestep": torch.empty(1), "guidance": torch.empty(1),
            "img_ids": torch.empty(tokens, 3), "txt_ids": torch.empty(text_tokens, 3),
        }  # fmt: skip
    latents = torch.empty(1, config["in_channels"], size, size)
    if family == "sana":
        return {"hidden_states": latents, "encoder_hidden_states": torch.empty(1, text_tokens, text_width), "timestep": torch.empty(1)}
    return {
        "hidden_states": latents, "encoder_hidden_states": torch.empty(1, text_tokens, text_width),
        "pooled_projections": torch.empty(1, config["pooled_projection_dim"]), "timestep": torch.empty(1),
    }  # fmt: skip


def coverage(transformer: torch.nn.Module, family: str, flops: dict[str, int]) -> dict:
    selection = select_layers(transformer, family)
    total = sum(flops.values())
    blocks, adaln, small = PREVIOUS_RULE
    previous = [
        name for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and re.match(blocks, name) and not re.search(adaln, name) and min(module.in_features, module.out_features) > small
    ]  # fmt: skip
    return {
        "skip_modules": list(selection.skip_modules),
        "min_dim": selection.min_dim,
        "linears": len(flops),
        "nvfp4_linears": len(selection.quantized),
        "nvfp4_linear_flop_share": sum(flops[n] for n in selection.quantized) / total,
        "nvfp4_layer_kinds": sorted({re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", n) for n in selection.quantized}),
        "previous_rule_linear_flop_share": sum(flops[n] for n in previous) / total,
        "linear_gflops_per_image_forward": total * 2 / 1e9,
    }


def main() -> None:
    result = {}
    for family, (model, recipe, config, resolution, vae_factor, text_tokens, text_width) in MODELS.items():
        with torch.device("meta"):
            transformer = CLASSES[family](**config)
            flops = linear_flops(transformer, forward_inputs(family, config, resolution, vae_factor, text_tokens, text_width))
        result[family] = {
            "model": model,
            "recipe": recipe,
            "resolution": resolution,
            "text_tokens": text_tokens,
            **coverage(transformer, family, flops),
        }
    tiny = build_transformer().to("meta")
    with torch.device("meta"):
        flops = linear_flops(
            tiny, forward_inputs("sd3", {"in_channels": 3, "pooled_projection_dim": TEXT_DIM}, 32, 1, MAX_TOKENS, TEXT_DIM)
        )
    result["tiny"] = {
        "model": "tiny testbed",
        "recipe": "tiny_solrl",
        "resolution": 32,
        "text_tokens": MAX_TOKENS,
        **coverage(tiny, "tiny", flops),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    for row in result.values():
        print(
            f"{row['model']:>14}: {row['nvfp4_linears']:4d} of {row['linears']:4d} linears in NVFP4, {row['nvfp4_linear_flop_share']:.3f} of the "
            f"linear FLOPs (the previous rule: {row['previous_rule_linear_flop_share']:.3f}); {', '.join(row['nvfp4_layer_kinds'])}"
        )


if __name__ == "__main__":
    main()
