"""Explore copies: quantize_policy backends and precisions, requantize after weight syncs, LoRA merging."""

import json
import logging
import re
import zlib

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from quant import (
    CalibrationSet,
    DelayedScaling,
    ExploreState,
    NVFP4Linear,
    linear_weights,
    lora_merged_weights,
    lora_update,
    merge_lora_update,
    nvfp4_fake_quantize,
    quantize_policy,
    requantize,
)
from quant.coverage import select_layers
from quant.layers import DelayedAmax, ExploreLinear
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Conditioning, Policy
from rollout.samplers import sample
from rollout.schedules import flow_match_sigmas

MIN_DIM = 16  # the stub's linears are 32 wide or more: all but the sd3 skip list run in NVFP4
CALIBRATION = CalibrationSet(("a red circle", "two blue squares"), seeds=(0, 1), steps=3)


class StubPolicy(Policy):
    """The smallest Policy around a random tiny SD3 transformer (hidden 32, 2 blocks)."""

    family = "sd3"
    latent_shape = (4, 8, 8)
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    shift = 1.0

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        ).eval().requires_grad_(False)  # fmt: skip
        self.precision = "fp32"

    def _encode(self, prompts: list[str]) -> Conditioning:
        """Fixed random embeddings per prompt string."""
        parts = []
        for prompt in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            parts.append(
                Conditioning({"prompt_embeds": torch.randn(1, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 64, generator=g)})
            )
        return Conditioning.cat(parts).to(self.device, self.dtype)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=x_t.to(self.dtype),
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.dtype),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.dtype),
            timestep=(t * 1000).to(self.dtype),
            return_dict=False,
        )[0]

    def sigmas(self, steps: int, shift: float | None = None) -> torch.Tensor:
        return flow_match_sigmas(steps, self.shift if shift is None else shift)

    def decode(self, x0: torch.Tensor) -> np.ndarray:
        return ((x0[:, :3].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def nvfp4_copy(policy: Policy, **kwargs) -> Policy:
    return quantize_policy(policy, "nvfp4", "emulate", min_dim=MIN_DIM, calibration=CALIBRATION, **kwargs)


def input_amax(explore: Policy) -> dict[str, torch.Tensor]:
    return {name: m.input_amax.clone() for name, m in explore.transformer.named_modules() if isinstance(m, NVFP4Linear)}


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(
        {"prompt_embeds": torch.randn(batch, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(batch, 64, generator=g)}
    )
    return torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g), cond


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def perturbed_weights(policy: Policy, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in policy.transformer.state_dict().items() if v.is_floating_point()}


# --- quantize_policy -----------------------------------------------------------------------------


def test_emulate_copy_quantizes_the_selected_linears_and_leaves_the_source_untouched():
    policy = StubPolicy()
    before = snapshot(policy.transformer)

    explore = nvfp4_copy(policy)

    assert_same_state(snapshot(policy.transformer), before)
    assert policy.precision == "fp32" and not any(isinstance(m, NVFP4Linear) for m in policy.transformer.modules())
    state = explore.explore_state
    assert (explore.precision, state.precision, state.backend, state.version, state.calibration) == (
        "nvfp4",
        "nvfp4",
        "emulate",
        0,
        CALIBRATION,
    )
    quantized = {name: m for name, m in explore.transformer.named_modules() if isinstance(m, NVFP4Linear)}
    assert set(quantized) == set(state.selection.quantized) and len(quantized) == 20
    for name, param in explore.transformer.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, before[name].to(torch.bfloat16)), name
    for name, layer in quantized.items():
        assert torch.equal(layer.weight_fq, nvfp4_fake_quantize(before[f"{name}.weight"].to(torch.bfloat16))), name
        assert layer.calibrated and torch.isfinite(layer.input_amax) and layer.input_amax > 0, name


def test_high_precision_linears_of_a_cpu_explore_copy_accumulate_in_fp32():
    explore = nvfp4_copy(StubPolicy())
    kept = {name: m for name, m in explore.transformer.named_modules() if type(m) is ExploreLinear}
    assert set(kept) == set(explore.explore_state.selection.kept)
    assert not any(type(m) is torch.nn.Linear for m in explore.transformer.modules())
    layer = kept["context_embedder"]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(got, (x.float() @ layer.weight.float().T + layer.bias.float()).to(torch.bfloat16))
        # a bf16 GEMM (fp32 accumulation, one rounding) agrees up to the summation order
        torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_auto_picks_emulate_on_cpu_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="quant.explore"):
        explore = quantize_policy(StubPolicy(), "nvfp4", "auto", min_dim=MIN_DIM, calibration=CALIBRATION)
    assert explore.explore_state.backend == "emulate"
    assert "auto -> emulate on cpu" in caplog.text


