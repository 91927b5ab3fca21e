import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rollout.samplers import MIN_ROWS, dpm2_step, initial_noise, sample, step_noise
from rollout.schedules import flow_match_sigmas


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_matches_diffusers(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    sigmas = flow_match_sigmas(10, shift)
    assert sigmas.shape == (11,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.equal(sigmas, scheduler.sigmas.float())
    if shift > 1:  # shift pushes the schedule towards noise
        assert (sigmas[1:-1] > flow_match_sigmas(10, 1.0)[1:-1]).all()


def test_initial_noise_is_per_seed_and_from_a_cpu_generator():
    batch = initial_noise([3, 7, 3], (3, 4, 4))
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(batch[1], torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(step_noise([7], 0, (3, 4, 4))[0], batch[1])
    assert not torch.equal(step_noise([7], 0, (3, 4, 4)), step_noise([7], 1, (3, 4, 4)))


def test_euler_matches_the_diffusers_scheduler_loop(tiny_policy):
    # MIN_ROWS images: the sampler's smallest model call, so that both loops run the same GEMM kernels
    prompts = ["a red circle", "two crosses", "a circle left of a square", "a blue square"] * (MIN_ROWS // 4)
    seeds = list(range(MIN_ROWS))
    cond = tiny_policy.encode_prompts(prompts)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x = initial_noise(seeds, tiny_policy.latent_shape)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = tiny_policy.velocity(x, torch.full((MIN_ROWS,), float(t) / 1000), cond)
            x = scheduler.step(v, t, x).prev_sample
    ours = sample(tiny_policy, prompts, seeds, steps=10, solver="euler", shift=3.0)
    assert (ours.x0 - x).abs().max() < 1e-5


def test_seed_alone_equals_seed_inside_a_batch_of_96(tiny_policy):
    prompts = ["a red circle", "three triangles", "a green square and a blue triangle"] * 32
    seeds = list(range(100, 196))
    batch = sample(tiny_policy, prompts, seeds, steps=10)
    for i in [0, 41, 95]:
        alone = sample(tiny_policy, [prompts[i]], [seeds[i]], steps=10)
        assert torch.equal(alone.x0[0], batch.x0[i])  # not merely the same uint8 pixels
        assert np.array_equal(alone.images[0], batch.images[i])
    shard = sample(tiny_policy, prompts[40:45], seeds[40:45], steps=10)  # a re-issued shard of 5
    assert torch.equal(shard.x0, batch.x0[40:45])
    assert batch.images.shape == (96, 32, 32, 3) and batch.images.dtype == np.uint8


def test_batch_size_changes_results_only_by_float_rounding(tiny_policy):
    prompts, seeds = ["a blue cross"] * 6, list(range(6))
    whole = sample(tiny_policy, prompts, seeds, steps=4, solver="dpm2")
    chunked = sample(tiny_policy, prompts, seeds, steps=4, solver="dpm2", batch_size=4)
    # CPU GEMMs may round differently for other row counts; a pixel may then move by one level
    assert (whole.x0 - chunked.x0).abs().max() < 1e-4  # measured 5e-5 in CI (2 threads)
    assert np.abs(whole.images.astype(int) - chunked.images.astype(int)).max() <= 1


def test_dpm2_first_step_from_pure_noise_is_euler_and_last_step_returns_x0():
    x, x0_hat = torch.randn(2, 3), torch.randn(2, 3)
    v = x - x0_hat  # at t = 1, x0_hat = x - v
    assert torch.allclose(dpm2_step(x, x0_hat, None, None, 1.0, 0.8), x + (0.8 - 1.0) * v, atol=1e-6)
    assert torch.equal(dpm2_step(x, x0_hat, torch.randn(2, 3), 0.5, 0.2, 0.0), x0_hat)


def test_dpm2_second_order_on_a_hand_computed_step():
    # t_prev = 0.8, t = 0.5, t_next = 0.2: lambda = log((1-t)/t)
    lam = lambda t: np.log((1 - t) / t)  # noqa: E731
    h, h_prev = lam(0.2) - lam(0.5), lam(0.5) - lam(0.8)
    r = h_prev / h
    x, x0, x0_prev = torch.tensor([1.0]), torch.tensor([0.4]), torch.tensor([0.1])
    d = 0.4 + (0.4 - 0.1) / (2 * r)
    expected = (0.2 / 0.5) * 1.0 - (1 - 0.2) * np.expm1(-h) * d
    assert dpm2_step(x, x0, x0_prev, 0.8, 0.5, 0.2).item() == pytest.approx(expected, rel=1e-6)


def test_dpm2_and_euler_converge_to_the_same_images_with_many_steps(tiny_policy):
    prompts, seeds = ["a yellow circle", "two squares"], [5, 6]
    euler = sample(tiny_policy, prompts, seeds, steps=60, solver="euler").x0
    dpm2 = sample(tiny_policy, prompts, seeds, steps=60, solver="dpm2").x0
    coarse = sample(tiny_policy, prompts, seeds, steps=6, solver="euler").x0
    assert (dpm2 - euler).abs().mean() < 0.5 * (coarse - euler).abs().mean()


def test_sampler_errors_name_the_problem(tiny_policy):
    with pytest.raises(ValueError, match="solver must be one of"):
        sample(tiny_policy, ["a circle"], [0], steps=2, solver="heun")
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(tiny_policy, ["a circle"], [0, 1], steps=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(tiny_policy, ["a circle"], [0], steps=0)
