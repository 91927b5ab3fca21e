"""NVFP4 numerics: bit-exact agreement with nvidia-modelopt's NVFP4QTensor (the oracle), on CPU."""

import pytest
import torch
import torch.nn.functional as F

from quant.layers import NVFP4Linear
from quant.nvfp4 import E4M3_MAX, nvfp4_fake_quantize, round_to_e2m1

NVFP4QTensor = pytest.importorskip("modelopt.torch.quantization.qtensor").NVFP4QTensor

DTYPES = (torch.float32, torch.bfloat16)
SEEDS = range(25)


def modelopt_fake_quantize(x: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """NVFP4QTensor quantize -> dequantize. Its dequantize cannot reshape padded data back to a last dim
    that is not a multiple of the block, so the oracle pads with zeros first (as its quantize does) and slices."""
    length = x.shape[-1]
    padded = F.pad(x, (0, -length % block_size))
    packed, block_scale, tensor_scale = NVFP4QTensor.quantize(padded.clone(), block_size)
    x_hat = packed.dequantize(dtype=x.dtype, scale=block_scale, double_scale=tensor_scale, block_sizes={-1: block_size})
    return x_hat[..., :length]


def assert_bitwise_equal(ours: torch.Tensor, oracle: torch.Tensor, case: str) -> None:
    assert ours.dtype == oracle.dtype and ours.shape == oracle.shape, case
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[ours.dtype]
    differ = ours.view(bits) != oracle.view(bits)
    assert not differ.any(), f"{case}: {int(differ.sum())} values differ, e.g. ours {ours[differ][:4]} vs modelopt {oracle[differ][:4]}"


def check_against_modelopt(x: torch.Tensor, case: str) -> None:
    assert_bitwise_equal(nvfp4_fake_quantize(x), modelopt_fake_quantize(x), case)


# --- random tensors ------------------------------------------------------------------------------

RANDOM = {
    "normal": lambda g, shape: torch.randn(shape, generator=g),
    # rows whose scales differ by orders of magnitude: block scales span E4M3's range
    "row_scaled": lambda g, shape: torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(*shape[:-1], 1, generator=g)),
    "heavy_tailed": lambda g, shape: torch.randn(shape, generator=g) ** 5,
    "uniform_small": lambda g, shape: torch.rand(shape, generator=g) * 1e-3,
    "uniform_large": lambda g, shape: (torch.rand(shape, generator=g) - 0.5) * 1e4,
}
SHAPES = ((8, 64), (3, 5, 32), (128,), (4, 20))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", RANDOM)
def test_random_tensors_match_modelopt(distribution, dtype):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        for shape in SHAPES:
            x = RANDOM[distribution](g, shape).to(dtype)
            check_against_modelopt(x, f"{distribution} seed={seed} shape={shape} {dtype}")


# --- adversarial tensors -------------------------------------------------------------------------

# Tensor amax 2688 = 6 * 448 makes the tensor scale exactly 1, so a block whose amax is 6 * 2^e has
# the exact block scale 2^e and scaled values land exactly on E2M1 rounding ties (x.25, x.75, ...).
E2M1_TIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _tie_block(block_scale: float, offset: float = 0.0) -> torch.Tensor:
    values = torch.cat([E2M1_TIES, -E2M1_TIES, torch.tensor([6.0, -6.0])]) + offset
    return values * block_scale