def test_modelopt_backend_on_cpu_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match=r"backend 'modelopt' cannot run on device cpu: .*asserts CUDA"):
        quantize_policy(StubPolicy(), "nvfp4", "modelopt")


def copy_with_backend(policy: Policy, backend: str) -> Policy:
    """An nvfp4 explore copy built by one backend's internals on an fp32 transformer: on CPU mtq can insert and
    calibrate quantizers (its quantized forward asserts CUDA), and in fp32 both backends' calibration GEMMs are the same op."""
    from quant.explore import _emulate_quantize, _modelopt_quantize

    explore = quantize_policy(policy, "fp32")
    selection = select_layers(explore.transformer, "sd3", min_dim=MIN_DIM)
    explore.explore_state = ExploreState("nvfp4", backend, 0, selection, CALIBRATION)
    {"emulate": _emulate_quantize, "modelopt": _modelopt_quantize}[backend](explore, selection.quantized)
    return explore


def modelopt_input_amax(explore: Policy) -> dict[str, torch.Tensor]:
    return {
        name: explore.transformer.get_submodule(name).input_quantizer.amax.float() for name in explore.explore_state.selection.quantized
    }


def test_modelopt_backend_calibrates_exactly_the_selected_quantizers_like_emulate_and_needs_cuda_to_run():
    """Same calibration loop, same max statistics: modelopt's input amax equal emulate's bit for bit."""
    pytest.importorskip("modelopt.torch.quantization")
    policy = StubPolicy()
    explore = copy_with_backend(policy, "modelopt")
    emulated = copy_with_backend(policy, "emulate")

    quantized = explore.explore_state.selection.quantized
    enabled = {name for name, m in explore.transformer.named_modules() if name.endswith("_quantizer") and m.is_enabled}
    assert enabled == {f"{n}.{q}" for n in quantized for q in ("weight_quantizer", "input_quantizer")}
    to_q = explore.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    assert to_q.weight_quantizer.amax == to_q.weight.abs().amax().float()  # per-tensor weight scale from the weight
    assert_same_state(modelopt_input_amax(explore), input_amax(emulated))  # static activation scales from the loop
    with pytest.raises(AssertionError, match="CUDA"):
        to_q(torch.randn(2, 32))

    # requantize resets mtq's running max: a smaller weight gets a smaller amax, and inputs are recalibrated
    smaller = {k: 0.5 * v for k, v in policy.transformer.state_dict().items()}
    requantize(explore, smaller, version=1)
    requantize(emulated, smaller, version=1)
    assert (
        to_q.weight_quantizer.amax
        == to_q.weight.abs().amax().float()
        == 0.5 * policy.transformer.get_submodule("transformer_blocks.0.attn.to_q").weight.abs().amax()
    )
    assert_same_state(modelopt_input_amax(explore), input_amax(emulated))


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_other_precisions_are_plain_casts(precision, dtype):
    policy = StubPolicy()
    explore = quantize_policy(policy, precision)
    assert (explore.precision, explore.explore_state.backend, explore.explore_state.selection) == (precision, "none", None)
    assert not any(isinstance(m, NVFP4Linear) for m in explore.transformer.modules())
    for name, param in explore.transformer.named_parameters():
        assert torch.equal(param, policy.transformer.get_parameter(name).to(dtype)), name


