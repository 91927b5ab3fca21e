"""SD3.5, FLUX.1 and SANA adapters on tiny random pipelines saved to disk and loaded through `load_policy`.

Each builder (rollout.random_pipelines) makes a diffusers pipeline from tiny configs and the test saves
it with `save_pretrained`, so loading goes through the same `from_pretrained` calls as a real checkpoint directory.
"""

import importlib
import json
import math
import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from quant import FAMILY_RULES, quantize_policy
from rl.algorithm import Batch
from rl.config import AlgorithmConfig, OptimConfig
from rl.nft import NFT
from rl.trainer import Trainer
from rollout import ModelConfig, load_policy
from rollout.flux import FluxPolicy
from rollout.images import image_grid, save_png
from rollout.loading import PIPELINE_FAMILIES, PIPELINE_POLICIES
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER
from rollout.random_pipelines import PIPELINE_BUILDERS, RESOLUTION, TEXT_TOKENS
from rollout.samplers import initial_noise, sample
from rollout.sana import SanaPolicy
from rollout.sd3 import SD3Policy

PROMPTS = ["a red circle", "two blue squares", "a green cross left of a circle"]
SEEDS = [11, 12, 13]
STEPS = 3


BUILDERS = {
    family: (PIPELINE_BUILDERS[family], policy_class)
    for family, policy_class in (("sd3", SD3Policy), ("flux", FluxPolicy), ("sana", SanaPolicy))
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def saved(request, tmp_path_factory):
    """(family, directory of the saved tiny pipeline)."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    BUILDERS[family][0]().save_pretrained(path)
    return family, str(path)


def load(path: str, precision: str = "fp32", **options):
    return load_policy(ModelConfig(path=path, resolution=RESOLUTION, max_sequence_length=TEXT_TOKENS, **options), precision)


@pytest.fixture(scope="module")
def policy(saved):
    """A loaded fp32 policy, shared read-only (tests that add LoRA load their own)."""
    return load(saved[1])


# Checkpoint defaults: SD3 and SANA read the resolution from the transformer's sample_size (8 latents
# x VAE factor 2), FLUX from FluxPipeline's 128 latents.
# The resolution must be a multiple of the VAE factor (2) times the patch (SD3: 2, SANA: 1) or FLUX's 2x2 packing.
DEFAULTS = {
    "sd3": {"resolution": 16, "latent_shape": (4, 8, 8), "multiple": 4, "conditioning": {"prompt_embeds", "pooled_prompt_embeds"}},
    "flux": {"resolution": 256, "latent_shape": (4, 128, 128), "multiple": 4, "conditioning": {"prompt_embeds", "pooled_prompt_embeds"}},
    "sana": {"resolution": 16, "latent_shape": (4, 8, 8), "multiple": 2, "conditioning": {"prompt_embeds", "prompt_attention_mask"}},
}


def test_load_policy_detects_the_family_and_reads_the_checkpoint_defaults(saved):
    family, path = saved
    policy = load_policy(path)
    expected = DEFAULTS[family]
    assert isinstance(policy, BUILDERS[family][1]) and policy.family == family
    assert policy.resolution == expected["resolution"] and policy.latent_shape == expected["latent_shape"]
    assert policy.shift is None  # the pipeline's own schedule
    assert policy.cfg_scale == 1.0 and policy.dtype == torch.float32
    # the pipeline holds no transformer: an explore copy must not keep the original alive through it
    assert policy.pipeline.transformer is None
    assert not any(p.requires_grad for p in policy.transformer.parameters())
    assert not any(p.requires_grad for p in policy.pipeline.vae.parameters())


# Each family's sampling schedule, written from its pipeline's code (diffusers 0.42; the references
# call these pipelines): StableDiffusion3Pipeline and SanaPipeline pass the step count alone;
# FluxPipeline (pipeline_flux.py, "5. Prepare timesteps"; flow_grpo and DiffusionNFT's FLUX
# pipelines copy it) passes sigmas = linspace(1, 1/N, N) and mu = m * image_tokens + b, with
# m = (1.15 - 0.5) / (4096 - 256), b = 0.5 - 256 m. Resolutions give FLUX 1024, 2304 and 4096 image
# tokens: what 512, 768 and 1024 px give the real model (VAE factor 8, 2x2 packing).
SCHEDULE_RESOLUTIONS = {"sd3": (16, 24, 32), "flux": (128, 192, 256), "sana": (16, 24, 32)}


def expected_sigmas(family: str, steps: int, latent_size: int, shift: float | None = None) -> torch.Tensor:
    """The reference schedule from its formula, then with the pipeline's own retrieve_timesteps (both must agree)."""
    if family == "flux":
        grid = np.linspace(1.0, 1 / steps, steps)
        tokens = (latent_size // 2) ** 2
        m = (1.15 - 0.5) / (4096 - 256)
        mu = m * tokens + (0.5 - 256 * m)
        scale = math.exp(mu) if shift is None else shift
        formula = scale / (scale + (1 / grid - 1))
    elif family == "sana":  # DPMSolverMultistepScheduler with use_flow_sigmas: N + 1 alphas, the last (sigma 0) dropped
        sigma = 1 - np.linspace(1, 1 / 1000, steps + 1)
        scale = 3.0 if shift is None else shift
        formula = np.flip(scale * sigma / (1 + (scale - 1) * sigma))[:-1]
    else:  # FlowMatchEulerDiscreteScheduler(shift=3): linspace(1, shifted 1/1000, N), shifted once more
        scale = 3.0 if shift is None else shift
        shifted = lambda sigma: scale * sigma / (1 + (scale - 1) * sigma)  # noqa: E731
        formula = shifted(np.linspace(1.0, shifted(1e-3), steps))
    return torch.tensor(np.append(formula, 0.0), dtype=torch.float32)


@pytest.mark.parametrize("steps", [6, 10, 28])
def test_sampling_schedule_is_the_pipelines(saved, steps):
    family, path = saved
    module = importlib.import_module(type(BUILDERS[family][0]()).__module__)
    for resolution in SCHEDULE_RESOLUTIONS[family]:
        policy = load_policy(ModelConfig(path=path, resolution=resolution, max_sequence_length=TEXT_TOKENS))
        scheduler = type(policy.pipeline.scheduler).from_config(policy.pipeline.scheduler.config)
        if family == "flux":
            tokens = (policy.latent_shape[1] // 2) ** 2
            config = scheduler.config
            mu = module.calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
            module.retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        else:
            module.retrieve_timesteps(scheduler, steps, "cpu")
        sigmas = policy.sigmas(steps)
        assert torch.equal(sigmas, scheduler.sigmas.float())
        torch.testing.assert_close(sigmas, expected_sigmas(family, steps, policy.latent_shape[1]), rtol=0, atol=1e-6)
        # a static shift override keeps the pipeline's grid and replaces its shift
        torch.testing.assert_close(
            policy.sigmas(steps, shift=2.0), expected_sigmas(family, steps, policy.latent_shape[1], shift=2.0), rtol=0, atol=1e-6
        )
    if family == "flux" and steps == 10:
        # 512 px: the last non-zero sigma is 0.1726 (a static exp(mu) shift on set_timesteps(10) gave 0.0035)
        low = load_policy(ModelConfig(path=path, resolution=128, max_sequence_length=TEXT_TOKENS)).sigmas(10)[-2]
        assert float(low) == pytest.approx(0.1726, abs=1e-4)


def test_timesteps_reach_the_transformer_in_fp32(saved):
    """flow_grpo / DiffusionNFT / the diffusers pipelines pass t * 1000 in fp32; in bf16, 913.3 would become 912."""
    family, path = saved
    policy = load(path, "bf16")
    seen = {}
    hook = policy.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(t=kwargs["timestep"]), with_kwargs=True)
    x_t = torch.randn(2, *policy.latent_shape)
    t = torch.tensor([0.9133, 0.4])
    with torch.no_grad():
        policy.velocity(x_t, t, policy.encode_prompts(PROMPTS[:2]))
    hook.remove()
    assert seen["t"].dtype == torch.float32
    scale = 1.0 if family == "flux" else 1000.0 * getattr(policy.transformer.config, "timestep_scale", 1.0)  # FLUX embeds t in [0, 1]
    torch.testing.assert_close(seen["t"], t * scale, rtol=0, atol=0)


def test_prompt_embeddings_are_cached_batch_first(policy, saved):
    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert set(cond.tensors) == DEFAULTS[saved[0]]["conditioning"] and len(cond) == 3
    for tensor in cond.tensors.values():
        assert torch.equal(tensor[0], tensor[2])
    fresh = policy._encode([PROMPTS[1]])  # alone, so equal up to the batch-size rounding of CPU GEMMs
    for key, tensor in fresh.tensors.items():
        torch.testing.assert_close(tensor[0], cond.tensors[key][1], rtol=0, atol=1e-5)


def test_sampling_is_deterministic_and_a_seed_gives_the_same_image_alone(policy):
    first = sample(policy, PROMPTS, SEEDS, STEPS)
    again = sample(policy, PROMPTS, SEEDS, STEPS)
    assert first.images.dtype == np.uint8 and first.images.shape == (3, RESOLUTION, RESOLUTION, 3)
    assert torch.equal(first.x0, again.x0) and np.array_equal(first.images, again.images)
    assert first.images.std() > 0 and not torch.allclose(first.x0[0], first.x0[1])
    alone = sample(policy, PROMPTS[1:2], SEEDS[1:2], STEPS)
    # Equal up to float rounding, not bit for bit: CPU GEMM kernels block differently per batch size.
    torch.testing.assert_close(alone.x0[0], first.x0[1], rtol=0, atol=1e-5)
    assert np.abs(alone.images[0].astype(int) - first.images[1]).max() <= 1


def test_euler_sampling_matches_the_diffusers_pipeline(saved, policy):
    """Our sampler + adapter against the family's own pipeline __call__ on the same noise and sigmas.

    The pipeline gets an Euler scheduler without shift and our sigmas (FLUX and SANA schedule
    differently by default; the schedule is the sampler's business, the model call is the adapter's):
    conditioning, latent packing, timestep scaling, guidance embedding and VAE decode must all agree.
    """
    family, path = saved
    sigmas = policy.sigmas(STEPS)
    ours = sample(policy, PROMPTS, SEEDS, STEPS, solver="euler")
    pipeline = type(policy.pipeline).from_pretrained(path)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # takes the given sigmas as they are
    noise = initial_noise(SEEDS, policy.latent_shape)
    options = {"use_resolution_binning": False} if family == "sana" else {}
    if family == "flux":  # FluxPipeline takes packed latents and embeds its guidance_scale (distilled guidance)
        noise = FluxPipeline._pack_latents(noise, *noise.shape)
        options = {"guidance_scale": policy.distilled_guidance}
    else:
        options["guidance_scale"] = 1.0  # CFG off, as in the policy
    reference = {
        output: pipeline(
            prompt=PROMPTS,
            height=RESOLUTION,
            width=RESOLUTION,
            latents=noise,
            sigmas=sigmas[:-1].tolist(),
            num_inference_steps=STEPS,
            max_sequence_length=TEXT_TOKENS,
            output_type=output,
            **options,
        ).images
        for output in ("latent", "np")
    }
    latents = reference["latent"]
    if family == "flux":
        latents = FluxPipeline._unpack_latents(latents, RESOLUTION, RESOLUTION, pipeline.vae_scale_factor)
    torch.testing.assert_close(ours.x0, latents.float(), rtol=1e-4, atol=1e-4)
    assert np.abs(ours.images.astype(int) - (reference["np"] * 255).round()).max() <= 1


def test_cfg_is_off_by_default_and_mixes_the_empty_prompt_when_on(saved, policy):
    x_t = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4])
    cond = policy.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        assert torch.equal(policy.velocity(x_t, t, cond), policy._predict(x_t, t, cond))
        guided = load(saved[1], cfg_scale=3.0)
        v_cond = guided._predict(x_t, t, cond)
        v_uncond = guided._predict(x_t, t, guided.encode_prompts(["", ""]))
        torch.testing.assert_close(guided.velocity(x_t, t, cond), v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)


