"""FP8 numerics, the scaled-matmul GEMMs' operand layouts and reference formulas, the kernel layers, and what auto picks.

CPU tests pin the numbers and check every kernel call's arguments against torch's own scaled-matmul
checks (on meta tensors); tests marked gpu run the kernels themselves (bench/gpu_check.py runs them).
"""

import logging

import pytest
import torch
from test_quant_explore import CALIBRATION, MIN_DIM, StubPolicy, inputs

from quant import (
    FP8Linear,
    NVFP4KernelLinear,
    NVFP4Linear,
    fp8_fake_quantize,
    kernel_support,
    nvfp4_fake_quantize,
    quantize_policy,
    requantize,
    resolve_explore_path,
)
from quant.fp8 import FP8Codes, fp8_quantize
from quant.kernels import (
    KernelSupport,
    PackedNVFP4,
    dequantize_nvfp4,
    fp8_gemm,
    kernel_shape_problem,
    nvfp4_gemm,
    pack_e2m1,
    pack_nvfp4,
    swizzle_block_scales,
    unpack_e2m1,
    unswizzle_block_scales,
)
from quant.nvfp4 import nvfp4_quantize
from rollout.samplers import sample


def input_amax(explore) -> dict[str, float]:
    return {name: m.input_amax.item() for name, m in explore.transformer.named_modules() if isinstance(m, FP8Linear)}


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# --- FP8 numerics ------------------------------------------------------------------------------------


def test_fp8_rounds_to_nearest_even_e4m3_and_saturates_at_the_amax():
    # amax 448: s = 1. E4M3 spacing is 1/8 on [1, 2): 1.0625 ties to 1.0 (even), 1.1875 to 1.25; 2^-10 is
    # half the smallest subnormal 2^-9 and ties to 0; beyond 448 saturates
    x = torch.tensor([0.0, 1.0625, 1.1875, -3.3, 2.0**-10, 500.0, -1000.0])
    codes = fp8_quantize(x, amax=448.0)
    assert codes.values.dtype == torch.float8_e4m3fn and codes.scale.item() == 1.0
    assert codes.dequantize().tolist() == [0.0, 1.0, 1.25, -3.25, 0.0, 448.0, -448.0]
    # a dynamic amax: s = max|x| / 448 maps the largest value onto 448 exactly
    y = torch.tensor([0.1, -7.0, 3.0])
    dynamic = fp8_quantize(y)
    assert dynamic.scale.item() == pytest.approx(7.0 / 448)
    assert dynamic.values.float().tolist()[1] == -448.0
    assert torch.equal(fp8_fake_quantize(y), (dynamic.values.float() * dynamic.scale).to(y.dtype))


def test_fp8_of_zeros_is_zeros_and_bad_inputs_are_named():
    assert torch.equal(fp8_fake_quantize(torch.zeros(3, 4)), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="fp8_quantize takes torch.float32, torch.bfloat16; got torch.float16"):
        fp8_quantize(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"non-empty tensor, got shape \(0, 3\)"):
        fp8_quantize(torch.zeros(0, 3))


def test_fp8_relative_error_is_bounded_by_half_an_e4m3_step():
    """3 mantissa bits: within the normal range |x_hat - x| <= 2^-4 |x|."""
    x = randn(64, 256, seed=1, dtype=torch.float32)
    x_hat = fp8_fake_quantize(x)
    normal = x.abs() >= x.abs().max() / 448 * 2.0**-6  # E4M3's smallest normal, in x's units
    assert ((x_hat - x).abs()[normal] <= 2.0**-4 * x.abs()[normal]).all()


# --- FP8 GEMM ------------------------------------------------------------------------------------


def test_fp8_reference_gemm_is_the_formula_and_matches_torchs_scaled_mm_on_cpu():
    x, w, bias = fp8_quantize(randn(24, 64, seed=2), amax=3.0), fp8_quantize(randn(48, 64, seed=3)), randn(48, seed=4)
    got = fp8_gemm(x, w, bias, torch.bfloat16, kernel=False)
    exact = (x.values.double() @ w.values.double().T) * (x.scale.double() * w.scale.double()) + bias.double()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=0)  # one bf16 rounding of a sum exact to ~2^-24
    # torch's CPU scaled matmul (oneDNN) computes the same formula
    torch.testing.assert_close(
        got, torch._scaled_mm(x.values, w.values.T, x.scale, w.scale, bias=bias, out_dtype=torch.bfloat16), rtol=2**-8, atol=1e-6
    )


