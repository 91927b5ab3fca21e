"""Flow-GRPO's SDE sampler step (Liu et al. 2025) and Coefficients-Preserving Sampling (CPS; Wang &
Yu 2025, arXiv 2509.05952): the stochastic steps, their log-probs, and the recorded chain
(`Trajectory`) that rl.grpo trains on; DESIGN.md section 4.

Flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0. Sampling runs from t = 1 (noise) to 0,
so dt = t_next - t < 0.

Notation
  code            paper
  x, x_next       x_t, x_{t + dt}
  v               v_theta(x_t, t)
  noise_level     a (Flow-GRPO, 0.7) / eta (CPS)
  sigma           sigma_t = a sqrt(t / (1 - t)), the SDE's diffusion coefficient
  mean, std       mu_theta and std of the Gaussian policy pi_theta(x_next | x_t)
                  SDE: std = sigma_t sqrt(-dt);  CPS: std = t_next sin(eta pi / 2)
  x0_hat, x1_hat  CPS's predicted data x_t - t v and predicted noise x_t + (1 - t) v
  logp            log pi_theta(x_next | x_t)

Step functions take t, t_next as floats or [B] tensors, compute in fp32 (as diffusers' schedulers
do), and return x_next, mean in fp32 and std broadcastable against x ([B, 1, ..., 1]).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

METHODS = ("sde", "cps")


def sde_step(
    x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor, noise_level: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_next = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t sqrt(-dt) eps, sigma_t = a sqrt(t / (1 - t))."""
    x, v = x.float(), v.float()
    t, t_next = per_sample(t, x), per_sample(t_next, x)
    dt = t_next - t
    # 1 - t = 0 at t = 1. Flow-GRPO then divides by 1 - sigmas[1], the schedule's second sigma,
    # which is t_next of the step that leaves t = 1: the step stays a pure function of (t, t_next).
    sigma = noise_level * torch.sqrt(t / torch.where(t == 1, 1 - t_next, 1 - t))
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = sigma * torch.sqrt(-dt)
    return mean + std * noise.float(), mean, std


def sde_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, std^2), averaged over all non-batch dims, per sample [B]."""
    x_next, mean, std = x_next.float(), mean.float(), std.float()
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def cps_step(
    x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor, noise_level: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_next = (1 - t') x0_hat + t' cos(eta pi/2) x1_hat + t' sin(eta pi/2) eps: the coefficients of x0 and noise stay (1 - t', t')."""
    x, v = x.float(), v.float()
    t, t_next = per_sample(t, x), per_sample(t_next, x)
    x0_hat = x - t * v
    x1_hat = x + (1 - t) * v
    # t' cos(.) = sqrt(t'^2 - std^2) of the paper, written so that rounding never takes a negative sqrt.
    mean = (1 - t_next) * x0_hat + t_next * math.cos(noise_level * math.pi / 2) * x1_hat
    std = t_next * math.sin(noise_level * math.pi / 2)
    return mean + std * noise.float(), mean, std