def test_lora_targets_match_and_one_nft_step_lowers_the_loss(saved):
    policy = load(saved[1])
    policy.add_lora(rank=4, alpha=8)
    wrapped = {name for name, module in policy.transformer.named_modules() if hasattr(module, "lora_A")}
    matched = {target for target in policy.lora_target_modules if any(name.endswith(target) for name in wrapped)}
    assert matched == set(policy.lora_target_modules), f"targets matching no module: {set(policy.lora_target_modules) - matched}"

    x0 = sample(policy, PROMPTS, SEEDS, STEPS).x0
    # Every sample positive (r = 1): NFT is then flow matching on the policy's own samples, so one
    # small step must lower the loss on the same timesteps and noise.
    batch = Batch(samples=x0, prompts=PROMPTS, advantages=torch.full((3,), 5.0))
    trainer, nft = Trainer(policy, optim=OptimConfig(lr=1e-3)), NFT(AlgorithmConfig(), policy.sigmas(STEPS))
    plan = nft.plan(trainer, range(len(x0)), x0.shape[1:])  # the plan train_step draws

    def loss() -> float:
        return nft.gradients(trainer, x0, policy.encode_prompts(PROMPTS), batch.advantages[:, None], *plan)[2]["loss/nft"]

    before = {name: p.detach().clone() for name, p in policy.adapter_parameters(TRAINABLE_ADAPTER).items()}
    loss_before = loss()
    metrics = nft.train_step(trainer, batch)
    assert metrics["train/grad_norm"] > 0
    after = policy.adapter_parameters(TRAINABLE_ADAPTER)
    assert any(not torch.equal(before[name], p) for name, p in after.items())
    assert loss() < loss_before
    # eta = 0.001 after the first step (the old adapter started equal to the trained one): old = 0.001 before + 0.999 after
    old = policy.adapter_parameters(OLD_ADAPTER)
    for name, p in after.items():
        torch.testing.assert_close(
            old[name.replace(f".{TRAINABLE_ADAPTER}.", f".{OLD_ADAPTER}.")], 0.001 * before[name] + 0.999 * p.detach()
        )


