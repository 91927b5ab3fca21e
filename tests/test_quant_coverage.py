"""Layer selection and its report, on tiny random diffusers transformers of each family and on the tiny testbed."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

from quant.coverage import select_layers

ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
ADDED_ATTN = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
FF = ("ff.net.0.proj", "ff.net.2")
FF_CONTEXT = ("ff_context.net.0.proj", "ff_context.net.2")


def tiny_sd3() -> SD3Transformer2DModel:
    # hidden 4 heads x 8 = 32; the last block is context_pre_only (no to_add_out, no ff_context)
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    )  # fmt: skip


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip


def tiny_sana() -> SanaTransformer2DModel:
    torch.manual_seed(0)
    return SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=8,
    )  # fmt: skip


def in_block(block: str, names: tuple[str, ...]) -> list[str]:
    return [f"{block}.{n}" for n in names]


def test_sd3_report():
    selection = select_layers(tiny_sd3(), "sd3", min_dim=16)

    expected = in_block("transformer_blocks.0", (*ATTN, *ADDED_ATTN, "attn.to_add_out", *FF))
    expected += in_block("transformer_blocks.1", (*ATTN, *ADDED_ATTN, *FF)) + ["proj_out"]
    assert sorted(selection.quantized) == sorted(expected)
    assert selection.kept == {
        "time_text_embed.timestep_embedder.linear_1": "skip:time_text_embed",
        "time_text_embed.timestep_embedder.linear_2": "skip:time_text_embed",
        "time_text_embed.text_embedder.linear_1": "skip:time_text_embed",
        "time_text_embed.text_embedder.linear_2": "skip:time_text_embed",
        "context_embedder": "skip:context_embedder",
        "transformer_blocks.0.norm1.linear": "skip:norm1",
        "transformer_blocks.0.norm1_context.linear": "skip:norm1",  # a substring match, as in Sol-RL
        "transformer_blocks.0.ff_context.net.0.proj": "skip:ff_context",
        "transformer_blocks.0.ff_context.net.2": "skip:ff_context",
        "transformer_blocks.1.norm1.linear": "skip:norm1",
        "transformer_blocks.1.norm1_context.linear": "skip:norm1",
        "norm_out.linear": "skip:norm_out",
    }
    # block 0: 8 attention 32x32 + ff 2x(32x128); block 1: 7 attention + ff; proj_out 32x4
    assert selection.quantized_params == (8 * 1024 + 8192) + (7 * 1024 + 8192) + 128 == 31872
    assert selection.kept_params == selection.total_params - 31872
    assert selection.quantized_fraction == pytest.approx(31872 / selection.total_params)


# Sol-RL's coverage on the real widths (configs/sol_rl/{sd3,flux1,sana}.py; train_utils.py keeps a
# linear when a skip name is in its name or max(in, out) <= min_dim), built on the meta device.
def real_width(family: str):
    with torch.device("meta"):
        if family == "sd3":  # SD3.5-Large: 38 heads x 64 = 2432
            return SD3Transformer2DModel(
                sample_size=128,
                patch_size=2,
                in_channels=16,
                num_layers=2,
                attention_head_dim=64,
                num_attention_heads=38,
                joint_attention_dim=4096,
                caption_projection_dim=2432,
                pooled_projection_dim=2048,
                out_channels=16,
                pos_embed_max_size=192,
            )
        if family == "flux":  # FLUX.1-dev: 24 heads x 128 = 3072
            return FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=128,
                num_attention_heads=24,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            )
        return SanaTransformer2DModel(  # SANA 1600M: 70 heads x 32 = 2240
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=1, num_cross_attention_heads=20,
            cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
        )  # fmt: skip


def test_sol_rl_leaves_only_the_image_feed_forward_of_sd35_large_in_nvfp4():
    selection = select_layers(real_width("sd3"), "sd3")
    assert selection.quantized == in_block("transformer_blocks.0", FF) + in_block("transformer_blocks.1", FF)
    assert selection.kept["transformer_blocks.0.attn.to_q"] == "small"  # 2432 x 2432: max(in, out) <= min_dim 2432
    assert selection.kept["proj_out"] == "small"


def test_sol_rl_quantizes_every_flux_linear_but_the_embedders_and_the_final_norm():
    selection = select_layers(real_width("flux"), "flux")
    assert set(selection.kept.values()) == {"skip:time_text_embed", "skip:context_embedder", "skip:x_embedder", "skip:norm_out"}
    assert {
        "transformer_blocks.0.norm1.linear",
        "single_transformer_blocks.0.norm.linear",
        "single_transformer_blocks.0.proj_out",
        "proj_out",
    } <= set(selection.quantized)
    assert len(selection.quantized) == 21


def test_sol_rl_quantizes_only_the_cross_attention_kv_of_sana():
    # SANA's code has one kv_linear (2240 -> 4480): diffusers' to_k and to_v count as that one linear.
    selection = select_layers(real_width("sana"), "sana")
    assert selection.quantized == ["transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v"]
    assert selection.kept["transformer_blocks.0.attn1.to_q"] == r"skip:attn1\.to_[qkv]$"  # SANA's fused attn.qkv
    assert {selection.kept[f"transformer_blocks.0.{name}"] for name in ("attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")} == {"small"}
    conv_params = sum(m.weight.numel() for m in real_width("sana").modules() if isinstance(m, torch.nn.Conv2d))
    assert conv_params > 0  # the GLUMBConv feed-forward: convolutions, never quantized


def test_min_dim_compares_the_larger_side_at_or_below():
    transformer = tiny_sd3()  # attention 32 x 32, ff 32 x 128
    at = select_layers(transformer, "sd3", min_dim=32)
    assert at.kept["transformer_blocks.0.attn.to_q"] == "small" and "transformer_blocks.0.ff.net.0.proj" in at.quantized
    assert "transformer_blocks.0.attn.to_q" in select_layers(transformer, "sd3", min_dim=31).quantized
    assert select_layers(transformer, "sd3", min_dim=128).quantized == []
    assert select_layers(transformer, "sd3").min_dim == 2432


def test_skip_modules_replace_the_familys_and_keep_patterns_add_to_them():
    selection = select_layers(tiny_sd3(), "sd3", skip_modules=("to_q$",), min_dim=16, keep_patterns=("add_q_proj",))
    assert selection.kept["transformer_blocks.1.attn.to_q"] == "skip:to_q$"
    assert selection.kept["transformer_blocks.1.attn.add_q_proj"] == "keep:add_q_proj"
    assert "transformer_blocks.0.norm1.linear" in selection.quantized  # "norm1" is no longer skipped


def test_unknown_family_needs_a_rule():
    with pytest.raises(ValueError, match="no NVFP4 rule for family 'wan'"):
        select_layers(tiny_sd3(), "wan")
    assert select_layers(tiny_sd3(), "wan", skip_modules=(), min_dim=16).quantized


def test_report_to_dict_is_loggable():
    selection = select_layers(tiny_sd3(), "sd3", min_dim=16)
    report = json.loads(json.dumps(selection.to_dict()))
    assert report["num_quantized_layers"] == 20
    assert report["num_kept_linears"] == 12
    assert report["quantized_params"] + report["kept_params"] == selection.total_params
    assert report["quantized_fraction"] == pytest.approx(selection.quantized_fraction)
    assert report["skip_modules"] == ["pos_embed", "context_embedder", "time_text_embed", "norm_out", "norm1", "ff_context"]
    assert report["min_dim"] == 16 and report["keep_patterns"] == []


def test_tiny_testbed_takes_the_sd3_rule_scaled_to_its_width(tiny_policy):
    """The tiny transformer (hidden 128, 4 blocks, the last context_pre_only): min_dim 128 as 2432 is SD3.5-L's width."""
    selection = select_layers(tiny_policy.transformer, tiny_policy.family)
    assert selection.quantized == [f"transformer_blocks.{i}.{name}" for i in range(4) for name in FF]
    assert selection.quantized_params == 4 * 2 * 128 * 512
    assert selection.min_dim == 128