def test_invalid_precision_and_backend_are_refused():
    with pytest.raises(ValueError, match="precision"):
        quantize_policy(StubPolicy(), "int8")
    with pytest.raises(ValueError, match="backend"):
        quantize_policy(StubPolicy(), "nvfp4", "tensorrt")


def test_nvfp4_velocity_stays_near_bf16():
    policy = StubPolicy()
    x, t, cond = inputs()
    with torch.no_grad():
        bf16 = quantize_policy(policy, "bf16").velocity(x, t, cond).float()
        nvfp4 = nvfp4_copy(policy).velocity(x, t, cond).float()
    relative_error = ((nvfp4 - bf16).norm() / bf16.norm()).item()
    assert 0 < relative_error < 0.2


def test_explore_state_to_dict_is_loggable():
    explore = nvfp4_copy(StubPolicy(), version=7)
    logged = json.loads(json.dumps(explore.explore_state.to_dict()))
    assert (logged["precision"], logged["backend"], logged["version"], logged["num_quantized_layers"]) == ("nvfp4", "emulate", 7, 20)
    assert logged["calibration"]["num_images"] == 4 and logged["timings"]["quantize_calibrate_s"] > 0
    assert logged["activation_scaling"] == "static"
    delayed = json.loads(json.dumps(nvfp4_copy(StubPolicy(), delayed=DelayedScaling(8, "most_recent")).explore_state.to_dict()))
    assert delayed["activation_scaling"] == {"mode": "delayed", "history_len": 8, "algo": "most_recent"} and "calibration" not in delayed


# --- delayed activation scaling ------------------------------------------------------------------


def test_delayed_amax_follows_transformer_engines_delayed_scaling():
    # Sol-RL: DelayedScaling(amax_history_len=16, amax_compute_algo="max"); the first forward has TE's initial scale 1.
    amax = DelayedAmax(DelayedScaling(history_len=3, algo="max"))
    used = [float(amax(torch.tensor([value]))) for value in (2.0, 5.0, 1.0, 0.5, 0.25, 0.0, 4.0)]
    assert used == [6 * 448, 2.0, 5.0, 5.0, 5.0, 1.0, 0.5]  # the max of the previous 3 non-zero amaxes
    recent = DelayedAmax(DelayedScaling(history_len=3, algo="most_recent"))
    assert [float(recent(torch.tensor([v]))) for v in (2.0, 5.0, 0.0, 1.0)] == [6 * 448, 2.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="algo"):
        DelayedScaling(16, "mean")


def test_delayed_scaling_quantizes_with_the_history_and_needs_no_calibration():
    explore = nvfp4_copy(StubPolicy(), delayed=DelayedScaling())
    assert explore.explore_state.calibration is None
    layer = explore.transformer.get_submodule("transformer_blocks.0.ff.net.0.proj")
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # the second forward quantizes with the first one's amax
    expected = torch.nn.functional.linear(
        nvfp4_fake_quantize(x, amax=x.float().abs().amax()).float(), layer.weight_fq.float(), layer.bias.float()
    )
    torch.testing.assert_close(second, expected.to(torch.bfloat16))


def test_with_delayed_scaling_a_seed_depends_on_its_batch_mates():
    """The guarantee static calibration gives and delayed scaling does not: a seed alone vs inside a batch."""
    prompts, seeds = ["a red circle", "two blue squares", "a green cross"] * 6, list(range(18))
    static, delayed = nvfp4_copy(StubPolicy()), nvfp4_copy(StubPolicy(), delayed=DelayedScaling())
    for explore, independent in ((static, True), (delayed, False)):
        batch = sample(explore, prompts, seeds, steps=3).x0
        alone = sample(explore, prompts[:1], seeds[:1], steps=3).x0
        assert torch.equal(alone[0], batch[0]) is independent