def test_fp8_kernel_arguments_pass_torchs_scaled_mm_checks():
    x, w = fp8_quantize(randn(24, 64)), fp8_quantize(randn(48, 64))
    meta = lambda codes: FP8Codes(codes.values.to("meta"), codes.scale.to("meta"))  # noqa: E731
    y = fp8_gemm(meta(x), meta(w), randn(48).to("meta"), torch.bfloat16, kernel=True)
    assert (y.shape, y.dtype) == ((24, 48), torch.bfloat16)


# --- NVFP4 operands and GEMM ---------------------------------------------------------------------


def test_e2m1_codes_pack_two_per_byte_even_element_low():
    # codes: 0.5 -> 1, -6 -> 8 + 7 = 15, 6 -> 7, -0.5 -> 9, 0 -> 0, 3 -> 5
    values = torch.tensor([[0.5, -6.0, 6.0, -0.5, 0.0, 3.0]])
    packed = pack_e2m1(values)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x97, 0x50]]
    assert torch.equal(unpack_e2m1(packed), values)
    codes = nvfp4_quantize(randn(5, 64, seed=5)).values
    assert torch.equal(unpack_e2m1(pack_e2m1(codes)), codes)


def test_block_scales_are_laid_out_as_cublas_documents_and_read_back():
    """cuBLAS's 1D block-scaling layout: scale (i, j) at 512 (tile_row * column_tiles + tile_col) + 16 (i % 32) + 4 (i % 128 // 32) + j % 4."""
    rows, cols = 200, 6  # two row tiles, two column tiles, both padded
    scales = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(6)) * 100).to(torch.float8_e4m3fn).float()
    swizzled = swizzle_block_scales(scales)
    assert swizzled.dtype == torch.float8_e4m3fn and swizzled.numel() == 256 * 8
    flat, column_tiles = swizzled.float(), 2
    for i in range(rows):
        for j in range(cols):
            offset = 512 * ((i // 128) * column_tiles + j // 4) + 16 * (i % 32) + 4 * (i % 128 // 32) + j % 4
            assert flat[offset] == scales[i, j], (i, j)
    assert flat.count_nonzero() == (scales != 0).sum()  # the padding holds zeros
    assert torch.equal(unswizzle_block_scales(swizzled, rows, cols), scales)


def test_packed_nvfp4_holds_the_emulations_codes():
    x = randn(7, 64, seed=7)
    codes = nvfp4_quantize(x, amax=2.5)
    packed = pack_nvfp4(x, amax=2.5)
    assert packed.data.shape == (7, 32) and (packed.rows, packed.k) == (7, 64)
    scaled = codes.values.unflatten(-1, (-1, 16)) * codes.block_scales.unsqueeze(-1)
    assert torch.equal(dequantize_nvfp4(packed, with_tensor_scale=False), scaled.flatten(-2))
    # fake quantization rounds q * (d s) to bf16; the packed values are q * d * s unrounded
    torch.testing.assert_close(dequantize_nvfp4(packed).bfloat16(), nvfp4_fake_quantize(x, amax=2.5), rtol=2**-8, atol=0)


def test_nvfp4_reference_gemm_is_the_two_level_formula():
    x, w, bias = pack_nvfp4(randn(24, 64, seed=8), amax=3.0), pack_nvfp4(randn(48, 64, seed=9)), randn(48, seed=10)
    got = nvfp4_gemm(x, w, bias, torch.bfloat16, kernel=False)
    qd = lambda p: dequantize_nvfp4(p, with_tensor_scale=False).double()  # noqa: E731
    exact = (qd(x) @ qd(w).T) * (x.tensor_scale.double() * w.tensor_scale.double()) + bias.double()
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=0)
    # and it is the product of the emulation's operands, up to their bf16 rounding
    emulated = torch.nn.functional.linear(
        nvfp4_fake_quantize(randn(24, 64, seed=8), amax=3.0).float(), nvfp4_fake_quantize(randn(48, 64, seed=9)).float(), bias.float()
    )
    assert (got.float() - emulated).abs().max() < 0.02 * emulated.abs().max()


def test_nvfp4_kernel_arguments_pass_torchs_scaled_mm_checks():
    """Packed data, swizzled scales and recipes, as torch.nn.functional.scaled_mm's own shape checks see them."""
    meta = lambda p: PackedNVFP4(p.data.to("meta"), p.block_scales.to("meta"), p.tensor_scale.to("meta"), p.rows, p.k)  # noqa: E731
    for rows in (24, 200):  # one row tile, two
        y = nvfp4_gemm(
            meta(pack_nvfp4(randn(rows, 96))), meta(pack_nvfp4(randn(48, 96))), randn(48).to("meta"), torch.bfloat16, kernel=True
        )
        assert (y.shape, y.dtype) == ((rows, 48), torch.bfloat16)
    short = pack_nvfp4(randn(24, 96))
    broken = PackedNVFP4(short.data, short.block_scales[:-1], short.tensor_scale, 24, 96)
    with pytest.raises(RuntimeError, match="NV scaling scale_a must have"):
        nvfp4_gemm(meta(broken), meta(pack_nvfp4(randn(48, 96))), None, torch.bfloat16, kernel=True)


def test_kernel_shapes_and_devices_are_explained():
    assert kernel_shape_problem("nvfp4", 2240, 4480) is None and kernel_shape_problem("fp8", 16, 32) is None
    assert kernel_shape_problem("nvfp4", 48, 64) == "nvfp4 GEMMs need in_features % 32 == 0 and out_features % 16 == 0, got 48 -> 64"
    support = kernel_support("cpu", "nvfp4")
    assert not support.available and support.reason == "no nvfp4 GEMM on cpu: torch's scaled matmul kernels are CUDA's"
    with pytest.raises(ValueError, match=r"scaled-matmul kernels exist for \('fp8', 'nvfp4'\), not 'int8'"):
        kernel_support("cpu", "int8")


# --- kernel layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_class", [FP8Linear, NVFP4KernelLinear])
def test_kernel_layers_compute_the_reference_formula_with_a_static_amax(layer_class):
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    layer = layer_class.from_linear(linear, kernel=True)  # on CPU the shape allows the kernel; forward must not reach it
    layer.kernel = False
    layer.start_calibration()
    x = randn(3, 5, 64, seed=11)
    calibrating = layer(x)  # the plain linear while calibrating
    layer.finish_calibration()
    assert layer.input_amax == x.float().abs().amax()
    torch.testing.assert_close(calibrating, torch.nn.functional.linear(x, linear.weight, linear.bias))
    y = layer(x)
    expected = torch.nn.functional.linear(
        layer.dequantized_input(x, layer.input_amax).double(), layer.dequantized_weight().double(), linear.bias.double()
    )
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected, rtol=2**-8, atol=1e-6)
    # a static amax: a row's output does not depend on its batch-mates
    torch.testing.assert_close(layer(x[1:2, 2:3]), y[1:2, 2:3], rtol=0, atol=1e-6)