def test_nvfp4_explore_copy_quantizes_block_linears_and_samples(saved):
    family, path = saved
    source = load(path, precision="bf16")
    # min_dim 16: these tiny linears are 16-128 wide, under every family's real min_dim (1000-2432)
    explore = quantize_policy(source, "nvfp4", backend="auto", min_dim=16)
    state = explore.explore_state
    assert state.backend == "emulate" and state.selection.quantized
    assert not any(re.search(pattern, name) for pattern in FAMILY_RULES[family].skip_modules for name in state.selection.quantized)
    assert explore.pipeline is source.pipeline and explore.transformer is not source.transformer
    reference = sample(source, PROMPTS, SEEDS, STEPS)
    fp4 = sample(explore, PROMPTS, SEEDS, STEPS)
    assert torch.equal(fp4.x0, sample(explore, PROMPTS, SEEDS, STEPS).x0)
    assert fp4.images.shape == reference.images.shape and torch.isfinite(fp4.x0).all()
    error = (fp4.x0 - reference.x0).norm() / reference.x0.norm()
    assert 0 < error < 0.5, f"NVFP4 relative error {error:.3f}"
    # the default arguments build the same kind of copy (the family's min_dim keeps these tiny layers)
    assert quantize_policy(load(path, precision="bf16"), "nvfp4").explore_state.precision == "nvfp4"