# --- requantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["nvfp4", "bf16"])
def test_requantize_equals_a_fresh_copy_of_the_new_weights(precision):
    policy = StubPolicy()
    explore = quantize_policy(policy, precision, "emulate", min_dim=MIN_DIM, calibration=CALIBRATION)
    new_weights = perturbed_weights(policy, seed=2)

    seconds = requantize(explore, new_weights, version=1)

    policy.transformer.load_state_dict(new_weights, strict=False)
    fresh = quantize_policy(policy, precision, "emulate", min_dim=MIN_DIM, calibration=CALIBRATION)
    assert_same_state(snapshot(explore.transformer), snapshot(fresh.transformer))  # weights and calibrated input amax
    if precision == "nvfp4":
        assert_same_state(input_amax(explore), input_amax(fresh))
        timings = explore.explore_state.timings
        assert timings["requantize_s"] == seconds and timings["calibrate_s"] > 0
    assert explore.explore_state.version == 1 and seconds > 0


def test_requantize_takes_a_subset_of_weights():
    policy = StubPolicy()
    explore = nvfp4_copy(policy)
    before = {k: v for k, v in snapshot(explore.transformer).items() if not k.endswith("input_amax")}
    key = "transformer_blocks.1.attn.to_k.weight"
    new = torch.randn(32, 32, generator=torch.Generator().manual_seed(3))

    requantize(explore, {key: new}, version=1)

    after = {k: v for k, v in snapshot(explore.transformer).items() if not k.endswith("input_amax")}
    assert torch.equal(after.pop(key), new.to(torch.bfloat16))
    assert torch.equal(
        explore.transformer.get_submodule(key.removesuffix(".weight")).weight_fq, nvfp4_fake_quantize(new.to(torch.bfloat16))
    )
    before.pop(key)
    assert_same_state(after, before)


def test_requantize_refuses_older_or_equal_versions():
    explore = nvfp4_copy(StubPolicy(), version=3)
    weights = perturbed_weights(explore, seed=4)
    for stale in (3, 2):
        with pytest.raises(ValueError, match=f"version {stale}: the explore copy already holds version 3"):
            requantize(explore, weights, stale)
    requantize(explore, weights, 4)
    with pytest.raises(ValueError, match="already holds version 4"):
        requantize(explore, weights, 4)


def test_requantize_rejects_foreign_weights_and_policies():
    policy = StubPolicy()
    explore = nvfp4_copy(policy)
    with pytest.raises(KeyError, match="not in the explore transformer"):
        requantize(explore, {"transformer_blocks.9.attn.to_q.weight": torch.zeros(32, 32)}, 1)
    with pytest.raises(ValueError, match="shape"):
        requantize(explore, {"proj_out.weight": torch.zeros(4, 31)}, 1)
    with pytest.raises(ValueError, match="explore copy made by quant.quantize_policy"):
        requantize(policy, {}, 1)


# --- LoRA ----------------------------------------------------------------------------------------


def lora_policy() -> StubPolicy:
    policy = StubPolicy()
    policy.add_lora(rank=4, alpha=8, init_seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-zero "old" adapter that differs from "policy"
        for param in policy.adapter_parameters(OLD_ADAPTER).values():
            param.copy_(0.3 * torch.randn(param.shape, generator=g))
    return policy


def test_lora_adapter_is_merged_into_the_explore_copy():
    policy = lora_policy()
    x, t, cond = inputs()
    with torch.no_grad(), policy.adapter(OLD_ADAPTER):
        expected = policy.velocity(x, t, cond)
    with torch.no_grad(), policy.adapter(TRAINABLE_ADAPTER):
        other_adapter = policy.velocity(x, t, cond)

    explore = quantize_policy(policy, "fp32")

    assert not getattr(explore.transformer, "peft_config", None)
    assert getattr(policy.transformer, "peft_config", None)  # the source keeps its adapters
    with torch.no_grad():
        merged = explore.velocity(x, t, cond)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged, other_adapter, rtol=1e-4, atol=1e-5)