def test_a_shape_the_gemm_cannot_take_runs_the_reference_formula():
    layer = NVFP4KernelLinear.from_linear(torch.nn.Linear(48, 64).to(torch.bfloat16), kernel=True)
    assert not layer.kernel
    assert FP8Linear.from_linear(torch.nn.Linear(48, 64).to(torch.bfloat16), kernel=True).kernel


# --- explore copies ------------------------------------------------------------------------------


def test_fp8_explore_copy_quantizes_the_nvfp4_selection_and_is_closer_to_bf16():
    policy = StubPolicy()
    fp8 = quantize_policy(policy, "fp8", "emulate", min_dim=MIN_DIM, calibration=CALIBRATION)
    nvfp4 = quantize_policy(policy, "nvfp4", "emulate", min_dim=MIN_DIM, calibration=CALIBRATION)
    state = fp8.explore_state
    assert (fp8.precision, state.precision, state.backend) == ("fp8", "fp8", "emulate")
    assert state.selection.quantized == nvfp4.explore_state.selection.quantized and len(state.selection.quantized) == 20
    layers = {name: m for name, m in fp8.transformer.named_modules() if isinstance(m, FP8Linear)}
    assert sorted(layers) == sorted(state.selection.quantized) and not any(m.kernel for m in layers.values())
    x, t, cond = inputs()
    with torch.no_grad():
        bf16 = quantize_policy(policy, "bf16").velocity(x, t, cond).float()
        errors = {
            name: ((copy.velocity(x, t, cond).float() - bf16).norm() / bf16.norm()).item()
            for name, copy in (("fp8", fp8), ("nvfp4", nvfp4))
        }
    assert 0 < errors["fp8"] < 0.1 and errors["fp8"] < errors["nvfp4"] / 2, errors


