"""Explore copies of a policy: `quantize_policy` builds one, `requantize` refreshes it after a weight sync.

An explore copy is the policy with its own transformer (a deep copy; LoRA merged in), cast to the
explore precision. Frozen parts (text encoders, tokenizer) are shared with the source, read-only.

Precisions
  fp32, bf16  a dtype cast, nothing quantized (on CPU, bf16 linears accumulate in fp32 as ExploreLinear)
  nvfp4       bf16 everywhere, with the linears `quant.coverage` picks (Sol-RL's rule) in NVFP4 W4A4
  fp8         the same linears in FP8 W8A8 (E4M3, per-tensor scales: quant.fp8)

Backends
  emulate    pure torch, any device. nvfp4: `quant.layers.NVFP4Linear`, weights fake-quantized once per
             sync and cached, activations in every forward. fp8: `quant.layers.FP8Linear` on the
             reference formula of the FP8 GEMM (fp32 GEMM of the E4M3 codes, then the scales).
  scaled_mm  real low-precision GEMMs through torch's scaled matmul (quant.kernels): NVFP4 on Blackwell
             (compute capability 10.x / 12.x), FP8 from compute capability 8.9 (Hopper: 9.0). The
             weights are quantized and packed once per sync, activations in every forward (one
             compiled kernel on CUDA). Where the GEMM cannot run, the layers compute its reference
             formula, the same numerics without the speed-up (logged as a warning).
  modelopt   nvfp4 only: modelopt.torch.quantization (mtq) fake quant with NVFP4 weight and input
             quantizers on the selected linears. Needs CUDA with compute capability >= 8.9: mtq's
             dynamic block quantizer asserts CUDA tensors and its FP4 Triton kernel needs FP8 hardware.
             mtq fake-quantizes the weights in every forward; its input quantizers hold the calibrated amax.
  auto       the fastest path that runs, logged with its reason and recorded in the explore state. nvfp4:
             NVFP4 GEMMs (scaled_mm) on Blackwell; else, with allow_fp8, FP8 GEMMs (the copy is then fp8);
             else modelopt fake quant; else emulate. fp8: FP8 GEMMs, else emulate. It never fails where
             a slower path runs: every GEMM is checked once per process against its reference formula.
The scaled_mm NVFP4 product differs from emulate's by emulate's bf16 rounding of each dequantized operand
(modelopt's fake quantization); its codes and scales are the same.
Activation scales are static by default in every backend: `quant.calibration` runs a fixed calibration
forward loop (a few fixed prompts x seeds sampled at the explore timesteps, quantizers off) and keeps
the max |input| of every quantized linear, in `quantize_policy` and again in `requantize` after every
sync. So a seed's explore image does not depend on its batch-mates, and re-issuing a shard in another
order or split gives the same images. `delayed` (quant.layers.DelayedScaling) runs Sol-RL's
Transformer Engine recipe instead, a running amax history per input, which keeps neither guarantee.
emulate and modelopt compute NVFP4QTensor's numerics, with two exceptions read in modelopt 0.47's CUDA
(Triton) kernel: it zeroes a 16-block whose scale underflows, i.e. whose amax is below 6e-5 (a 1e-5
floor on the block scale) or below 2.2e-6 x the tensor's amax (no 2^-9 floor before its E4M3 cast),
and negative values that round to zero keep their sign.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quant.calibration import CalibrationSet, default_calibration_set
from quant.coverage import LayerSelection, select_layers
from quant.kernels import kernel_support
from quant.layers import DelayedAmax, DelayedScaling, ExploreLinear, FP8Linear, NVFP4KernelLinear, NVFP4Linear, QuantLinear
from rollout.policy import OLD_ADAPTER, PRECISIONS, QUANTIZED_PRECISIONS, Policy, torch_dtype

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "emulate", "scaled_mm", "modelopt")
MODELOPT_MIN_CAPABILITY = (8, 9)
_NVFP4_QUANTIZER = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


@dataclass
class ExploreState:
    """What an explore copy is: attached to it as `policy.explore_state`."""

    precision: str
    backend: str  # "emulate" | "scaled_mm" | "modelopt" for nvfp4 and fp8, "none" for a plain dtype cast
    version: int  # version of the weights it holds; requantize only accepts newer ones
    selection: LayerSelection | None  # the quantization report (nvfp4 and fp8 only)
    calibration: CalibrationSet | None = None  # the static activation-amax calibration loop (quantized layers, static scaling)
    delayed: DelayedScaling | None = None  # the delayed activation scaling, in place of calibration
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the last quantize_policy / requantize, by phase
    reason: str = ""  # why this precision and backend: what `auto` found, or what runs the GEMMs

    def to_dict(self) -> dict:
        report = self.selection.to_dict() if self.selection is not None else {}
        calibration = {"calibration": self.calibration.to_dict()} if self.calibration is not None else {}
        scaling = {"activation_scaling": "static" if self.delayed is None else asdict(self.delayed) | {"mode": "delayed"}}
        return {
            "precision": self.precision, "backend": self.backend, "reason": self.reason, "version": self.version,
            **report, **calibration, **scaling, "timings": dict(self.timings),
        }  # fmt: skip


def quantize_policy(
    policy: Policy,
    precision: str = "nvfp4",
    backend: str = "auto",
    *,
    adapter: str = OLD_ADAPTER,
    skip_modules: Sequence[str] | None = None,
    min_dim: int | None = None,
    keep_patterns: Sequence[str] = (),
    version: int = 0,
    calibration: CalibrationSet | None = None,
    delayed: DelayedScaling | None = None,
    allow_fp8: bool = False,
) -> Policy:
    """The explore copy of `policy` in `precision`; `policy` itself is left untouched.

    adapter: when the transformer carries LoRA adapters, the one merged into the copy's weights
    (by default "old", the adapter DiffusionNFT samples with). The copy has no adapters.
    skip_modules, min_dim: Sol-RL's coverage rule (quant.coverage); None = the family's.
    keep_patterns: regular expressions of linears to keep in high precision as well, on top of
    skip_modules: trades coverage for ranking fidelity.
    calibration: the activation-amax calibration loop for nvfp4 and fp8; None = the family's default
    (`quant.calibration.default_calibration_set`), whose steps should be the explore steps.
    delayed: quantize activations with Transformer Engine's delayed scaling (quant.layers) instead of
    the calibrated static amax (emulate: no calibration loop; modelopt: the delayed amax overrides
    the calibrated one in every forward).
    allow_fp8: with nvfp4 and backend auto, explore in fp8 on FP8 GEMMs where no NVFP4 GEMM runs (Hopper).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reason = ""
    if precision in QUANTIZED_PRECISIONS:
        precision, backend, reason = resolve_explore_path(precision, backend, policy.device, allow_fp8)
    explore = copy.copy(policy)
    explore._prompt_cache = {}  # cached embeddings are in the source's dtype
    explore.transformer = _plain_copy(policy.transformer, adapter).to(dtype=torch_dtype(precision))
    explore.precision = precision
    if precision != "fp32" and explore.device.type == "cpu":
        _fp32_accumulating_linears(explore.transformer)
    if precision not in QUANTIZED_PRECISIONS:
        explore.explore_state = ExploreState(precision, "none", version, None)
        return explore
    selection = select_layers(explore.transformer, policy.family, skip_modules=skip_modules, min_dim=min_dim, keep_patterns=keep_patterns)
    if not selection.quantized:
        explore.explore_state = ExploreState(precision, backend, version, selection, reason=reason)
        return explore
    if delayed is None or backend == "modelopt":  # modelopt's quantizers need an amax to start from
        calibration = calibration or default_calibration_set(policy)
    else:
        calibration = None
    explore.explore_state = state = ExploreState(precision, backend, version, selection, calibration, delayed, reason=reason)
    start = time.perf_counter()
    _QUANTIZERS[backend](explore, selection.quantized)
    state.timings = {"quantize_calibrate_s": _elapsed(start, explore.device)}
    return explore