def test_missing_adapter_is_refused():
    with pytest.raises(ValueError, match="adapter 'ema' is not on the transformer"):
        nvfp4_copy(lora_policy(), adapter="ema")


def test_requantize_after_a_lora_update_equals_a_fresh_copy():
    policy = lora_policy()
    explore = nvfp4_copy(policy)
    with torch.no_grad():  # a learner step moved the old adapter
        for param in policy.adapter_parameters(OLD_ADAPTER).values():
            param.mul_(1.5)

    requantize(explore, lora_merged_weights(policy.transformer, OLD_ADAPTER), version=1)

    fresh = nvfp4_copy(policy)
    assert_same_state(snapshot(explore.transformer), snapshot(fresh.transformer))


def test_lora_merged_weights_needs_the_adapter():
    with pytest.raises(ValueError, match="no LoRA layers of adapter 'old'"):
        lora_merged_weights(StubPolicy().transformer)
    with pytest.raises(ValueError, match="no LoRA layers of adapter 'old'"):
        lora_update(StubPolicy().transformer)


def test_lora_update_merged_into_the_base_weights_is_peft_merge_to_the_bit():
    policy = lora_policy()
    base = linear_weights(StubPolicy().transformer, StubPolicy.lora_target_modules)  # the receiver's copy: the same init, no adapters
    update = lora_update(policy.transformer, OLD_ADAPTER)

    merged = merge_lora_update(base, update)

    layers = {name: module for name, module in policy.transformer.named_modules() if hasattr(module, "lora_A")}
    assert sorted(merged) == sorted(base) == sorted(f"{name}.weight" for name in layers)  # only what LoRA targets is kept
    for name, layer in layers.items():
        with torch.no_grad():
            peft_merged = layer.get_base_layer().weight + layer.get_delta_weight(OLD_ADAPTER)
        assert torch.equal(merged[f"{name}.weight"], peft_merged), name
        assert update[f"{name}.weight.lora_scaling"].item() == 8 / 4  # alpha / rank
    assert sum(merged[k].numel() for k in merged) > 2 * sum(v.numel() for v in update.values())  # what a sync saves


def test_merge_lora_update_adds_in_the_wider_dtype_and_leaves_the_rounding_to_the_loader():
    update = {
        "l.weight.lora_A": torch.tensor([[1.0, 2.0]]),
        "l.weight.lora_B": torch.tensor([[1e-3]]),
        "l.weight.lora_scaling": torch.tensor(2.0, dtype=torch.float64),
    }
    merged = merge_lora_update({"l.weight": torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)}, update)
    assert merged["l.weight"].dtype == torch.float32
    torch.testing.assert_close(merged["l.weight"], torch.tensor([[1.002, 1.004]]))  # bf16 would have kept 1.0, 1.0


def test_merge_lora_update_names_a_weight_it_has_no_base_for():
    update = lora_update(lora_policy().transformer, OLD_ADAPTER)
    base = linear_weights(StubPolicy().transformer, StubPolicy.lora_target_modules)
    dropped = sorted(update)[0].removesuffix(".lora_A")
    del base[dropped]
    with pytest.raises(KeyError, match=re.escape(dropped)):
        merge_lora_update(base, update)


# --- calibration -------------------------------------------------------------------------------


def test_calibration_set_is_validated_and_the_defaults_cover_the_tiny_tasks():
    from quant import default_calibration_set
    from rollout.policy import Policy
    from rollout.tiny import TASKS, parse_prompt, prompt_set
    from rollout.tiny.model import TinyPolicy

    tiny = default_calibration_set(TinyPolicy)
    assert {parse_prompt(p).task for p in tiny.prompts} == set(TASKS) and set(tiny.prompts) <= set(prompt_set("train"))
    assert (tiny.steps, tiny.solver, tiny.num_images) == (6, "euler", 20)  # the explore sampler's steps and solver
    assert default_calibration_set(Policy).num_images == 16
    with pytest.raises(ValueError, match="deterministic ODE solver"):
        CalibrationSet(("a cat",), solver="sde")
    with pytest.raises(ValueError, match="at least one prompt"):
        CalibrationSet(())


