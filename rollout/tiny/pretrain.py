"""Pretrain the tiny testbed policy on the procedural world (`solray pretrain-tiny`).

Rectified flow: x_t = (1 - t) x0 + t eps with t ~ logit-normal(0, 1) (as SD3 trains), the
transformer and the text encoder learn v = eps - x0 jointly by MSE. Tasks are drawn in
proportion to integer weights (uniform by default), then a prompt of the task, then a fresh
ground-truth render. The saved weights are an EMA of
the training weights. Deterministic for a given seed and thread count.

guidance > 1 bakes classifier-free guidance into the model (model guidance, Tang et al. 2025,
"Diffusion Models without Classifier-free Guidance"): a fraction `uncond_prob` of prompts is
replaced by the empty prompt, and conditional samples regress onto
    v* = (eps - x0) + (1 - 1 / guidance) * sg(v(x_t, c) - v(x_t, empty)),
whose fixed point is v = v_empty + guidance * (v_cond - v_empty): sampling at CFG 1.0 (the eval
protocol) draws what CFG at `guidance` would.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rollout.tiny.model import SHIFT, TinyPolicy, build_text_encoder, build_tokenizer, build_transformer
from rollout.tiny.world import ALL_PROMPTS, TASKS, render

PROMPTS_BY_TASK = {task: [p for p, parsed in ALL_PROMPTS.items() if parsed.task == task] for task in TASKS}


def task_pool(task_weights: dict[str, int] | None) -> tuple[str, ...]:
    """Each task repeated by its weight; drawing uniformly from the pool draws tasks in proportion."""
    weights = {task: 1 for task in TASKS} | (task_weights or {})
    unknown = sorted(set(weights) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in task weights; tasks are {list(TASKS)}")
    bad = {task: w for task, w in weights.items() if not isinstance(w, int) or w < 0}
    if bad or not any(weights.values()):
        raise ValueError(f"task weights must be non-negative integers, not all zero; got {weights}")
    return tuple(task for task in TASKS for _ in range(weights[task]))


def training_batch(rng: np.random.Generator, batch_size: int, tasks: tuple[str, ...] = TASKS) -> tuple[list[str], np.ndarray]:
    drawn = [tasks[k] for k in rng.integers(len(tasks), size=batch_size)]
    prompts = [PROMPTS_BY_TASK[task][int(rng.integers(len(PROMPTS_BY_TASK[task])))] for task in drawn]
    images = np.stack([render(p, int(s)) for p, s in zip(prompts, rng.integers(2**31, size=batch_size))])
    return prompts, images


def model_guidance_target(flow_target: torch.Tensor, v_cond: torch.Tensor, v_empty: torch.Tensor, guidance: float) -> torch.Tensor:
    """v* = (eps - x0) + (1 - 1/w) (v_cond - v_empty); its fixed point is v_empty + w (E[eps - x0 | c] - v_empty)."""
    return flow_target + (1 - 1 / guidance) * (v_cond - v_empty)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain_tiny(
    out_dir: str | Path,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    save_every: int = 0,
    init: str | Path | None = None,
    guidance: float = 1.0,
    uncond_prob: float = 0.1,
    task_weights: dict[str, int] | None = None,
    progress: bool = True,
) -> list[float]:
    """Train (from scratch, or on from the policy saved at `init`) and save the EMA weights to out_dir.

    Also saves out_dir/step-N every save_every steps. Returns the per-step training loss.
    """
    out_dir = Path(out_dir)
    tasks = task_pool(task_weights)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    noise_generator = torch.Generator().manual_seed(seed)
    if init is None:
        tokenizer = build_tokenizer()
        policy = TinyPolicy(build_transformer(), build_text_encoder(tokenizer), tokenizer, SHIFT)
    else:
        policy = TinyPolicy.from_pretrained(init)
    modules = [policy.transformer, policy.text_encoder]
    params = [p for m in modules for p in m.parameters()]
    for module in modules:
        module.train().requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pretrain-tiny", disable=not progress)
    for step in bar:
        prompts, images = training_batch(rng, batch_size, tasks)
        x0 = TinyPolicy.encode_images(images)
        eps = torch.randn(x0.shape, generator=noise_generator)
        t = torch.sigmoid(torch.randn(batch_size, generator=noise_generator))
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        target = eps - x0
        if guidance != 1.0:
            unconditional = torch.rand(batch_size, generator=noise_generator) < uncond_prob
            prompts = ["" if drop else prompt for prompt, drop in zip(prompts, unconditional.tolist())]
        v = policy.velocity(x_t, t, policy.text_embeddings(policy.tokenize(prompts)))
        if guidance != 1.0:
            with torch.no_grad():
                v_empty = policy.velocity(x_t, t, policy.text_embeddings(policy.tokenize([""] * batch_size)))
            guided = model_guidance_target(target, v.detach(), v_empty, guidance)
            target = torch.where(unconditional[:, None, None, None], target, guided)
        loss = torch.nn.functional.mse_loss(v, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=min(200, steps // 10 + 1))
        optimizer.step()
        # EMA warm-up (as diffusers' EMAModel): early snapshots are not dominated by the random init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, param in zip(ema, params):
                shadow.lerp_(param, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if save_every and (step + 1) % save_every == 0:
            _save_ema(policy, params, ema, out_dir / f"step-{step + 1}")
    _save_ema(policy, params, ema, out_dir)
    return losses


def _save_ema(policy: TinyPolicy, params: list[torch.nn.Parameter], ema: list[torch.Tensor], path: Path) -> None:
    with torch.no_grad():
        live = [p.detach().clone() for p in params]
        for param, shadow in zip(params, ema):
            param.copy_(shadow)
        policy.save_pretrained(path)
        for param, saved in zip(params, live):
            param.copy_(saved)
