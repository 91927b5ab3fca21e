"""Layer selection and its report, on tiny random diffusers transformers of each family and on the tiny testbed."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

from quant.selection import MIN_FEATURES, select_layers

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
    selection = select_layers(tiny_sd3(), "sd3", min_features=16)

    expected = in_block("transformer_blocks.0", (*ATTN, *ADDED_ATTN, "attn.to_add_out", *FF, *FF_CONTEXT))
    expected += in_block("transformer_blocks.1", (*ATTN, *ADDED_ATTN, *FF))
    assert sorted(selection.quantized) == sorted(expected)
    assert selection.kept == {
        "time_text_embed.timestep_embedder.linear_1": "outside_blocks",
        "time_text_embed.timestep_embedder.linear_2": "outside_blocks",
        "time_text_embed.text_embedder.linear_1": "outside_blocks",
        "time_text_embed.text_embedder.linear_2": "outside_blocks",
        "context_embedder": "outside_blocks",
        "transformer_blocks.0.norm1.linear": "keep_pattern:norm",
        "transformer_blocks.0.norm1_context.linear": "keep_pattern:norm",
        "transformer_blocks.1.norm1.linear": "keep_pattern:norm",
        "transformer_blocks.1.norm1_context.linear": "keep_pattern:norm",
        "norm_out.linear": "outside_blocks",
        "proj_out": "outside_blocks",
    }
    # block 0: 8 attention 32x32 + ff 2x(32x128) + ff_context 2x(32x128); block 1: 7 attention + ff
    assert selection.quantized_params == (8 * 1024 + 2 * 8192) + (7 * 1024 + 8192) == 39936
    assert selection.kept_params == selection.total_params - 39936
    assert selection.quantized_fraction == pytest.approx(39936 / selection.total_params)


def test_flux_report_quantizes_single_block_proj_out_but_not_the_final_one():
    selection = select_layers(tiny_flux(), "flux", min_features=16)

    expected = in_block("transformer_blocks.0", (*ATTN, *ADDED_ATTN, "attn.to_add_out", *FF, *FF_CONTEXT))
    expected += in_block("single_transformer_blocks.0", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"))
    assert sorted(selection.quantized) == sorted(expected)
    assert selection.kept["proj_out"] == "outside_blocks"
    assert selection.kept["x_embedder"] == "outside_blocks"
    assert selection.kept["single_transformer_blocks.0.norm.linear"] == "keep_pattern:norm"
    assert selection.kept["transformer_blocks.0.norm1_context.linear"] == "keep_pattern:norm"
    # double block: 8 attention 32x32 + 4 ff 32x128; single block: 3 attention, proj_mlp 32x128, proj_out 160x32
    assert selection.quantized_params == (8 * 1024 + 4 * 4096) + (3 * 1024 + 4096 + 5120) == 36864


def test_sana_report_keeps_convolutions_and_embedders():
    transformer = tiny_sana()
    selection = select_layers(transformer, "sana", min_features=4)

    expected = in_block("transformer_blocks.0", tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")))
    assert sorted(selection.quantized) == sorted(expected)
    assert set(selection.kept) == {
        "time_embed.emb.timestep_embedder.linear_1",
        "time_embed.emb.timestep_embedder.linear_2",
        "time_embed.linear",
        "caption_projection.linear_1",
        "caption_projection.linear_2",
        "proj_out",
    }
    assert selection.quantized_params == 8 * 64
    conv_params = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv_params > 0 and selection.kept_params >= conv_params


def test_size_threshold_is_at_or_below():
    transformer = tiny_sd3()  # every block linear has a side of 32
    at = select_layers(transformer, "sd3", min_features=32)
    below = select_layers(transformer, "sd3", min_features=31)
    assert at.quantized == [] and at.kept["transformer_blocks.0.attn.to_q"] == "small"
    assert "transformer_blocks.0.attn.to_q" in below.quantized
    assert select_layers(transformer, "sd3").min_features == MIN_FEATURES == 64


def test_keep_patterns_replace_the_family_defaults():
    selection = select_layers(tiny_sd3(), "sd3", min_features=16, keep_patterns=("to_q$",))
    assert selection.kept["transformer_blocks.1.attn.to_q"] == "keep_pattern:to_q$"
    assert "transformer_blocks.1.attn.add_q_proj" in selection.quantized
    assert "transformer_blocks.0.norm1.linear" in selection.quantized  # "norm" is no longer kept


def test_unknown_family_needs_keep_patterns():
    with pytest.raises(ValueError, match="no default keep patterns for family 'wan'"):
        select_layers(tiny_sd3(), "wan")
    assert select_layers(tiny_sd3(), "wan", min_features=16, keep_patterns=()).quantized


def test_report_to_dict_is_loggable():
    selection = select_layers(tiny_sd3(), "sd3", min_features=16)
    report = json.loads(json.dumps(selection.to_dict()))
    assert report["num_quantized_layers"] == 21
    assert report["num_kept_linears"] == 11
    assert report["quantized_params"] + report["kept_params"] == selection.total_params
    assert report["quantized_fraction"] == pytest.approx(selection.quantized_fraction)
    assert report["keep_patterns"] == ["pos_embed", "time_text_embed", "context_embedder", "norm", "^proj_out$"]


def test_tiny_testbed_architecture_report():
    """The tiny policy's transformer (hidden 128, 4 blocks, the last context_pre_only) with its own keep patterns."""
    from rollout.tiny.model import TinyPolicy, build_transformer

    selection = select_layers(build_transformer(), "tiny", keep_patterns=TinyPolicy.quant_keep_patterns)
    assert len(selection.quantized) == 3 * 12 + 9
    assert all(name.startswith("transformer_blocks.") for name in selection.quantized)
    full_block, last_block = 8 * 128**2 + 4 * 128 * 512, 7 * 128**2 + 2 * 128 * 512
    assert selection.quantized_params == 3 * full_block + last_block
    assert set(selection.kept.values()) == {"outside_blocks", "keep_pattern:norm"}


def test_tiny_policy_report(tiny_policy):
    policy = tiny_policy
    selection = select_layers(policy.transformer, policy.family, keep_patterns=policy.quant_keep_patterns)
    assert policy.family == "tiny"
    assert len(selection.quantized) == 3 * 12 + 9
    assert 0.5 < selection.quantized_fraction < 0.7