def test_calibration_that_never_reaches_the_quantized_layers_is_refused():
    policy = StubPolicy()
    # an instance attribute bound to the source: the explore copy would run the source's transformer
    policy.velocity = policy.velocity
    with pytest.raises(RuntimeError, match="20 quantized linears without a positive finite input amax"):
        nvfp4_copy(policy)


# --- the tiny testbed ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_nvfp4():
    """The tiny policy's nvfp4 explore copy with the default calibration set."""
    from rollout import load_policy

    return quantize_policy(load_policy("tiny", precision="bf16"), "nvfp4", "emulate")


def test_tiny_policy_nvfp4_explore_copy(tiny_nvfp4):
    from rollout import load_policy

    bf16 = load_policy("tiny", precision="bf16")
    assert len(tiny_nvfp4.explore_state.selection.quantized) == 8  # the image stream's feed-forward (quant.coverage)
    x = torch.randn(2, *bf16.latent_shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.3, 0.8])
    cond = bf16.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        reference = bf16.velocity(x, t, cond).float()
        quantized = tiny_nvfp4.velocity(x, t, cond).float()
    relative_error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < relative_error < 0.2


def test_tiny_nvfp4_seed_alone_equals_seed_inside_a_batch_of_96(tiny_nvfp4):
    """The sampler contract holds for explore images: static activation scales make rows independent.
    3 steps instead of the explore sampler's 6 keep the test short; each step is one more batched forward."""
    prompts = ["a red circle", "three triangles", "a green square and a blue triangle"] * 32
    seeds = list(range(100, 196))
    batch = sample(tiny_nvfp4, prompts, seeds, steps=3)
    for i in [0, 41, 95]:
        alone = sample(tiny_nvfp4, [prompts[i]], [seeds[i]], steps=3)
        assert np.array_equal(alone.images[0], batch.images[i]) and torch.equal(alone.x0[0], batch.x0[i])
    assert batch.images.shape == (96, 32, 32, 3) and batch.images.dtype == np.uint8


def test_tiny_calibration_is_deterministic(tiny_nvfp4):
    from rollout import load_policy

    source = load_policy("tiny", precision="bf16")
    again = quantize_policy(source, "nvfp4", "emulate")
    assert_same_state(input_amax(again), input_amax(tiny_nvfp4))
    requantize(again, source.transformer.state_dict(), version=1)  # a sync with unchanged weights
    assert_same_state(input_amax(again), input_amax(tiny_nvfp4))


def test_extra_keep_patterns_leave_those_block_linears_in_high_precision(tiny_nvfp4):
    from actors.workers import RolloutWorker
    from rl.config import Recipe
    from rollout import load_policy

    keep = r"^transformer_blocks\.2\."
    default = tiny_nvfp4.explore_state.selection
    explore = quantize_policy(load_policy("tiny", precision="bf16"), "nvfp4", "emulate", keep_patterns=(keep,))
    selection = explore.explore_state.selection
    in_block_2 = [name for name in default.quantized if name.startswith("transformer_blocks.2.")]
    assert in_block_2 == ["transformer_blocks.2.ff.net.0.proj", "transformer_blocks.2.ff.net.2"]
    assert selection.quantized == [name for name in default.quantized if name not in in_block_2]
    assert all(selection.kept[name] == f"keep:{keep}" for name in in_block_2)
    assert not any(isinstance(module, NVFP4Linear) for module in explore.transformer.transformer_blocks[2].modules())
    # what a recipe's sol.keep_high_precision reaches: the rollout worker's copy
    worker = RolloutWorker(recipe=Recipe(sol={"explore_precision": "nvfp4", "quant_backend": "emulate", "keep_high_precision": [keep]}))
    assert worker.describe()["quantized_layers"] == selection.quantized