def _adversarial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4, 64, generator=g)
    outlier = normal.clone()
    outlier[1, 3] = 1e4
    zero_block = normal.clone()
    zero_block[2, 16:32] = 0
    wide_range = normal.clone()
    wide_range[0, :16] *= 1e-9  # block scale far below E4M3's 2^-9 floor: clamped
    one_e = torch.full((16,), 1.0)
    return {
        "ties_exact": torch.stack([_tie_block(E4M3_MAX), _tie_block(64.0), _tie_block(0.5), _tie_block(2.0**-6)]),
        "ties_nudged_up": torch.stack([_tie_block(E4M3_MAX, 1e-3), _tie_block(64.0, 1e-3)]),
        "ties_nudged_down": torch.stack([_tie_block(E4M3_MAX, -1e-3), _tie_block(64.0, -1e-3)]),
        "all_equal_positive": torch.full((3, 32), 3.7),
        "all_equal_negative": torch.full((2, 16), -0.3),
        "equal_within_blocks": torch.cat([one_e * 5.0, one_e * 0.01, -one_e * 7.0, one_e * 1e-6]).reshape(2, 32),
        "single_outlier": outlier,
        "outlier_in_1d": torch.cat([torch.randn(47, generator=g), torch.tensor([-3e5])]),
        "zero_block": zero_block,
        "block_below_e4m3_range": wide_range,
        "mostly_zeros": torch.zeros(2, 32).index_put_((torch.tensor([1]), torch.tensor([5])), torch.tensor([0.7])),
        "negative_zero": torch.tensor([[-0.0] * 8 + [1.0] * 8]),
        "small_negatives_round_to_zero": torch.tensor([[-0.01, -0.02, 0.01] + [6.0] * 13]),
        "tiny_magnitudes": torch.randn(2, 32, generator=g) * 1e-30,
        "subnormal_magnitudes": torch.randn(2, 32, generator=g) * 1e-40,
        "huge_magnitudes": torch.randn(2, 32, generator=g) * 1e37,
        "last_dim_1": torch.randn(5, 1, generator=g),
        "last_dim_17": torch.randn(3, 17, generator=g),
        "last_dim_33_one_outlier": torch.cat([torch.randn(2, 32, generator=g), torch.tensor([[50.0], [-0.1]])], dim=1),
    }


ADVERSARIAL = _adversarial()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_tensors_match_modelopt(case, dtype):
    check_against_modelopt(ADVERSARIAL[case].to(dtype), f"{case} {dtype}")


def test_all_zero_tensor_gives_zeros_where_modelopt_gives_nan():
    """The one documented divergence: modelopt divides 0 by a zero tensor scale."""
    x = torch.zeros(2, 32)
    assert modelopt_fake_quantize(x).isnan().all()
    assert_bitwise_equal(nvfp4_fake_quantize(x), torch.zeros(2, 32), "all-zero tensor")


# --- properties that the oracle comparison does not spell out ------------------------------------


def test_e2m1_rounding_is_nearest_even_and_saturates():
    v = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.0, 1e9, -0.25, -0.3, -2.9, -100.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, 0.0, -0.5, -3.0, -6.0])
    assert torch.equal(round_to_e2m1(v), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_returns_input_dtype_and_shape_and_is_idempotent(dtype):
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    once = nvfp4_fake_quantize(x)
    assert once.dtype == dtype and once.shape == x.shape
    assert torch.equal(nvfp4_fake_quantize(once), once)


def test_padding_is_zeros_to_a_full_block():
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(2))
    padded = F.pad(x, (0, 12))
    assert torch.equal(nvfp4_fake_quantize(x), nvfp4_fake_quantize(padded)[:, :20])


def test_each_block_has_at_most_eight_magnitudes():
    """A block holds E2M1 values times one scale: at most 8 distinct magnitudes."""
    x = nvfp4_fake_quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(3)))
    for block in x.abs().reshape(-1, 16):
        assert block.unique().numel() <= 8