def test_fp8_explore_images_do_not_depend_on_the_batch_and_requantize_refreshes_codes_and_amax():
    policy = StubPolicy()
    explore = quantize_policy(policy, "fp8", "emulate", min_dim=MIN_DIM, calibration=CALIBRATION)
    batch = sample(explore, ["a red circle", "two blue squares", "a red circle"], [3, 4, 5], 3)
    alone = sample(explore, ["two blue squares"], [4], 3)
    torch.testing.assert_close(alone.x0[0], batch.x0[1], rtol=0, atol=1e-5)

    name = "transformer_blocks.0.ff.net.2"
    amax_before = input_amax(explore)
    doubled = {f"{name}.weight": 2 * policy.transformer.get_submodule(name).weight}
    requantize(explore, doubled, version=1)
    layer = explore.transformer.get_submodule(name)
    new = fp8_quantize(doubled[f"{name}.weight"].bfloat16())
    assert torch.equal(layer.weight_codes.float(), new.values.float()) and layer.weight_scale == new.scale
    # recalibrated: the amax a fresh copy of the new weights calibrates, which moved downstream of the layer
    changed = StubPolicy()
    changed.transformer.get_submodule(name).weight.data.mul_(2)
    fresh = input_amax(quantize_policy(changed, "fp8", "emulate", min_dim=MIN_DIM, calibration=CALIBRATION))
    assert input_amax(explore) == fresh and fresh != amax_before
    assert explore.explore_state.version == 1


def test_scaled_mm_copy_on_cpu_runs_the_reference_formula_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="quant.explore"):
        explore = quantize_policy(StubPolicy(), "nvfp4", "scaled_mm", min_dim=MIN_DIM, calibration=CALIBRATION)
    state = explore.explore_state
    assert state.backend == "scaled_mm" and state.reason.startswith("reference formula of the GEMM (no nvfp4 GEMM on cpu")
    assert "computes the GEMM's reference formula" in caplog.text
    layers = [m for m in explore.transformer.modules() if isinstance(m, NVFP4KernelLinear)]
    assert len(layers) == 20 and not any(isinstance(m, NVFP4Linear) or m.kernel for m in layers)
    assert state.to_dict()["reason"] == state.reason


# --- what auto picks -----------------------------------------------------------------------------


def fake_hardware(monkeypatch, kernels: set[str], modelopt: bool) -> None:
    """Pretend the device has the given scaled-matmul GEMMs and (not) modelopt."""
    monkeypatch.setattr(
        "quant.explore.kernel_support",
        lambda device, precision: KernelSupport(precision in kernels, f"{precision} GEMM {'found' if precision in kernels else 'missing'}"),
    )
    monkeypatch.setattr("quant.explore.modelopt_unavailable", lambda device: None if modelopt else "nvidia-modelopt is not installed")


