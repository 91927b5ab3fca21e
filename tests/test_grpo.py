import math
import random

import pytest
import torch

from rl.grpo import gaussian_kl, grpo_kl, grpo_loss
from rollout.sde import (
    Trajectory,
    cps_log_prob,
    cps_step,
    sample_trajectory,
    sde_log_prob,
    sde_step,
    sde_window,
    step_log_prob,
)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor([[value]])


def test_sde_step_by_hand():
    # sigma = 0.5 sqrt(0.5 / 0.5) = 0.5, dt = -0.25
    # mean = 1 + [2 + 0.25 / 1 * (1 + 0.5 * 2)] * -0.25 = 0.375, std = 0.5 * sqrt(0.25) = 0.25
    x_next, mean, std = sde_step(scalar(1.0), scalar(2.0), 0.5, 0.25, noise_level=0.5, noise=scalar(2.0))
    torch.testing.assert_close(mean, scalar(0.375))
    torch.testing.assert_close(std.reshape(()), torch.tensor(0.25))
    torch.testing.assert_close(x_next, scalar(0.875))


def test_sde_step_at_t_one_uses_the_second_sigma():
    # 1 - t = 0: sigma = 0.7 sqrt(1 / (1 - t_next)) = 1.4; mean = 1 + [1 + 1.96 / 2 * (1 + 0)] * -0.25 = 0.505
    x_next, mean, std = sde_step(scalar(1.0), scalar(1.0), 1.0, 0.75, noise_level=0.7, noise=scalar(0.0))
    torch.testing.assert_close(mean, scalar(0.505))
    torch.testing.assert_close(std.reshape(()), torch.tensor(0.7))
    assert torch.equal(x_next, mean)


def test_sde_step_matches_flow_grpo_arrangement():
    # Flow-GRPO writes mean = x (1 + s^2 / (2t) dt) + v (1 + s^2 (1 - t) / (2t)) dt.
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t, t_next, a = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1]), 0.7
    x_next, mean, std = sde_step(x, v, t, t_next, a, noise)
    tb, dtb = t.view(-1, 1, 1, 1), (t_next - t).view(-1, 1, 1, 1)
    s = a * torch.sqrt(tb / (1 - tb))
    reference = x * (1 + s**2 / (2 * tb) * dtb) + v * (1 + s**2 * (1 - tb) / (2 * tb)) * dtb
    torch.testing.assert_close(mean, reference)
    torch.testing.assert_close(x_next, reference + s * torch.sqrt(-dtb) * noise)


def test_sde_step_without_noise_level_is_euler():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    x_next, mean, std = sde_step(x, v, 0.6, 0.4, noise_level=0.0, noise=torch.randn(2, 3))
    torch.testing.assert_close(x_next, x + (0.4 - 0.6) * v)
    assert (std == 0).all()


def test_sde_log_prob_is_the_normal_density_averaged_over_dims():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0]).view(-1, 1, 1, 1)
    x_next = mean + std * torch.randn(3, 2, 4, 4, generator=g)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(sde_log_prob(x_next, mean, std), expected)


def test_cps_step_by_hand():
    # x0_hat = 1 - 0.5 * 2 = 0, x1_hat = 1 + 0.5 * 2 = 2
    # mean = 0.75 * 0 + 0.25 cos(pi/4) * 2, std = 0.25 sin(pi/4)
    x_next, mean, std = cps_step(scalar(1.0), scalar(2.0), 0.5, 0.25, noise_level=0.5, noise=scalar(1.0))
    c = math.cos(math.pi / 4)
    torch.testing.assert_close(mean, scalar(0.5 * c))
    torch.testing.assert_close(std.reshape(()), torch.tensor(0.25 * c))
    torch.testing.assert_close(x_next, scalar(0.5 * c + 0.25 * c))