def cps_log_prob(x_next: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """-mean((x_next - mean)^2) per sample [B]: the CPS reference code drops the Gaussian's constants and its 1/(2 std^2)."""
    return -((x_next.float() - mean.float()) ** 2).flatten(1).mean(1)


def step_log_prob(
    method: str,
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [B], mean, std) of a recorded transition x -> x_next under the velocity v."""
    _, mean, std = _step_function(method)(x, v, t, t_next, noise_level, torch.zeros_like(x))
    return _log_prob(method, x_next, mean, std), mean, std


@dataclass
class Trajectory:
    """A batch of sampled chains: all a learner needs to recompute log pi(x_{i+1} | x_i) at any step i.

    Layout is time-first, as rollout.samplers.SampleOutput records it.
    """

    latents: torch.Tensor  # [S + 1, B, C, H, W]; latents[0] is the initial noise, latents[S] the sample x0
    timesteps: torch.Tensor  # [S + 1], from 1 to 0
    log_probs: torch.Tensor  # [S, B], log-prob of step i under the sampling policy
    noise: torch.Tensor  # [S, B, C, H, W], eps drawn at step i
    noise_level: float
    method: str = "sde"
    window: tuple[int, int] | None = None  # SDE window [start, end): steps outside it were ODE steps, log-prob NaN

    def __post_init__(self) -> None:
        steps, batch = self.log_probs.shape
        check_method(self.method)
        if (
            self.latents.shape[:2] != (steps + 1, batch)
            or self.timesteps.shape != (steps + 1,)
            or self.noise.shape != self.latents[1:].shape
        ):
            raise ValueError(
                f"inconsistent trajectory: latents {tuple(self.latents.shape)}, timesteps {tuple(self.timesteps.shape)}, "
                f"log_probs {tuple(self.log_probs.shape)}, noise {tuple(self.noise.shape)}"
            )

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[0]

    def index(self, samples: torch.Tensor | slice) -> Trajectory:
        """The same chains for a subset of the batch."""
        return Trajectory(
            self.latents[:, samples],
            self.timesteps,
            self.log_probs[:, samples],
            self.noise[:, samples],
            self.noise_level,
            self.method,
            self.window,
        )

    def stochastic_steps(self) -> torch.Tensor:
        """Indices of steps whose transition is random: those in the window (all without one), except
        CPS's step into t = 0, which has std 0 and no log-prob."""
        keep = torch.ones(self.num_steps, dtype=torch.bool) if self.method == "sde" else self.timesteps[1:] > 0
        if self.window is not None:
            inside = torch.zeros_like(keep)
            inside[self.window[0] : self.window[1]] = True
            keep &= inside
        return torch.nonzero(keep).flatten()

    def to(self, device: torch.device | str) -> Trajectory:
        return Trajectory(
            self.latents.to(device),
            self.timesteps.to(device),
            self.log_probs.to(device),
            self.noise.to(device),
            self.noise_level,
            self.method,
            self.window,
        )


def sample_trajectory(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x1: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    noise_level: float = 0.7,
    method: str = "sde",
    window: tuple[int, int] | None = None,
) -> Trajectory:
    """Run the stochastic sampler from x1 = eps over `timesteps` with per-step noise [S, B, ...], recording the chain.

    window [start, end): only those steps are stochastic, the others deterministic Euler steps (the
    SDE and CPS steps at noise level 0) with log-prob NaN, as Flow-GRPO's fast sampler runs them.
    """
    step = _step_function(method)
    latents, log_probs = [x1.float()], []
    for i in range(len(timesteps) - 1):
        x, t, t_next = latents[-1], float(timesteps[i]), float(timesteps[i + 1])
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device))
        if window is None or window[0] <= i < window[1]:
            x_next, mean, std = step(x, v, t, t_next, noise_level, noise[i])
            log_probs.append(_log_prob(method, x_next, mean, std))
        else:
            x_next = x.float() + (t_next - t) * v.float()
            log_probs.append(torch.full((x.shape[0],), torch.nan, device=x.device))
        latents.append(x_next)
    return Trajectory(torch.stack(latents), timesteps, torch.stack(log_probs), noise.float(), noise_level, method, window)


def sde_window(seed: int, size: int, window_range: tuple[int, int]) -> tuple[int, int]:
    """Flow-GRPO's SDE window [start, start + size): start = randint(lo, hi - size), both ends included
    (flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py), drawn from a stream seeded by `seed`."""
    low, high = window_range
    if not 0 < size <= high - low:
        raise ValueError(f"an SDE window of {size} steps does not fit in the range {window_range}")
    start = random.Random(seed).randint(low, high - size)
    return start, start + size


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(METHODS)}")


def _step_function(method: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    check_method(method)
    return sde_step if method == "sde" else cps_step


def _log_prob(method: str, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return sde_log_prob(x_next, mean, std) if method == "sde" else cps_log_prob(x_next, mean)


def per_sample(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor -> fp32 [B or 1, 1, ..., 1] on like's device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1)))
