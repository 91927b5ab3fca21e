"""Stateless flow-matching samplers: seeded noise and Euler / DPM++2M / SDE / CPS sampling on a policy's schedule
(`Policy.sigmas`, rollout.schedules).

Notation (DESIGN.md section 4):
  t, t_next   sigma of this step and the next (1 = noise, 0 = data); dt = t_next - t < 0
  v           model velocity, v = eps - x0
  x0_hat      x0 prediction, x_t - t v
  lambda_t    log((1 - t) / t), the log signal-to-noise ratio DPM-Solver steps in

Every update runs in fp32 whatever the policy's dtype (as diffusers' schedulers do), and the
latents stay fp32 between steps so that both Sol-RL stages walk the same trajectory.
Initial noise for seed s is drawn on CPU from torch.Generator().manual_seed(s), one sample at a
time, so a seed gives the same image alone or inside any batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rollout.policy import Conditioning, Policy
from rollout.sde import Trajectory, sample_trajectory

SOLVERS = ("euler", "dpm2", "sde", "cps")
MIN_ROWS = 16  # the fewest images per model call (see `sample`): measured on AVX2, 1-2 threads, 12 suffice


EVAL_SEED_BASE = 1_000_000  # the evaluation protocol's fixed seeds: EVAL_SEED_BASE + j for the j-th seed of every eval prompt


@dataclass
class SampleOutput:
    x0: torch.Tensor  # final latents [B, C, H, W], fp32
    images: np.ndarray  # uint8 [B, H, W, 3]
    timesteps: torch.Tensor  # [steps + 1], from 1 towards 0
    trajectory: Trajectory | None = None  # stochastic solvers ("sde", "cps") only: what GRPO trains on


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """eps [B, *shape] on CPU in fp32; row i depends on seeds[i] only."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def step_noise(seeds: Sequence[int], step: int, shape: Sequence[int]) -> torch.Tensor:
    """Per-step SDE noise [B, *shape]: a stream per (seed, step), disjoint from the initial noise."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(_mix(int(s), step, 0x5DE)))) for s in seeds])


def _mix(*values: int | np.ndarray) -> np.ndarray:
    """SplitMix64-style hash of integers, elementwise over int arrays: unrelated streams for unrelated inputs (uint64
    arithmetic wraps; a negative value hashes as its two's complement)."""
    z = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):  # the wrap is the hash
        for value in values:
            bits = np.asarray(value, np.int64).astype(np.uint64) if isinstance(value, np.ndarray) else np.uint64(value & 0xFFFFFFFFFFFFFFFF)
            z = (z ^ bits) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0x94D049BB133111EB)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & np.uint64(0x7FFFFFFFFFFFFFFF)


def seed_for(run_seed: int, step: int, prompt_index: int, j: int) -> int:
    """The noise seed of candidate j of prompt prompt_index at iteration step (31 bits, stable across runs)."""
    return int(_mix(run_seed, step, prompt_index, j) & np.uint64(0x7FFFFFFF))


def seeds_for(run_seed: int, step: int, prompt_indices: np.ndarray, js: np.ndarray) -> list[int]:
    """seed_for of many candidates at once: a step's pool is tens of thousands of candidates at scale, and seeding
    them one by one cost the driver 0.1-0.4 s per step."""
    return (_mix(run_seed, step, np.asarray(prompt_indices), np.asarray(js)) & np.uint64(0x7FFFFFFF)).tolist()


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """x_next = x + (t_next - t) v."""
    return x.float() + (t_next - t) * v.float()


def _log_snr(t: float) -> float:
    return float(np.log1p(-t) - np.log(t)) if 0.0 < t < 1.0 else (-np.inf if t >= 1.0 else np.inf)


