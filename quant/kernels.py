"""Real low-precision GEMMs through torch's scaled matmul, and the reference formula each one computes.

Why torch's scaled matmul (torch._scaled_mm, torch.nn.functional.scaled_mm), not Transformer Engine or
torchao: it ships with torch, so nothing is built, installed or carried to a GPU machine (TE is a CUDA
build of hundreds of MB); it calls the cuBLASLt FP8 and block-scaled FP4 GEMMs that TE calls; and the
quantization around it stays solray's own (quant.nvfp4, quant.fp8), so the kernel multiplies exactly the
codes the emulation computes. torchao's NVFP4Tensor wraps the same call but applies the per-tensor
scale after the bf16 output is rounded, a second rounding the two-level call below avoids.

GEMMs (y [M, N] = x [M, K] W^T + b, rounded once to the output dtype; notation of quant.nvfp4 / quant.fp8)
  fp8    torch._scaled_mm(q_x, q_W^T, s_x, s_W, bias): tensorwise scales, compute capability >= 8.9
         y = (sum_k q_x q_W) s_x s_W + b
  nvfp4  torch.nn.functional.scaled_mm(q_x, q_W^T, [d_x, s_x], [d_W, s_W]) with BlockWise1x16 +
         TensorWise scaling and SWIZZLE_32_4_4 block scales: compute capability 10.x or 12.x
         y = (sum_k q_x d_x q_W d_W) s_x s_W + b
Every product is exact in fp32 (E4M3 x E4M3 values have at most 8 significant bits, E2M1 x E4M3 x E2M1 x
E4M3 at most 12), so the reference path (kernel=False), which evaluates the formula with an fp32 GEMM
on any device, equals the kernel up to the order of the fp32 summation.

Operand layouts (torch's scaled-matmul checks; cuBLAS, "1D Block Scaling Factors Layout")
  q_x is row-major [M, K]; q_W^T is column-major [K, N], i.e. W's codes [N, K] row-major, transposed.
  fp8: K and N multiples of 16. nvfp4: two E2M1 codes per byte, the even element in the low nibble
  (torch.float4_e2m1fn_x2), so K is a multiple of 32; block scales d [rows, K / 16] in E4M3, padded
  with zeros to whole 128 x 4 tiles, each tile stored as [32][4][4] with element (r, c) at
  (r % 32, r // 32, c) (`swizzle_block_scales`); s is an fp32 scalar.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quant.fp8 import FP8Codes, fp8_quantize
from quant.nvfp4 import NVFP4_BLOCK_SIZE, nvfp4_quantize

logger = logging.getLogger(__name__)

KERNEL_PRECISIONS = ("fp8", "nvfp4")
FP8_MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
NVFP4_CAPABILITY_MAJORS = (10, 12)  # Blackwell: B200/B300 (10.x), RTX PRO / RTX 50 (12.x)
K_MULTIPLE = {"fp8": 16, "nvfp4": 32}
N_MULTIPLE = 16
SCALE_TILE_ROWS, SCALE_TILE_COLS = 128, 4
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7; bit 3 is the sign


# --- NVFP4 operands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedNVFP4:
    """A 2-D tensor [rows, K] in NVFP4 as the FP4 GEMM reads it."""

    data: torch.Tensor  # uint8 [rows, K / 2]: two E2M1 codes per byte, viewed as torch.float4_e2m1fn_x2 for the GEMM
    block_scales: torch.Tensor  # torch.float8_e4m3fn, flat, swizzled (module docstring)
    tensor_scale: torch.Tensor  # fp32 scalar
    rows: int
    k: int


def pack_nvfp4(x: torch.Tensor, amax: torch.Tensor | float | None = None) -> PackedNVFP4:
    """Quantize a 2-D x [rows, K] (K a multiple of 32) to NVFP4 (quant.nvfp4) and lay it out for the GEMM."""
    rows, k = x.shape
    data, block_scales, tensor_scale = _nvfp4_operand(x, amax)
    return PackedNVFP4(data, block_scales, tensor_scale, rows, k)


def _nvfp4_operand(x: torch.Tensor, amax: torch.Tensor | float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, swizzled block scales, tensor scale) of x: a tuple, so that torch.compile can fuse it whole."""
    codes = nvfp4_quantize(x, amax=amax)
    return pack_e2m1(codes.values), swizzle_block_scales(codes.block_scales), codes.tensor_scale


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8) of exact E2M1 values: the index of |v| in E2M1_VALUES, sign in bit 3 (+0 for zeros)."""
    table = torch.tensor(E2M1_VALUES, device=values.device)
    index = torch.bucketize(values.abs(), table)
    return (index + 8 * (values < 0)).to(torch.uint8)


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """[..., K] exact E2M1 values -> uint8 [..., K / 2], element 2j in the low nibble of byte j, 2j + 1 in the high."""
    if values.shape[-1] % 2:
        raise ValueError(f"E2M1 packing needs an even last dim, got shape {tuple(values.shape)}")
    codes = e2m1_codes(values)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K / 2] -> the fp32 E2M1 values [..., K] (the inverse of pack_e2m1)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    table = torch.tensor(E2M1_VALUES, device=packed.device)
    return table[codes & 7] * (1 - 2 * (codes >> 3)).float()


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales [rows, cols] (E4M3 values, any float dtype) -> flat float8_e4m3fn in cuBLAS's 128 x 4 tile layout."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // SCALE_TILE_ROWS), -(-cols // SCALE_TILE_COLS)
    padded = F.pad(scales.float(), (0, col_tiles * SCALE_TILE_COLS - cols, 0, row_tiles * SCALE_TILE_ROWS - rows))
    # tile (i, j), row r = 32 a + b of the tile, column c -> position [i][j][b][a][c]
    tiles = padded.view(row_tiles, 4, 32, col_tiles, SCALE_TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(-1).to(torch.float8_e4m3fn)


def unswizzle_block_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of swizzle_block_scales: fp32 [rows, cols]."""
    row_tiles, col_tiles = -(-rows // SCALE_TILE_ROWS), -(-cols // SCALE_TILE_COLS)
    tiles = swizzled.float().view(row_tiles, col_tiles, 32, 4, SCALE_TILE_COLS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_tiles * SCALE_TILE_ROWS, col_tiles * SCALE_TILE_COLS)[:rows, :cols]


def dequantize_nvfp4(packed: PackedNVFP4, with_tensor_scale: bool = True) -> torch.Tensor:
    """q * d (* s) in fp32 [rows, K], read back from the packed layout (a K that is not a multiple of 16 was
    padded to whole blocks; the padding is dropped)."""
    values = unpack_e2m1(packed.data)
    block_scales = unswizzle_block_scales(packed.block_scales, packed.rows, -(-packed.k // NVFP4_BLOCK_SIZE))
    x = (values.unflatten(-1, (-1, NVFP4_BLOCK_SIZE)) * block_scales.unsqueeze(-1)).flatten(-2)[:, : packed.k]
    return x * packed.tensor_scale if with_tensor_scale else x


def nvfp4_gemm(x: PackedNVFP4, w: PackedNVFP4, bias: torch.Tensor | None, out_dtype: torch.dtype, kernel: bool) -> torch.Tensor:
    """y = (sum_k q_x d_x q_W d_W) s_x s_W + b, [x.rows, w.rows] in out_dtype: the FP4 GEMM, or its reference formula."""
    if not kernel:
        acc = dequantize_nvfp4(x, with_tensor_scale=False) @ dequantize_nvfp4(w, with_tensor_scale=False).T
        return _epilogue(acc, x.tensor_scale * w.tensor_scale, bias, out_dtype)
    recipe = [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise]
    swizzle = F.SwizzleType.SWIZZLE_32_4_4
    return F.scaled_mm(
        x.data.view(torch.float4_e2m1fn_x2), w.data.view(torch.float4_e2m1fn_x2).T,
        [x.block_scales, x.tensor_scale], recipe, [w.block_scales, w.tensor_scale], recipe,
        swizzle_a=swizzle, swizzle_b=swizzle, bias=bias, output_dtype=out_dtype,
    )  # fmt: skip


# --- FP8 -----------------------------------------------------------------------------------------


def _fp8_operand(x: torch.Tensor, amax: torch.Tensor | float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values, scale) of x: a tuple, so that torch.compile can fuse it whole."""
    codes = fp8_quantize(x, amax)
    return codes.values, codes.scale


def fp8_gemm(x: FP8Codes, w: FP8Codes, bias: torch.Tensor | None, out_dtype: torch.dtype, kernel: bool) -> torch.Tensor:
    """y = (sum_k q_x q_W) s_x s_W + b for 2-D codes x [M, K], w [N, K]: the FP8 GEMM, or its reference formula."""
    if not kernel:
        return _epilogue(x.values.float() @ w.values.float().T, x.scale * w.scale, bias, out_dtype)
    return torch._scaled_mm(x.values, w.values.T, x.scale, w.scale, bias=bias, out_dtype=out_dtype)


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM epilogue in fp32: acc * scale + b, rounded once to out_dtype (cuBLASLt's alpha and bias)."""
    y = acc * scale
    return (y + bias.float() if bias is not None else y).to(out_dtype)


# --- what runs where -------------------------------------------------------------------------------


def kernel_shape_problem(precision: str, in_features: int, out_features: int) -> str | None:
    """Why the GEMM cannot take a linear of this shape, or None when it can."""
    if in_features % K_MULTIPLE[precision] or out_features % N_MULTIPLE:
        return f"{precision} GEMMs need in_features % {K_MULTIPLE[precision]} == 0 and out_features % {N_MULTIPLE} == 0, got {in_features} -> {out_features}"
    return None


@dataclass(frozen=True)
class KernelSupport:
    """Whether the precision's GEMM runs on a device (checked once per process), and how inputs get quantized."""

    available: bool
    reason: str  # what was found: the kernel and the device, or why it cannot run
    compiled_quantizer: bool = False  # activations quantized by one torch.compile'd kernel (else eagerly)


def kernel_support(device: torch.device | str, precision: str) -> KernelSupport:
    """Can `precision`'s scaled-matmul GEMM run on `device`? Requirements first, then one small GEMM checked against the reference."""
    if precision not in KERNEL_PRECISIONS:
        raise ValueError(f"scaled-matmul kernels exist for {KERNEL_PRECISIONS}, not {precision!r}")
    device = torch.device(device)
    if device.type != "cuda":
        return KernelSupport(False, f"no {precision} GEMM on {device.type}: torch's scaled matmul kernels are CUDA's")
    return _probe(device.index if device.index is not None else torch.cuda.current_device(), precision)


@functools.cache
def _probe(index: int, precision: str) -> KernelSupport:
    """The GPU's compute capability and torch's API first; then the GEMM against its reference, with eager and with compiled quantization."""
    device = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    if precision == "fp8" and (major, minor) < FP8_MIN_CAPABILITY:
        return KernelSupport(False, f"FP8 GEMMs need compute capability >= 8.9; {name}")
    if precision == "nvfp4":
        if major not in NVFP4_CAPABILITY_MAJORS:
            return KernelSupport(False, f"NVFP4 GEMMs need Blackwell (compute capability 10.x or 12.x); {name}")
        if not hasattr(F, "scaled_mm") or not hasattr(torch, "float4_e2m1fn_x2"):
            return KernelSupport(False, f"torch {torch.__version__} lacks torch.nn.functional.scaled_mm with two-level NVFP4 scaling")
    try:
        _check_against_reference(device, precision, input_quantizer(precision, compiled=False))
    except Exception as error:  # the kernel, its CUDA build or the driver refused: the caller takes a slower path
        return KernelSupport(False, f"the {precision} scaled-matmul GEMM failed its check on {name}: {type(error).__name__}: {error}")
    try:
        _check_compiled_quantizer(device, precision)
    except Exception as error:  # torch.compile (triton) unavailable, failing or computing other codes: quantize eagerly, slower
        logger.warning(
            "%s activations are quantized eagerly: the compiled quantizer failed its check (%s: %s)", precision, type(error).__name__, error
        )
        return KernelSupport(True, f"{precision} scaled-matmul GEMM on {name}, eager activation quantization", False)
    return KernelSupport(True, f"{precision} scaled-matmul GEMM on {name}", True)


def _check_against_reference(device: torch.device, precision: str, quantize: Callable) -> None:
    """One GEMM over two row tiles and a padded scale column must equal the reference up to summation order."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(160, 96, device=device, generator=g, dtype=torch.bfloat16)
    w = torch.randn(144, 96, device=device, generator=g, dtype=torch.bfloat16)
    bias = torch.randn(144, device=device, generator=g, dtype=torch.bfloat16)
    gemm = nvfp4_gemm if precision == "nvfp4" else fp8_gemm
    weight = pack_nvfp4(w) if precision == "nvfp4" else fp8_quantize(w)
    amax = x.float().abs().amax()
    got = gemm(quantize(x, amax), weight, bias, torch.bfloat16, kernel=True)
    want = gemm(quantize(x, amax), weight, bias, torch.bfloat16, kernel=False)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)


def _check_compiled_quantizer(device: torch.device, precision: str) -> None:
    """The compiled quantizer must give the eager one's codes and scales bit for bit, at two row counts."""
    g = torch.Generator(device=device).manual_seed(1)
    for rows in (160, 37):
        x = torch.randn(rows, 96, device=device, generator=g, dtype=torch.bfloat16)
        amax = 0.5 * x.float().abs().amax()  # saturates the largest inputs too
        compiled, eager = input_quantizer(precision, compiled=True)(x, amax), input_quantizer(precision, compiled=False)(x, amax)
        if not all(torch.equal(got, want) for got, want in zip(_operand_bits(compiled), _operand_bits(eager), strict=True)):
            # e.g. a division that rounds differently in the generated kernel
            raise AssertionError(f"compiled {precision} quantization differs from eager at {rows} rows")


def _operand_bits(operand: PackedNVFP4 | FP8Codes) -> tuple[torch.Tensor, ...]:
    """The operand's tensors, 1-byte float formats viewed as uint8 (comparable bit for bit)."""
    tensors = (
        (operand.values, operand.scale) if isinstance(operand, FP8Codes) else (operand.data, operand.block_scales, operand.tensor_scale)
    )
    return tuple(t.view(torch.uint8) if t.element_size() == 1 else t for t in tensors)


def input_quantizer(precision: str, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], PackedNVFP4 | FP8Codes]:
    """(x [M, K], amax) -> the GEMM's x operand, quantized eagerly or (compiled, for CUDA) by one fused
    torch.compile kernel: eagerly, NVFP4's quantization is about a dozen elementwise passes over x, which cost
    more than the FP4 GEMM saves."""
    if precision == "fp8":
        operand = _compiled(_fp8_operand) if compiled else _fp8_operand
        return lambda x, amax: FP8Codes(*operand(x, amax))
    operand = _compiled(_nvfp4_operand) if compiled else _nvfp4_operand
    return lambda x, amax: PackedNVFP4(*operand(x, amax), x.shape[0], x.shape[1])


@functools.cache
def _compiled(function: Callable) -> Callable:
    """One compiled version per function for the whole process, over any number of rows (dynamic shapes)."""
    return torch.compile(function, dynamic=True)