def test_cps_preserves_the_coefficients_of_x0_and_noise():
    # With the exact velocity v = eps - x0, x_next = (1 - t') x0 + t' (cos eps + sin xi): a unit-variance noise mix.
    g = torch.Generator().manual_seed(2)
    x0, eps, xi = (torch.randn(2, 8, generator=g) for _ in range(3))
    t, t_next, eta = 0.8, 0.5, 0.6
    x_t = (1 - t) * x0 + t * eps
    x_next, _, _ = cps_step(x_t, eps - x0, t, t_next, eta, xi)
    angle = eta * math.pi / 2
    torch.testing.assert_close(x_next, (1 - t_next) * x0 + t_next * (math.cos(angle) * eps + math.sin(angle) * xi))


def test_cps_without_noise_level_is_euler():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    x_next, _, _ = cps_step(x, v, 0.6, 0.4, noise_level=0.0, noise=torch.randn(2, 3))
    torch.testing.assert_close(x_next, x + (0.4 - 0.6) * v)


def test_cps_log_prob_is_negative_mse():
    torch.testing.assert_close(cps_log_prob(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])), torch.tensor([-2.5]))


def test_step_functions_accept_per_sample_timesteps():
    x, v, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for step in (sde_step, cps_step):
        batched = step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.2]), 0.7, noise)[0]
        torch.testing.assert_close(batched[0], step(x[:1], v[:1], 0.9, 0.7, 0.7, noise[:1])[0][0])
        torch.testing.assert_close(batched[1], step(x[1:], v[1:], 0.5, 0.2, 0.7, noise[1:])[0][0])


def test_gaussian_kl_by_hand():
    kl = gaussian_kl(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0]]))
    torch.testing.assert_close(kl, torch.tensor([(1 / 8 + 4 / 8) / 2]))


def test_grpo_kl_divides_by_sigma_t_for_the_sde_and_by_the_step_std_for_cps():
    mean, mean_ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    _, _, sde_std = sde_step(mean, mean, 0.5, 0.25, noise_level=0.5, noise=torch.zeros(1, 2))  # sigma_t 0.5, std 0.25
    torch.testing.assert_close(grpo_kl("sde", mean, mean_ref, sde_std, 0.5, 0.25), torch.tensor([(1 + 4) / (2 * 0.25) / 2]))
    _, _, cps_std = cps_step(mean, mean, 0.5, 0.25, noise_level=1.0, noise=torch.zeros(1, 2))  # std = t_next = 0.25
    torch.testing.assert_close(grpo_kl("cps", mean, mean_ref, cps_std, 0.5, 0.25), torch.tensor([(1 + 4) / (2 * 0.0625) / 2]))


def test_grpo_loss_by_hand():
    logp_old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    adv = torch.tensor([2.0, -2.0, 10.0])
    loss = grpo_loss(logp, logp_old, adv, clip_range=0.2, adv_clip=5.0, beta_kl=0.0)
    # 0: max(-2 * 1.5, -2 * 1.2) = -2.4;  1: max(2 * 0.5, 2 * 0.8) = 1.6;  2: A clipped to 5, ratio 1 -> -5
    torch.testing.assert_close(loss, torch.tensor([-2.4, 1.6, -5.0]))
    with_kl = grpo_loss(logp, logp_old, adv, kl=torch.tensor([1.0, 2.0, 3.0]), clip_range=0.2, beta_kl=0.5)
    torch.testing.assert_close(with_kl, loss + torch.tensor([0.5, 1.0, 1.5]))


def test_grpo_loss_gradient_is_the_policy_gradient_at_ratio_one():
    logp = torch.zeros(2, requires_grad=True)
    grpo_loss(logp, torch.zeros(2), torch.tensor([1.5, -0.5]), beta_kl=0.0).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.5, 0.5]))


def test_grpo_loss_clipped_ratio_has_no_gradient():
    logp = torch.log(torch.tensor([1.5])).requires_grad_(True)
    grpo_loss(logp, torch.zeros(1), torch.tensor([2.0]), clip_range=0.2, beta_kl=0.0).sum().backward()
    assert logp.grad.item() == 0.0