def requantize(explore: Policy, weights: dict[str, torch.Tensor], version: int) -> float:
    """Load new high-precision weights into an explore copy, in place, and re-quantize them.

    weights: tensors keyed as in the plain transformer's state dict (full weights, or a subset such
    as `lora_merged_weights`); keys not given keep their values. For nvfp4 the activation amax is
    then recalibrated with the copy's calibration loop. Returns the seconds it all took; the split
    (weights vs calibration) is in `explore.explore_state.timings`.
    """
    state = getattr(explore, "explore_state", None)
    if state is None:
        raise ValueError("requantize needs an explore copy made by quant.quantize_policy")
    if version <= state.version:
        raise ValueError(f"refusing weights of version {version}: the explore copy already holds version {state.version}")
    start = time.perf_counter()
    _load_weights(explore.transformer, weights)
    load_s = _elapsed(start, explore.device)
    if state.calibration is not None:
        _RECALIBRATORS[state.backend](explore)
    total_s = _elapsed(start, explore.device)
    state.timings = {"load_quantize_weights_s": load_s, "calibrate_s": total_s - load_s, "requantize_s": total_s}
    state.version = version
    return total_s


@torch.no_grad()
def lora_update(transformer: nn.Module, adapter: str = OLD_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's factors per LoRA-wrapped linear: "<name>.weight" + ".lora_A" / ".lora_B" / ".lora_scaling".

    What a weight sync ships, on the CPU (rank r: r (in + out) numbers per linear instead of
    in x out); the receiver adds them to the base weights it holds with `merge_lora_update`.
    """
    from peft.tuners.lora import LoraLayer

    update: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if module.fan_in_fan_out:
                raise ValueError(f"{name}: LoRA with fan_in_fan_out (Conv1D weights) is not supported by weight sync")
            key = f"{name}.weight"
            update[key + ".lora_A"] = module.lora_A[adapter].weight.detach().to("cpu", copy=True)
            update[key + ".lora_B"] = module.lora_B[adapter].weight.detach().to("cpu", copy=True)
            update[key + ".lora_scaling"] = torch.tensor(module.scaling[adapter], dtype=torch.float64)
    if not update:
        raise ValueError(f"the transformer has no LoRA layers of adapter {adapter!r}")
    return update


def merge_lora_update(
    base: dict[str, torch.Tensor], update: dict[str, torch.Tensor], device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """W = W_base + scaling * (B @ A) for every linear in a `lora_update`, keyed "<name>.weight".

    Computed on `device` (default: each base weight's) in the wider of the two dtypes and not rounded
    back: whoever loads the result rounds once, to its own precision.
    """
    keys = _updated_weights(update)
    missing = [key for key in keys if key not in base]
    if missing:
        raise KeyError(f"{len(missing)} LoRA-updated weights have no base weight, e.g. {missing[:3]}")
    merged = {}
    for key in keys:
        at = torch.device(device) if device is not None else base[key].device
        down, up = update[key + ".lora_A"].to(at), update[key + ".lora_B"].to(at)
        delta = (up @ down) * update[key + ".lora_scaling"].item()  # the order of peft's get_delta_weight
        dtype = torch.promote_types(base[key].dtype, delta.dtype)
        merged[key] = base[key].to(at, dtype) + delta.to(dtype)
    return merged


@torch.no_grad()
def lora_merged_weights(transformer: nn.Module, adapter: str = OLD_ADAPTER) -> dict[str, torch.Tensor]:
    """W + delta_W(adapter) for every LoRA-wrapped linear, keyed as in the plain transformer."""
    update = lora_update(transformer, adapter)
    base = {key: transformer.get_submodule(key.removesuffix(".weight")).get_base_layer().weight for key in _updated_weights(update)}
    return merge_lora_update(base, update)


def _updated_weights(update: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key.removesuffix(".lora_A") for key in update if key.endswith(".lora_A"))


def linear_weights(transformer: nn.Module, target_modules: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """A host-memory copy of the weights of the linears LoRA targets (matched by peft itself): the base a `lora_update` merges into."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=list(target_modules))
    return {
        f"{name}.weight": module.weight.detach().to("cpu", copy=True)
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and check_target_module_exists(config, name)
    }


def resolve_explore_path(precision: str, backend: str, device: torch.device | str, allow_fp8: bool = False) -> tuple[str, str, str]:
    """(precision, backend, reason) an explore copy of `precision` gets on `device` (module docstring: Backends).

    Logged at INFO with the reason. backend "auto" picks; a named backend is checked: modelopt runs nvfp4 on
    CUDA only (RuntimeError elsewhere); scaled_mm runs anywhere, on its reference formula where its GEMM cannot.
    """
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"explore paths exist for {QUANTIZED_PRECISIONS}, not {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        precision, backend, reason = _auto_path(precision, device, allow_fp8)
        logger.info("%s explore: auto -> %s on %s (%s)", precision, backend, device, reason)
    elif backend == "modelopt":
        if precision != "nvfp4":
            raise ValueError(f"backend 'modelopt' quantizes to nvfp4 only, not {precision!r}; use 'scaled_mm' or 'emulate'")
        reason = modelopt_unavailable(device)
        if reason:
            raise RuntimeError(
                f"NVFP4 backend 'modelopt' cannot run on device {device}: {reason}; use backend='emulate' (any device) or 'auto'"
            )
        reason = "modelopt fake quantization"
    elif backend == "scaled_mm":
        support = kernel_support(device, precision)
        reason = support.reason if support.available else f"reference formula of the GEMM ({support.reason})"
        if not support.available:
            logger.warning(
                "%s explore with backend scaled_mm on %s computes the GEMM's reference formula: %s", precision, device, support.reason
            )
    else:
        reason = "emulation in pure torch"
    return precision, backend, reason


def _auto_path(precision: str, device: torch.device, allow_fp8: bool) -> tuple[str, str, str]:
    """The fastest explore path that runs (module docstring), with what was found on the way."""
    found = []
    if precision == "nvfp4":
        support = kernel_support(device, "nvfp4")
        if support.available:
            return "nvfp4", "scaled_mm", support.reason
        found.append(support.reason)
    if precision == "fp8" or allow_fp8:
        support = kernel_support(device, "fp8")
        if support.available:
            switch = "sol.allow_fp8: fp8 in place of nvfp4; " if precision == "nvfp4" else ""
            return "fp8", "scaled_mm", "; ".join(found + [switch + support.reason])
        found.append(support.reason)
    if precision == "nvfp4":
        unavailable = modelopt_unavailable(device)
        if not unavailable:
            return "nvfp4", "modelopt", "; ".join(found + ["modelopt fake quantization"])
        found.append(f"no modelopt: {unavailable}")
    return precision, "emulate", "; ".join(found + ["emulation in pure torch"])


def modelopt_unavailable(device: torch.device) -> str | None:
    """Why the modelopt backend cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return "modelopt's dynamic NVFP4 block quantizer asserts CUDA tensors"
    capability = torch.cuda.get_device_capability(device)
    if capability < MODELOPT_MIN_CAPABILITY:
        return f"modelopt's NVFP4 fake-quant kernel needs compute capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("modelopt") is None:
        return "nvidia-modelopt is not installed"
    return None


def _plain_copy(transformer: nn.Module, adapter: str) -> nn.Module:
    """Deep copy of the transformer without LoRA layers, `adapter` merged into the base weights."""
    copied = copy.deepcopy(transformer)
    adapters = getattr(copied, "peft_config", None)
    if not adapters:
        return copied
    if adapter not in adapters:
        raise ValueError(f"adapter {adapter!r} is not on the transformer (it has {', '.join(adapters)})")
    merged = lora_merged_weights(copied, adapter)
    copied.unload_lora()
    _load_weights(copied, merged)
    return copied


@torch.no_grad()
def _load_weights(transformer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the transformer (cast to its dtypes); quantized linears re-quantize their weights."""
    tensors = dict(transformer.named_parameters()) | dict(transformer.named_buffers())
    unknown = sorted(set(weights) - set(tensors))
    if unknown:
        raise KeyError(f"{len(unknown)} weights are not in the explore transformer, e.g. {unknown[:3]}")
    for key, value in weights.items():
        target = tensors[key]
        if value.shape != target.shape:
            raise ValueError(f"{key}: new shape {tuple(value.shape)} != explore shape {tuple(target.shape)}")
        module_name, _, attr = key.rpartition(".")
        module = transformer.get_submodule(module_name)
        if isinstance(module, QuantLinear) and attr == "weight":
            module.set_weight(value)
        else:
            target.copy_(value)


def _fp32_accumulating_linears(transformer: nn.Module) -> None:
    """Every nn.Linear becomes an ExploreLinear: the same bf16 values, computed 5x faster on CPUs without native bf16."""
    for name, module in list(transformer.named_modules()):
        if type(module) is nn.Linear:
            transformer.set_submodule(name, ExploreLinear.from_linear(module))


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _emulate_quantize(explore: Policy, layer_names: list[str]) -> None:
    layer_class = {"nvfp4": NVFP4Linear, "fp8": FP8Linear}[explore.explore_state.precision]
    _replace_linears(explore, layer_names, layer_class.from_linear)


def _scaled_mm_quantize(explore: Policy, layer_names: list[str]) -> None:
    precision = explore.explore_state.precision
    support = kernel_support(explore.device, precision)
    layer_class = {"nvfp4": NVFP4KernelLinear, "fp8": FP8Linear}[precision]
    _replace_linears(explore, layer_names, lambda linear: layer_class.from_linear(linear, support.available, support.compiled_quantizer))


def _replace_linears(explore: Policy, layer_names: list[str], make_layer) -> None:
    """Swap each named linear for `make_layer(linear)`, then calibrate the input amax (or start delayed scaling)."""
    transformer, delayed = explore.transformer, explore.explore_state.delayed
    for name in layer_names:
        layer = make_layer(transformer.get_submodule(name))
        if delayed is not None:
            layer.use_delayed_scaling(delayed)
        transformer.set_submodule(name, layer)
    if delayed is None:
        _calibrate_layers(explore)


def _calibrate_layers(explore: Policy) -> None:
    """Max calibration of every quantized linear's input amax, the quantizers off while the loop runs."""
    layers = {name: m for name, m in explore.transformer.named_modules() if isinstance(m, QuantLinear)}
    for layer in layers.values():
        layer.start_calibration()
    try:
        explore.explore_state.calibration.run(explore)
    finally:
        for layer in layers.values():
            layer.calibrating = False  # left uncalibrated (forward refuses) unless the loop completed
    for layer in layers.values():
        layer.finish_calibration()
    _check_amax({name: layer.input_amax for name, layer in layers.items()})


def _modelopt_quantize(explore: Policy, layer_names: list[str]) -> None:
    """mtq NVFP4 W4A4 on exactly `layer_names`, calibrated with the explore copy's loop; every other quantizer mtq inserts stays disabled."""
    import modelopt.torch.quantization as mtq

    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for name in layer_names:
        quant_cfg += [{"quantizer_name": f"{name}.{q}", "cfg": _NVFP4_QUANTIZER} for q in ("weight_quantizer", "input_quantizer")]
    # "max": weight quantizers take their amax from the weights, input quantizers from the loop.
    mtq.quantize(explore.transformer, {"quant_cfg": quant_cfg, "algorithm": "max"}, forward_loop=_forward_loop(explore))
    _check_amax(_modelopt_input_amax(explore.transformer, layer_names))
    if explore.explore_state.delayed is not None:
        for name in layer_names:
            _delay_modelopt_input_amax(explore.transformer.get_submodule(name), explore.explore_state.delayed)


def _delay_modelopt_input_amax(layer: nn.Module, recipe: DelayedScaling) -> None:
    """Before every forward, set the layer's input quantizer amax from its delayed-scaling history (`layer.delayed_amax`)."""
    layer.delayed_amax = DelayedAmax(recipe)

    def set_amax(module: nn.Module, args: tuple) -> None:
        module.input_quantizer.amax = module.delayed_amax(args[0])

    layer.register_forward_pre_hook(set_amax)


def _modelopt_recalibrate(explore: Policy) -> None:
    """Recompute every enabled quantizer's amax: weights from the weights just loaded, inputs from the loop."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in explore.transformer.modules():
        # mtq's max calibrator keeps its running max across calibrate calls: without a reset a
        # smaller new amax would never replace the old one.
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            module.reset_amax()
    delayed = [m.delayed_amax for m in explore.transformer.modules() if hasattr(m, "delayed_amax")]
    for history in delayed:  # the calibration loop's inputs stay out of the explore forwards' history
        history.paused = True
    try:
        mtq.calibrate(explore.transformer, algorithm="max", forward_loop=_forward_loop(explore))
    finally:
        for history in delayed:
            history.paused = False
    _check_amax(_modelopt_input_amax(explore.transformer, explore.explore_state.selection.quantized))


def _forward_loop(explore: Policy):
    return lambda transformer: explore.explore_state.calibration.run(explore)


def _modelopt_input_amax(transformer: nn.Module, layer_names: list[str]) -> dict[str, torch.Tensor | None]:
    return {name: getattr(transformer.get_submodule(name).input_quantizer, "_amax", None) for name in layer_names}


def _check_amax(amax: dict[str, torch.Tensor | None]) -> None:
    overflowed = [name for name, value in amax.items() if value is not None and not torch.isfinite(value).all()]
    if overflowed:
        raise FloatingPointError(
            f"calibration of the explore copy overflowed: inf or NaN input amax in {len(overflowed)} quantized linears, e.g. {overflowed[:3]}; "
            "the weights the learner sent make its activations overflow (lower optim.lr)"
        )
    bad = [name for name, value in amax.items() if value is None or not (torch.isfinite(value).all() and (value > 0).all())]
    if bad:
        raise RuntimeError(
            f"calibration left {len(bad)} quantized linears without a positive finite input amax, e.g. {bad[:3]}: "
            "the calibration loop never reached them or fed them only zeros"
        )


_QUANTIZERS = {"emulate": _emulate_quantize, "scaled_mm": _scaled_mm_quantize, "modelopt": _modelopt_quantize}
_RECALIBRATORS = {"emulate": _calibrate_layers, "scaled_mm": _calibrate_layers, "modelopt": _modelopt_recalibrate}
