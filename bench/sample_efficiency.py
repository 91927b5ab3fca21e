"""What makes the tiny policy learn from few images: single-process NFT / Sol-RL runs with one knob changed at a time.

Each run trains the shipped tiny policy's LoRA (rl.trainer, no Ray) for `iterations` steps on the
testbed curriculum (`prompt_set("curriculum")`, 16 train prompts; P per step, drawn per step), with
training seeds that never meet the probe's, and then probes it: strict verifier accuracy and
tiny_alignment on the curriculum x 16 probe seeds (EVAL_SEED_BASE + j) and on the 24 held-out eval
prompts x 8 seeds, sampled as the eval protocol does (10 Euler steps) with the EMA adapter and
with the trained one. Sol-RL runs explore a pool of N seeds per prompt with an explore copy of the
"old" adapter (nvfp4, emulated, re-quantized every step), score it, and regenerate the best K/2 and
worst K/2 with the fp32 learner (DPM++2M, 10 steps); the others sample K seeds on-policy.

Run: python bench/sample_efficiency.py --runs NAME [NAME ...] [--seeds 0 1 2]   (see RUNS)
Results: bench/results/sample_efficiency.json (one entry per run and seed, merged with earlier ones).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from quant import quantize_policy, requantize
from quant.explore import lora_merged_weights
from rewards import build_reward
from rl.advantages import group_advantages, weighted_reward
from rl.algorithm import Batch
from rl.config import AlgorithmConfig, OptimConfig
from rl.nft import NFT, NFTConfig
from rl.selection import select_contrastive
from rl.trainer import Trainer
from rollout import load_policy
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Policy
from rollout.samplers import EVAL_SEED_BASE, sample, seed_for
from rollout.tiny import prompt_set, verify

OUT = Path("bench/results/sample_efficiency.json")
PROBE_SEEDS = 16
HELD_OUT_SEEDS = 8
STEPS = 10


@dataclass(frozen=True)
class Run:
    """One training configuration (the knobs the sweep turns)."""

    iterations: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-4
    lora_rank: int = 16
    reward: str = "tiny_alignment"  # "a+b": the weighted sum of several
    nft_beta: float = 1.0
    kl_weight: float = 1e-4
    timestep_fraction: float = 0.6
    pool_size: int = 0  # 0: no exploration (the NFT baseline)
    explore_precision: str = "nvfp4"
    explore_steps: int = 6
    selection: str = "best_worst"


BASE = Run()
RUNS = {
    "base": BASE,
    "verifier": replace(BASE, reward="tiny_verifier"),
    "lr1e-3": replace(BASE, lr=1e-3),
    "lr3e-3": replace(BASE, lr=3e-3),
    "lr1e-3_beta0.3": replace(BASE, lr=1e-3, nft_beta=0.3),
    "lr1e-3_p4k16": replace(BASE, lr=1e-3, prompts_per_step=4, group_size=16),
    "lr1e-3_rank4": replace(BASE, lr=1e-3, lora_rank=4),
    "lr1e-3_t0.3": replace(BASE, lr=1e-3, timestep_fraction=0.3),
    "lr1e-3_sol32": replace(BASE, lr=1e-3, pool_size=32),
    "lr1e-3_sol32_random": replace(BASE, lr=1e-3, pool_size=32, selection="random"),
    # the main job's budget: 48 steps of 4 prompts x 8
    "lr3e-3_p4_48": replace(BASE, lr=3e-3, prompts_per_step=4, iterations=48),
    "lr3e-3_p4_48_t0.3_kl0": replace(BASE, lr=3e-3, prompts_per_step=4, iterations=48, timestep_fraction=0.3, kl_weight=0.0),
    "lr3e-3_p4_48_sol32": replace(BASE, lr=3e-3, prompts_per_step=4, iterations=48, pool_size=32),
    "lr3e-3_verifier+alignment": replace(BASE, lr=3e-3, reward="tiny_verifier+tiny_alignment"),
    "lr3e-3_sol32": replace(BASE, lr=3e-3, pool_size=32),
}


def train(run: Run, seed: int) -> tuple[Policy, Trainer, list[dict]]:
    policy = load_policy("tiny")
    policy.add_lora(run.lora_rank, 2.0 * run.lora_rank, init_seed=seed)
    nft = NFT(
        AlgorithmConfig(micro_batch=64, nft=NFTConfig(beta=run.nft_beta, kl_weight=run.kl_weight, timestep_fraction=run.timestep_fraction)),
        policy.sigmas(STEPS),
    )
    trainer = Trainer(policy, optim=OptimConfig(lr=run.lr), seed=seed)
    rewards = [build_reward(name) for name in run.reward.split("+")]
    curriculum = prompt_set("curriculum")
    explore = quantize_policy(policy, run.explore_precision, "emulate") if run.pool_size else None
    rng = np.random.default_rng([seed, 7])
    history = []
    for step in range(run.iterations):
        start = time.perf_counter()
        prompts = [curriculum[i] for i in rng.choice(len(curriculum), run.prompts_per_step, replace=False)]
        seeds = []
        for p, prompt in enumerate(prompts):
            pool = [seed_for(seed, step, p, j) for j in range(run.pool_size or run.group_size)]
            if explore is not None:
                scores = combined(rewards, sample(explore, [prompt] * len(pool), pool, run.explore_steps).images, [prompt] * len(pool))
                generator = torch.Generator().manual_seed(seed_for(seed, step, p, -2))
                pool = [pool[i] for i in select_contrastive(scores, run.group_size, run.selection, generator).tolist()]
            seeds += pool
        flat = [prompt for prompt in prompts for _ in range(run.group_size)]
        out = sample(policy, flat, seeds, STEPS, solver="dpm2", adapter=OLD_ADAPTER)
        scores = combined(rewards, out.images, flat)
        advantages = group_advantages(scores, torch.arange(run.prompts_per_step).repeat_interleave(run.group_size))
        metrics = nft.train_step(trainer, Batch(out.x0, flat, advantages))
        if explore is not None:
            requantize(explore, lora_merged_weights(policy.transformer, OLD_ADAPTER), step + 1)
        history.append(
            {"step": step, "reward": float(scores.mean()), "grad_norm": metrics["train/grad_norm"], "seconds": time.perf_counter() - start}
        )
    return policy, trainer, history


def combined(rewards: list, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """The weighted sum (weights 1) of the rewards, as rl.advantages.weighted_reward forms DiffusionNFT's multi-reward score."""
    table = torch.from_numpy(np.stack([reward.score(images, prompts) for reward in rewards], axis=1)).float()
    return weighted_reward(table, torch.ones(len(rewards)))