def test_rejects_unsupported_input():
    with pytest.raises(TypeError, match="float64"):
        nvfp4_fake_quantize(torch.ones(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dim"):
        nvfp4_fake_quantize(torch.tensor(1.0))


# --- static (calibrated) per-tensor amax ----------------------------------------------------------


def modelopt_fake_quantize_static(x: torch.Tensor, amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """NVFP4QTensor with a given per-tensor scale amax / (6 * 448), as modelopt uses a calibrated amax."""
    tensor_scale = amax.float() / (6.0 * E4M3_MAX)
    packed, block_scale, tensor_scale = NVFP4QTensor.quantize(x.clone(), block_size, weights_scaling_factor_2=tensor_scale)
    return packed.dequantize(dtype=x.dtype, scale=block_scale, double_scale=tensor_scale, block_sizes={-1: block_size})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amax_factor", (0.1, 0.7, 1.0, 3.0, 1e4))
def test_static_amax_matches_modelopt_and_saturates_beyond_it(amax_factor, dtype):
    """amax below max|x| clips (block scale at 448, codes at 6); above it only coarsens the block scales."""
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        for distribution in ("normal", "row_scaled", "heavy_tailed"):
            x = RANDOM[distribution](g, (8, 64)).to(dtype)
            amax = (x.float().abs().amax() * amax_factor).to(dtype).float()
            ours = nvfp4_fake_quantize(x, amax=amax)
            assert_bitwise_equal(ours, modelopt_fake_quantize_static(x, amax), f"{distribution} seed={seed} amax x{amax_factor} {dtype}")
            assert ours.float().abs().max() <= amax * (1 + 2**-20)  # 6 * (448 * s) may round 1 ulp above amax


def test_static_amax_equal_to_max_is_the_dynamic_result():
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(7))
    assert torch.equal(nvfp4_fake_quantize(x, amax=x.abs().amax()), nvfp4_fake_quantize(x))


def test_static_amax_quantizes_each_row_on_its_own():
    """The property the explore sampler needs: a row's result does not depend on the other rows."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 64, generator=g) * torch.logspace(-2, 2, 16).unsqueeze(-1)
    amax = torch.tensor(30.0)
    whole = nvfp4_fake_quantize(x, amax=amax)
    assert all(torch.equal(nvfp4_fake_quantize(x[i : i + 1], amax=amax), whole[i : i + 1]) for i in range(16))
    assert not torch.equal(nvfp4_fake_quantize(x[:1]), nvfp4_fake_quantize(x)[:1])  # a per-batch amax would not


# --- the W4A4 layer ------------------------------------------------------------------------------


def calibrated_layer(linear: torch.nn.Linear, *inputs: torch.Tensor) -> NVFP4Linear:
    layer = NVFP4Linear.from_linear(linear)
    layer.start_calibration()
    for x in inputs:
        layer(x)
    layer.finish_calibration()
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", (64, 40))
def test_nvfp4_linear_is_w4a4_with_modelopt_numerics(dtype, in_features):
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(in_features, 24).to(dtype)
    torch.nn.init.normal_(linear.weight, generator=g)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    x = torch.randn(2, 5, in_features, generator=g).to(dtype)
    calibration_input = x * 0.8  # calibrated on smaller inputs: the largest values saturate
    amax = calibration_input.float().abs().amax()

    layer = calibrated_layer(linear, calibration_input)

    assert torch.equal(layer.weight.detach(), weight)  # the high-precision weight stays, as in modelopt
    assert_bitwise_equal(layer.weight_fq, modelopt_fake_quantize(weight), "cached weight")
    assert layer.input_amax == amax
    x_fq = modelopt_fake_quantize_static(F.pad(x, (0, -in_features % 16)), amax)[..., :in_features]
    # the dequantized operands are exact in fp32; on CPU the GEMM accumulates there and rounds once
    expected = F.linear(x_fq.float(), modelopt_fake_quantize(weight).float(), bias.float()).to(dtype)
    assert_bitwise_equal(layer(x).detach(), expected, "forward")


def test_nvfp4_linear_calibration_is_the_plain_linear_and_keeps_the_max():
    g = torch.Generator().manual_seed(6)
    linear = torch.nn.Linear(32, 8)
    x1, x2 = torch.randn(3, 32, generator=g), 4 * torch.randn(2, 32, generator=g)
    expected = linear(x1)
    layer = NVFP4Linear.from_linear(linear)
    with pytest.raises(RuntimeError, match="no calibrated input amax"):
        layer(x1)
    layer.start_calibration()
    assert torch.equal(layer(x1), expected)  # modelopt's max calibration runs with its quantizers off
    layer(x2)
    layer.finish_calibration()
    assert layer.input_amax == torch.cat([x1, x2]).abs().amax()
    assert not torch.equal(layer(x1), expected)


def test_nvfp4_linear_set_weight_requantizes_and_checks_shape():
    layer = NVFP4Linear.from_linear(torch.nn.Linear(32, 8))
    new = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    layer.set_weight(new)
    assert torch.equal(layer.weight.detach(), new)
    assert torch.equal(layer.weight_fq, modelopt_fake_quantize(new))
    assert "weight_fq" not in layer.state_dict() and "input_amax" in layer.state_dict()
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight(torch.randn(32, 8))
