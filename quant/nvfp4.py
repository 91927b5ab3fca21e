"""NVFP4 fake quantization: round a tensor to NVFP4 and back, in pure torch on any device.

NVFP4 stores 4-bit E2M1 values in blocks of 16 along the last dim (a linear layer's input dim),
with one E4M3 scale per block and one FP32 scale per tensor. The numerics are those of
nvidia-modelopt's `NVFP4QTensor` quantize -> dequantize, bit for bit (tests use it as the oracle).

Formats
  E2M1  1 sign, 2 exponent, 1 mantissa bit: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; no inf/NaN
  E4M3  torch.float8_e4m3fn: largest 448, smallest subnormal 2^-9; overflow is NaN, not inf

Notation (B = block size, 16)
  code name      symbol  dtype      meaning
  x              x       fp32/bf16  input; blocks are B consecutive values of the last dim
  tensor_amax    a       fp32       max |x| over the whole tensor, or a static (calibrated) amax
  tensor_scale   s       fp32       a / (6 * 448): maps a onto the largest E2M1 x E4M3 product, so
                                    block scales use E4M3's whole range
  block_amax     a_b     fp32       max |x| over one block
  block_scale    d_b     E4M3       E4M3(clamp(a_b / (6 s), 2^-9, 448))
  scaled         x / (d_b s)        computed in fp32
  codes          q       E2M1       round to nearest E2M1 value, ties to even, saturating at +-6
  result         x_hat   x.dtype    q * (d_b s), computed in fp32, then cast to x.dtype

Per-tensor amax
  Dynamic (amax=None): a = max |x| of the tensor itself, as NVFP4QTensor computes it for weights.
  Static (amax given): a is a calibrated constant, as modelopt's input quantizers hold after max
  calibration (`_amax`, used by its NVFP4 kernel as the global amax). A row's result then depends on
  that row alone, never on its batch-mates. Values beyond a saturate: the block scale clamps at 448
  and the codes at 6, so the largest magnitude is 6 * 448 * s = a (NVFP4QTensor.quantize with a given
  per-tensor scale, `weights_scaling_factor_2`, does the same). a must be positive and finite.

Decisions
  * A last dim that is not a multiple of B is padded with zeros to whole blocks, and the padding is
    dropped from the result. Zeros change no amax, so the values kept are exactly those of the padded
    tensor (modelopt pads the same way in `quantize`; its `dequantize` then fails to reshape the
    padded data back to the original shape, so tests pad before calling it).
  * An all-zero tensor returns zeros. modelopt returns NaN there (its per-tensor scale is 0, so the
    block scale is 0 / 0); that is the only input on which the two differ.
  * Both zero codes decode to +0, as in modelopt: small negative values round to +0.0, not -0.0.
  * Inputs must be finite. There is no straight-through gradient: explore copies only run inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NVFP4_BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_FP32_EXPONENT_BITS = 0x7F800000


@dataclass(frozen=True)
class NVFP4Codes:
    """x in NVFP4, as the hardware stores it: x_hat = q * d_b * s per block (module notation), unrounded."""

    values: torch.Tensor  # q: the E2M1 values as fp32 [..., K_pad], K_pad = K padded to whole blocks
    block_scales: torch.Tensor  # d_b: the E4M3 scales as fp32 [..., K_pad / B]
    tensor_scale: torch.Tensor  # s: fp32 scalar
    length: int  # K, the last dim before padding


def nvfp4_quantize(x: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE, amax: torch.Tensor | float | None = None) -> NVFP4Codes:
    """x's NVFP4 codes along the last dim (see the module notation): what a W4A4 GEMM multiplies.

    amax: the static per-tensor amax a (a positive scalar); None takes a = max |x| from x itself.
    """
    _check_input(x, block_size)
    blocks = _pad_last_dim(x.float(), block_size).unflatten(-1, (-1, block_size))
    tensor_scale = (
        nvfp4_tensor_scale(x) if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=x.device) / (E2M1_MAX * E4M3_MAX)
    )
    block_scales = nvfp4_block_scales(blocks, tensor_scale)
    values = round_to_e2m1(blocks / (block_scales * tensor_scale).unsqueeze(-1))
    return NVFP4Codes(values.flatten(-2), block_scales, tensor_scale, x.shape[-1])


def nvfp4_fake_quantize(x: torch.Tensor, block_size: int = NVFP4_BLOCK_SIZE, amax: torch.Tensor | float | None = None) -> torch.Tensor:
    """x rounded to NVFP4 along the last dim and dequantized back to x.dtype (see the module notation).

    x_hat = q * (d_b * s) in fp32, then cast to x.dtype, as modelopt's fake quantization rounds it.
    amax: the static per-tensor amax a (a positive scalar); None takes a = max |x| from x itself.
    """
    codes = nvfp4_quantize(x, block_size, amax)
    scale = (codes.block_scales * codes.tensor_scale).unsqueeze(-1)
    x_hat = codes.values.unflatten(-1, (-1, block_size)).mul_(scale)
    # contiguous: a strided result (padding sliced off) would send matmuls to slower kernels
    return x_hat.flatten(-2)[..., : codes.length].to(x.dtype).contiguous()


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """s = max|x| / (6 * 448) as an fp32 scalar; 1 for an all-zero tensor (any positive s gives zeros)."""
    tensor_amax = x.abs().amax().float()
    return torch.where(tensor_amax == 0, 1.0, tensor_amax / (E2M1_MAX * E4M3_MAX))


def nvfp4_block_scales(blocks: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """d_b for blocks [..., n_blocks, B]: the E4M3 per-block scales [..., n_blocks], as fp32 values."""
    ratio = blocks.abs().amax(dim=-1) / (E2M1_MAX * tensor_scale)
    # Clamp before the cast: below 2^-9 E4M3 flushes to 0 (a division by zero later), above 448 it
    # becomes NaN. An all-zero block gets 2^-9 where modelopt substitutes 1; either way its values
    # stay zeros, and the same holds for a block whose ratio underflows fp32.
    return ratio.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn).float()


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to even, saturating at +-6; the result is an fp32 tensor."""
    v = v.float()
    magnitude = v.abs()
    # E2M1 values are spaced 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]. Rounding to a multiple of
    # the local spacing with torch.round (half to even) is round-to-nearest-even on the E2M1 grid:
    # the even multiples are exactly the values whose mantissa bit is 0.
    # spacing = half the power of two of clamp(|v|, 1, 4): clearing an fp32's mantissa bits leaves
    # that power of two (bit for bit the same as nested torch.where, and ~20x faster on CPU).
    spacing = magnitude.clamp(1.0, 4.0).view(torch.int32).bitwise_and_(_FP32_EXPONENT_BITS).view(torch.float32).mul_(0.5)
    magnitude.div_(spacing).round_().mul_(spacing).clamp_(max=E2M1_MAX)
    # Adding +0.0 turns -0.0 into +0.0, matching modelopt's decoding of both zero codes.
    return magnitude.copysign_(v).add_(0.0)


def _pad_last_dim(x: torch.Tensor, block_size: int) -> torch.Tensor:
    missing = -x.shape[-1] % block_size
    return torch.nn.functional.pad(x, (0, missing)) if missing else x


def _check_input(x: torch.Tensor, block_size: int) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"nvfp4_fake_quantize takes {', '.join(map(str, SUPPORTED_DTYPES))}; got {x.dtype}")
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"nvfp4_fake_quantize needs a non-empty tensor with a last dim, got shape {tuple(x.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