@torch.no_grad()
def probe(policy, prompts: list[str], seeds_per_prompt: int, alignment) -> dict:
    seeds = [EVAL_SEED_BASE + j for j in range(seeds_per_prompt)]
    flat = [p for p in prompts for _ in seeds]
    images = sample(policy, flat, seeds * len(prompts), STEPS, solver="euler", adapter=TRAINABLE_ADAPTER, batch_size=96).images
    strict = np.array([verify(image, p) == 1.0 for image, p in zip(images, flat)])
    dense = alignment.score(images, flat)
    n = len(flat)
    return {
        "strict": float(strict.mean()),
        "strict_se": float(strict.std(ddof=1) / np.sqrt(n)),
        "alignment": float(dense.mean()),
        "alignment_se": float(dense.std(ddof=1) / np.sqrt(n)),
    }


def evaluate(policy, trainer, alignment) -> dict:
    """The probe with the trained adapter and with its EMA."""
    result = {}
    for name in ("current", "ema"):
        weights = trainer.ema.swapped_into(trainer.params) if name == "ema" else torch.no_grad()
        with weights:
            result[name] = {
                "curriculum": probe(policy, prompt_set("curriculum"), PROBE_SEEDS, alignment),
                "held_out": probe(policy, prompt_set("eval"), HELD_OUT_SEEDS, alignment),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, choices=sorted(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    alignment = build_reward("tiny_alignment")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    if "before" not in results:
        base = load_policy("tiny")
        base.add_lora(16, 32)
        results["before"] = {
            "curriculum": probe(base, prompt_set("curriculum"), PROBE_SEEDS, alignment),
            "held_out": probe(base, prompt_set("eval"), HELD_OUT_SEEDS, alignment),
        }
    for name in args.runs:
        for seed in args.seeds:
            start = time.perf_counter()
            policy, trainer, history = train(RUNS[name], seed)
            after = evaluate(policy, trainer, alignment)
            results[f"{name}/seed{seed}"] = {
                "run": asdict(RUNS[name]),
                "seed": seed,
                "after": after,
                "train_reward": [h["reward"] for h in history],
                "seconds": time.perf_counter() - start,
            }
            ema, current = after["ema"]["curriculum"], after["current"]["curriculum"]
            print(
                f"{name} seed {seed}: curriculum strict {results['before']['curriculum']['strict']:.3f} -> {current['strict']:.3f} "
                f"(ema {ema['strict']:.3f}), alignment {results['before']['curriculum']['alignment']:.3f} -> {current['alignment']:.3f}; "
                f"held-out strict {after['current']['held_out']['strict']:.3f}; {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