def test_family_options_are_checked(saved):
    family, path = saved
    if family == "flux":
        low, high = load(path, distilled_guidance=1.0), load(path, distilled_guidance=5.0)
        x_t, t = torch.randn(1, *low.latent_shape), torch.tensor([0.5])
        cond = low.encode_prompts(PROMPTS[:1])
        with torch.no_grad():
            assert not torch.allclose(low.velocity(x_t, t, cond), high.velocity(x_t, t, cond))
    else:
        with pytest.raises(ValueError, match="distilled_guidance applies to FLUX.1's guidance embedding only"):
            load(path, distilled_guidance=3.5)
    multiple = DEFAULTS[family]["multiple"]
    with pytest.raises(ValueError, match=f"{family} needs a resolution divisible by {multiple}"):
        load_policy(ModelConfig(path=path, resolution=RESOLUTION + multiple // 2))


def test_unknown_pipelines_and_misplaced_options_are_rejected(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match=r"it is a diffusers KandinskyPipeline; supported families: tiny, sd3, flux, sana"):
        load_policy(str(tmp_path))
    with pytest.raises(ValueError, match=r"\['resolution'\] apply to the diffusers families"):
        load_policy(ModelConfig(path="tiny", resolution=64))


# --- real checkpoints: opt-in, on a CUDA machine with hub access ------------------------------------

REAL_CHECKPOINTS = {  # family -> (hub id, resolution of the reference RL recipes)
    "sd3": ("stabilityai/stable-diffusion-3.5-medium", 512),
    "flux": ("black-forest-labs/FLUX.1-dev", 512),
    "sana": ("Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", 1024),
}


def smoothness(images: np.ndarray) -> float:
    """Mean absolute difference of horizontally adjacent pixels: about 85 for uniform noise, < 20 for pictures."""
    return float(np.abs(np.diff(images.astype(np.int16), axis=2)).mean())


@pytest.mark.real
@pytest.mark.parametrize("family", list(REAL_CHECKPOINTS))
def test_real_checkpoint_samples_explores_in_nvfp4_and_trains(family, tmp_path):
    hub_id, resolution = REAL_CHECKPOINTS[family]
    policy = load_policy(ModelConfig(path=hub_id, resolution=resolution), "bf16", "cuda")
    prompts = ["a photo of a red apple on a wooden table", "two cats sleeping on a blue sofa"] * 2
    seeds = [0, 1, 2, 3]
    bf16 = sample(policy, prompts, seeds, 10, solver="dpm2")
    assert bf16.images.shape == (4, resolution, resolution, 3) and smoothness(bf16.images) < 20
    alone = sample(policy, prompts[:1], seeds[:1], 10, solver="dpm2")
    assert np.abs(alone.images[0].astype(int) - bf16.images[0]).mean() < 2  # bf16 GPU kernels vary a little with batch size

    explore = quantize_policy(policy, "nvfp4", backend="auto")
    report = explore.explore_state.to_dict()
    fp4 = sample(explore, prompts, seeds, 10, solver="dpm2")
    save_png(image_grid(np.concatenate([bf16.images, fp4.images]), columns=4), tmp_path / f"{family}_bf16_top_nvfp4_bottom.png")
    print(
        f"{family}: backend {report['backend']}, {report['num_quantized_layers']} NVFP4 layers, "
        f"{report['quantized_fraction']:.2f} of the parameters; grid in {tmp_path}"
    )
    assert report["num_quantized_layers"] > 0 and smoothness(fp4.images) < 20
    # Same seeds, same sampler: the NVFP4 copy draws the same compositions (what Sol-RL relies on).
    assert np.abs(fp4.images.astype(int) - bf16.images).mean() < 40
    del explore
    torch.cuda.empty_cache()

    policy.add_lora(rank=32, alpha=64)
    policy.transformer.enable_gradient_checkpointing()
    nft = NFT(AlgorithmConfig(micro_batch=1), policy.sigmas(10))
    metrics = nft.train_step(Trainer(policy), Batch(samples=bf16.x0, prompts=prompts, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0])))
    assert np.isfinite(metrics["loss/nft"]) and metrics["train/grad_norm"] > 0


def test_family_table_matches_the_policy_classes():
    for family, target in PIPELINE_POLICIES.items():
        module_name, class_name = target.split(":")
        policy_class = getattr(importlib.import_module(module_name), class_name)
        assert PIPELINE_FAMILIES[policy_class.pipeline_class.__name__] == family