def _velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x + t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_trajectory_log_probs_recompute_exactly(method):
    g = torch.Generator().manual_seed(3)
    timesteps = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    x1 = torch.randn(2, 1, 2, 2, generator=g)
    noise = torch.randn(4, 2, 1, 2, 2, generator=g)
    traj = sample_trajectory(_velocity, x1, timesteps, noise, noise_level=0.7, method=method)
    assert traj.latents.shape == (5, 2, 1, 2, 2) and traj.log_probs.shape == (4, 2)
    assert torch.equal(traj.latents[0], x1)
    for i in range(traj.num_steps):
        x, t = traj.latents[i], timesteps[i]
        logp, _, _ = step_log_prob(method, x, _velocity(x, t.expand(2)), traj.latents[i + 1], t, timesteps[i + 1], 0.7)
        torch.testing.assert_close(logp, traj.log_probs[i])
    expected_steps = [0, 1, 2, 3] if method == "sde" else [0, 1, 2]  # CPS's step into t = 0 is deterministic
    assert traj.stochastic_steps().tolist() == expected_steps


def test_trajectory_index_and_validation():
    traj = sample_trajectory(_velocity, torch.randn(3, 1, 2, 2), torch.tensor([1.0, 0.5, 0.0]), torch.randn(2, 3, 1, 2, 2))
    sub = traj.index(torch.tensor([True, False, True]))
    assert sub.latents.shape == (3, 2, 1, 2, 2) and torch.equal(sub.log_probs, traj.log_probs[:, [0, 2]])
    with pytest.raises(ValueError, match="inconsistent"):
        Trajectory(traj.latents, traj.timesteps[:2], traj.log_probs, traj.noise, 0.7)
    with pytest.raises(ValueError, match="sde, cps"):
        Trajectory(traj.latents, traj.timesteps, traj.log_probs, traj.noise, 0.7, method="ode")


@pytest.mark.parametrize("method", ["sde", "cps"])
def test_sde_window_steps_are_stochastic_and_the_others_euler(method):
    # Flow-GRPO's fast sampler: noise level 0 outside the window, where both steps reduce to Euler.
    g = torch.Generator().manual_seed(4)
    timesteps = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    x1, noise = torch.randn(2, 1, 2, 2, generator=g), torch.randn(5, 2, 1, 2, 2, generator=g)
    traj = sample_trajectory(_velocity, x1, timesteps, noise, noise_level=0.7, method=method, window=(1, 3))
    assert traj.stochastic_steps().tolist() == [1, 2] and traj.window == (1, 3)
    for i in range(5):
        x, t = traj.latents[i], timesteps[i]
        v = _velocity(x, t.expand(2))
        if i in (1, 2):
            logp, _, _ = step_log_prob(method, x, v, traj.latents[i + 1], t, timesteps[i + 1], 0.7)
            torch.testing.assert_close(logp, traj.log_probs[i])
            assert not torch.allclose(traj.latents[i + 1], x + (timesteps[i + 1] - t) * v)
        else:
            torch.testing.assert_close(traj.latents[i + 1], x + (timesteps[i + 1] - t) * v)
            assert torch.isnan(traj.log_probs[i]).all()
    assert traj.index(torch.tensor([True, False])).window == (1, 3)


def test_sde_window_start_is_flow_grpos_inclusive_randint():
    # sd3_pipeline_with_logprob_fast.py: start = random.randint(lo, hi - size); end = start + size
    windows = {sde_window(seed, 3, (0, 5)) for seed in range(200)}
    assert windows == {(0, 3), (1, 4), (2, 5)}
    start = random.Random(7).randint(0, 2)
    assert sde_window(7, 3, (0, 5)) == (start, start + 3)
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(0, 6, (0, 5))