def dpm2_step(
    x: torch.Tensor, x0_hat: torch.Tensor, prev_x0_hat: torch.Tensor | None, t_prev: float | None, t: float, t_next: float
) -> torch.Tensor:
    """DPM-Solver++(2M) on the x0 prediction: x_next = (t_next/t) x - a_next (e^-h - 1) D, D = x0 + (x0 - x0_prev)/(2r).

    a = 1 - t is the signal coefficient, h = lambda_next - lambda_t, r = h_prev / h. First order (DDIM,
    which equals Euler for flow matching) on the first step, whenever h_prev is infinite (t_prev = 1)
    and on the last step (t_next = 0), as diffusers' lower_order_final does.
    """
    x, x0_hat = x.float(), x0_hat.float()
    if t_next == 0.0:
        return x0_hat
    lam, lam_next = _log_snr(t), _log_snr(t_next)
    h = lam_next - lam
    derivative = x0_hat
    if prev_x0_hat is not None and t_prev is not None and np.isfinite(lam - _log_snr(t_prev)):
        r = (lam - _log_snr(t_prev)) / h
        derivative = x0_hat + (x0_hat - prev_x0_hat.float()) / (2 * r)
    return (t_next / t) * x - (1 - t_next) * float(np.expm1(-h)) * derivative


def sample(
    policy: Policy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    solver: str = "euler",
    shift: float | None = None,
    noise_level: float = 0.7,
    sde_window: tuple[int, int] | None = None,
    cond: Conditioning | None = None,
    adapter: str | None = "current",
    batch_size: int | None = None,
    progress: bool = False,
) -> SampleOutput:
    """Generate one image per (prompt, seed) pair with `steps` solver steps (CFG 1.0: no guidance).

    shift: a static timestep shift in place of the policy's own schedule's (None: the policy's, `Policy.sigmas`).
    sde_window: for "sde" / "cps", the steps [start, end) that are stochastic (None: all).
    adapter: "current" keeps the policy's active LoRA adapter; a name ("old", "policy") or None
    (the reference model, adapters off) runs under that adapter. batch_size splits the forward
    passes to bound memory; it changes results only by float rounding (CPU GEMMs may round
    differently for other row counts).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if len(prompts) != len(seeds):
        raise ValueError(f"sample needs one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    sigmas = policy.sigmas(steps, shift)
    cond = policy.encode_prompts(prompts) if cond is None else cond
    x = initial_noise(seeds, policy.latent_shape).to(policy.device)
    chunk = batch_size or len(seeds)
    trajectory: Trajectory | None = None

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(x_t), chunk):
            stop = min(start + chunk, len(x_t))
            # CPU GEMMs take other kernels or thread splits for under ~12 rows (per-image linears such as the
            # timestep embedding see one row per image), which round differently: small calls are padded
            # with copies of their last row, so that an image does not depend on the size of its batch.
            rows = slice(start, stop) if stop - start >= MIN_ROWS else torch.arange(start, start + MIN_ROWS).clamp(max=stop - 1)
            parts.append(policy.velocity(x_t[rows], t[rows], cond.index(rows)).float()[: stop - start])
        return torch.cat(parts)

    context = policy.adapter(adapter) if adapter != "current" else contextlib.nullcontext()
    with torch.no_grad(), context:
        if solver in ("sde", "cps"):
            noise = torch.stack([step_noise(seeds, i, policy.latent_shape) for i in range(steps)]).to(x.device)
            trajectory = sample_trajectory(velocity, x, sigmas, noise, noise_level, method=solver, window=sde_window)
            x = trajectory.latents[-1]
        else:
            x = ode_solve(velocity, x, sigmas, solver, progress)
    return SampleOutput(x0=x, images=policy.decode(x), timesteps=sigmas, trajectory=trajectory)


def ode_solve(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from x at sigmas[0] to sigmas[-1] with "euler" or "dpm2"."""
    prev_x0_hat: torch.Tensor | None = None
    for i in tqdm(range(len(sigmas) - 1), desc=f"sampling ({solver})", disable=not progress, leave=False):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, torch.full((len(x),), t, device=x.device))
        if solver == "euler":
            x = euler_step(x, v, t, t_next)
        else:
            x0_hat = x - t * v
            x = dpm2_step(x, x0_hat, prev_x0_hat, float(sigmas[i - 1]) if i > 0 else None, t, t_next)
            prev_x0_hat = x0_hat
    return x