@pytest.mark.parametrize(
    ("kernels", "modelopt", "precision", "allow_fp8", "expected"),
    [
        ({"nvfp4", "fp8"}, True, "nvfp4", True, ("nvfp4", "scaled_mm", "nvfp4 GEMM found")),  # Blackwell
        (
            {"fp8"},
            True,
            "nvfp4",
            True,
            ("fp8", "scaled_mm", "nvfp4 GEMM missing; sol.allow_fp8: fp8 in place of nvfp4; fp8 GEMM found"),
        ),  # Hopper
        ({"fp8"}, True, "nvfp4", False, ("nvfp4", "modelopt", "nvfp4 GEMM missing; modelopt fake quantization")),
        (
            set(),
            False,
            "nvfp4",
            True,
            (
                "nvfp4",
                "emulate",
                "nvfp4 GEMM missing; fp8 GEMM missing; no modelopt: nvidia-modelopt is not installed; emulation in pure torch",
            ),
        ),
        ({"fp8"}, True, "fp8", False, ("fp8", "scaled_mm", "fp8 GEMM found")),
        (set(), True, "fp8", False, ("fp8", "emulate", "fp8 GEMM missing; emulation in pure torch")),
    ],
)
def test_auto_picks_nvfp4_gemms_then_fp8_gemms_then_fake_quant_then_emulation(
    monkeypatch, caplog, kernels, modelopt, precision, allow_fp8, expected
):
    fake_hardware(monkeypatch, kernels, modelopt)
    with caplog.at_level(logging.INFO, logger="quant.explore"):
        assert resolve_explore_path(precision, "auto", "cuda", allow_fp8) == expected
    assert f"{expected[0]} explore: auto -> {expected[1]} on cuda ({expected[2]})" in caplog.text


def test_named_backends_are_checked():
    with pytest.raises(ValueError, match="backend 'modelopt' quantizes to nvfp4 only, not 'fp8'"):
        resolve_explore_path("fp8", "modelopt", "cpu")
    with pytest.raises(ValueError, match=r"explore paths exist for \('nvfp4', 'fp8'\), not 'bf16'"):
        resolve_explore_path("bf16", "auto", "cpu")
    assert resolve_explore_path("fp8", "emulate", "cpu") == ("fp8", "emulate", "emulation in pure torch")


# --- on a GPU ------------------------------------------------------------------------------------


def cuda_support(precision: str) -> KernelSupport:
    support = kernel_support("cuda", precision)
    if not support.available:
        pytest.skip(support.reason)
    return support


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_gpu_kernel_equals_its_reference_formula(precision):
    cuda_support(precision)
    layer_class = FP8Linear if precision == "fp8" else NVFP4KernelLinear
    linear = torch.nn.Linear(256, 384).to("cuda", torch.bfloat16)
    layer = layer_class.from_linear(linear, kernel=True)
    layer.input_amax.fill_(3.0)
    layer.finish_calibration()
    x = randn(4, 77, 256, seed=12, device="cuda")
    with torch.no_grad():
        got = layer(x)
        layer.kernel = False
        want = layer(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)  # fp32 summation order, then one bf16 rounding


@pytest.mark.gpu
def test_gpu_auto_explore_copy_runs_on_the_picked_path():
    policy = StubPolicy()
    policy.transformer.to("cuda")
    explore = quantize_policy(policy, "nvfp4", "auto", min_dim=MIN_DIM, calibration=CALIBRATION, allow_fp8=True)
    x, t, cond = inputs()
    with torch.no_grad():
        v = explore.velocity(x.cuda(), t.cuda(), cond.to("cuda"))
    assert torch.isfinite(v).all()
    layers = [m for m in explore.transformer.modules() if isinstance(m, (FP8Linear, NVFP4KernelLinear))]
    assert all(m.kernel for m in layers) == (explore.explore_state.backend == "scaled_mm")


def test_nvfp4_kernel_layer_reference_takes_a_width_that_is_not_whole_blocks():
    """40 inputs: 2.5 blocks of 16, padded like quant.nvfp4; the reference formula equals fake quantization."""
    linear = torch.nn.Linear(40, 16)
    layer = NVFP4KernelLinear.from_linear(linear)
    layer.input_amax.fill_(3.0)
    layer.calibrated = True
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = torch.nn.functional.linear(
            nvfp4_fake_quantize(x, amax=torch.tensor(3.0)), nvfp4_fake_quantize(linear.weight.detach()), linear.bias
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
