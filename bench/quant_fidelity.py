"""NVFP4 explore fidelity and cost on the tiny testbed; writes bench/results/quant_fidelity.json and .png.

Protocol (DESIGN.md sections 1 and 9; issue 4 items 4, 5, 7)
  prompts    8 eval prompts, prompt_set("eval")[::3]: every task type
  seeds      N = 96 per prompt, EVAL_SEED_BASE + j, the same in every precision
  sampler    deterministic Euler ODE; explore 6 steps; references with the same solver and steps, and
             with 10 steps (what Sol-RL regenerates with)
  reward     tiny_verifier partial credit (discrete: ties); --reward brightness or jpeg_compressibility
             are continuous and show how much of the rank loss the verifier's ties cause
  metrics    rl.fidelity.fidelity_summary, K = 24: Spearman on average ranks, Kendall tau-b, top-12
             overlap, best/worst agreement; prompts whose 96 rewards are all equal in either run have no
             ranking and are counted as undefined, not averaged
  pairs      nvfp4@6 vs bf16@6 and fp32@6 (the precision effect), bf16@6 vs fp32@6 (bf16 alone),
             nvfp4@6 vs bf16@10 (explore vs Sol-RL's regeneration), bf16@6 vs bf16@10 (steps alone), and
             fp8@6 (sol.explore_precision fp8: E4M3 W8A8 with per-tensor scales on NVFP4's linears) vs
             bf16@6, fp32@6 and bf16@10
  cost       each prompt's 96 x 6-step batch runs in every precision before the next prompt starts
             (interleaved, so machine load hits them alike); ratios of the medians over the 8 prompts
  requantize `quant.requantize` with new full weights (load + fake-quantize weights + the calibration
             loop) against one explore batch of P * N / rollout workers images x 6 steps with the
             default recipe (P = 4, N = 96, 2 workers: 192 images); alternated, medians
  saturation share of quantized-linear inputs above their calibrated amax, over one explore batch
  ablation   (--ablate) which layers hurt: Spearman vs bf16@6 with only one transformer block, or only
             one group of linears (image / context stream x attention q,k,v / attention out / MLP), in
             NVFP4 and the rest in bf16; what keeping one of them in bf16 buys (everything else in
             NVFP4); and the testbed's sensitivity: bf16 with relative Gaussian noise sigma * |v|
             added to every velocity (per-seed noise streams)

coverage   the family's rule (quant.coverage, Sol-RL's skip list and min_dim; for the tiny testbed only the
             image stream's feed-forward) unless --skip / --min-dim / --keep say otherwise; activation
             scaling static (calibrated) or --activation-scaling delayed (Sol-RL's TE recipe)

Run: OMP_NUM_THREADS=1 python bench/quant_fidelity.py [--reward NAME] [--skip REGEX --min-dim N --keep REGEX
     --activation-scaling delayed --out PATH] [--ablate]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from quant import DelayedScaling, NVFP4Linear, quantize_policy, requantize
from rewards import build_reward
from rl.fidelity import fidelity_summary, spearman
from rollout import load_policy
from rollout.policy import Policy
from rollout.samplers import EVAL_SEED_BASE, sample
from rollout.tiny import prompt_set

SEEDS = 96
K = 24
EXPLORE_STEPS = 6
REGEN_STEPS = 10
REQUANT_BATCH = 4 * 96 // 2  # P * N / rollout workers with the default recipe
RUNS = {  # name -> (precision, steps)
    "nvfp4@6": ("nvfp4", EXPLORE_STEPS),
    "fp8@6": ("fp8", EXPLORE_STEPS),
    "bf16@6": ("bf16", EXPLORE_STEPS),
    "fp32@6": ("fp32", EXPLORE_STEPS),
    "bf16@10": ("bf16", REGEN_STEPS),
}
PAIRS = [
    ("nvfp4@6", "bf16@6"), ("nvfp4@6", "fp32@6"), ("bf16@6", "fp32@6"), ("nvfp4@6", "bf16@10"), ("bf16@6", "bf16@10"),
    ("fp8@6", "bf16@6"), ("fp8@6", "fp32@6"), ("fp8@6", "bf16@10"),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ablate", action="store_true", help="also quantize only one block / layer group, or all but one, and measure noise sensitivity"
    )
    parser.add_argument("--requant-repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=96, help="N seeds per prompt (96 for the reported figures)")
    parser.add_argument("--prompts", type=int, default=8, help="eval prompts (8 for the reported figures)")
    parser.add_argument("--reward", default="tiny_verifier", help="reward that ranks the seeds (any registered name)")
    parser.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep matching linears in bf16 in the NVFP4 copy (sol.keep_high_precision); repeat",
    )
    parser.add_argument(
        "--skip", action="append", default=None, metavar="REGEX", help="the skip list in place of the family's (sol.skip_modules); repeat"
    )
    parser.add_argument("--min-dim", type=int, default=None, help="sol.min_dim in place of the family's")
    parser.add_argument("--activation-scaling", choices=("static", "delayed"), default="static", help="sol.activation_scaling")
    parser.add_argument("--amax-history-len", type=int, default=16, help="sol.amax_history_len (delayed scaling)")
    parser.add_argument(
        "--out",
        default=None,
        help="default: bench/results/quant_fidelity.json, or quant_fidelity_REWARD.json for another reward; required with other coverage or scaling",
    )
    args = parser.parse_args()
    if (args.keep or args.skip is not None or args.min_dim is not None or args.activation_scaling != "static") and not args.out:
        parser.error(
            "--keep, --skip, --min-dim and --activation-scaling need --out: runs of other explore copies must not overwrite each other"
        )
    torch.manual_seed(0)
    prompts = prompt_set("eval")[::3][: args.prompts]
    seeds = [EVAL_SEED_BASE + j for j in range(args.seeds)]
    fp32 = load_policy("tiny", precision="fp32")
    policies = {"fp32": fp32, "bf16": load_policy("tiny", precision="bf16")}
    delayed = DelayedScaling(args.amax_history_len) if args.activation_scaling == "delayed" else None
    coverage = {"skip_modules": args.skip, "min_dim": args.min_dim, "keep_patterns": args.keep, "delayed": delayed}
    policies["nvfp4"] = quantize_policy(policies["bf16"], "nvfp4", "emulate", **coverage)
    policies["fp8"] = quantize_policy(policies["bf16"], "fp8", "emulate", **coverage)
    reward = build_reward(args.reward)
    out = Path(
        args.out
        or ("bench/results/quant_fidelity.json" if args.reward == "tiny_verifier" else f"bench/results/quant_fidelity_{args.reward}.json")
    )

    rewards = {name: np.zeros((len(prompts), len(seeds))) for name in RUNS}
    seconds = {name: [] for name in RUNS}
    for p, prompt in enumerate(prompts):
        for name, (precision, steps) in RUNS.items():
            start = time.perf_counter()
            images = sample(policies[precision], [prompt] * len(seeds), seeds, steps).images
            seconds[name].append(time.perf_counter() - start)
            rewards[name][p] = reward.score(images, [prompt] * len(seeds))
        print(f"{prompt!r}: " + ", ".join(f"{name} reward {rewards[name][p].mean():.3f}" for name in RUNS), flush=True)

    fidelity = {f"{a} vs {b}": pair_report(rewards[a], rewards[b], min(K, len(seeds))) for a, b in PAIRS}
    per_image = {name: float(np.median(seconds[name])) / len(seeds) for name in RUNS}
    result = {
        "protocol": {
            "prompts": prompts,
            "seeds": f"{EVAL_SEED_BASE} + j, j < {len(seeds)}",
            "k": K,
            "solver": "euler",
            "reward": args.reward,
        },
        "weights_commit": git_commit("rollout/tiny/weights"),
        "quantization": {
            **{k: v for k, v in policies["nvfp4"].explore_state.to_dict().items() if k not in ("quantized_layers", "kept_layers")},
            "linear_flop_share": linear_flop_share(policies["bf16"], policies["nvfp4"].explore_state.selection.quantized),
        },
        "fidelity": fidelity,
        "rewards": {
            name: {"mean": float(r.mean()), "strict": float((r == 1.0).mean()), "distinct_values": int(np.unique(r).size)}
            for name, r in rewards.items()
        },
        "cpu_cost": {
            "seconds_per_image_6_steps_median": {name: per_image[name] for name in ("nvfp4@6", "fp8@6", "bf16@6", "fp32@6")},
            "nvfp4_over_fp32": per_image["nvfp4@6"] / per_image["fp32@6"],
            "nvfp4_over_bf16": per_image["nvfp4@6"] / per_image["bf16@6"],
            "fp8_over_fp32": per_image["fp8@6"] / per_image["fp32@6"],
            "bf16_over_fp32": per_image["bf16@6"] / per_image["fp32@6"],
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        # before requantize moves the weights; a delayed amax has no fixed value to saturate against
        "saturation": saturation(policies["nvfp4"], prompts[:1] * len(seeds), seeds) if delayed is None else None,
        "requantize": requantize_cost(policies["nvfp4"], fp32, prompts, args.requant_repeats),
    }
    if args.ablate:
        result["ablation"] = ablation(policies["bf16"], prompts, seeds, rewards["bf16@6"], reward)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rewards, prompts, fidelity, args.reward, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("fidelity", "cpu_cost", "requantize")}, indent=2))


def pair_report(explore: np.ndarray, reference: np.ndarray, k: int) -> dict:
    summary = fidelity_summary(torch.from_numpy(explore), torch.from_numpy(reference), k)
    summary["spearman_per_prompt"] = [
        None if np.isnan(v) else round(v, 4) for v in spearman(torch.from_numpy(explore), torch.from_numpy(reference)).tolist()
    ]
    summary["identical_rewards"] = float((explore == reference).mean())
    return summary


def requantize_cost(explore: Policy, source: Policy, prompts: list[str], repeats: int) -> dict:
    """Alternate requantize (new full weights, next version) with one explore batch; medians and their ratio."""
    pairs = [(prompts[i % len(prompts)], EVAL_SEED_BASE + j) for i in range(REQUANT_BATCH // SEEDS) for j in range(SEEDS)]  # 2 prompts x 96
    g = torch.Generator().manual_seed(0)
    base = {k: v for k, v in source.transformer.state_dict().items() if v.is_floating_point()}
    requant_s, load_s, calibrate_s, explore_s = [], [], [], []
    for _ in range(repeats):
        weights = {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v for k, v in base.items()}
        requant_s.append(requantize(explore, weights, explore.explore_state.version + 1))
        timings = explore.explore_state.timings
        load_s.append(timings["load_quantize_weights_s"])
        calibrate_s.append(timings["calibrate_s"])  # 0 without a calibration loop (delayed scaling)
        start = time.perf_counter()
        sample(explore, [p for p, _ in pairs], [s for _, s in pairs], EXPLORE_STEPS)
        explore_s.append(time.perf_counter() - start)
    median = {
        name: float(np.median(values))
        for name, values in [
            ("requantize_s", requant_s),
            ("load_quantize_weights_s", load_s),
            ("calibrate_s", calibrate_s),
            ("explore_batch_s", explore_s),
        ]
    }
    return {
        "explore_batch": f"{len(pairs)} images x {EXPLORE_STEPS} steps (P * N / workers = 4 * 96 / 2)",
        "calibration_images": None if explore.explore_state.calibration is None else explore.explore_state.calibration.num_images,
        **median,
        "requantize_over_explore_batch": median["requantize_s"] / median["explore_batch_s"],
        "all_requantize_s": requant_s,
        "all_explore_batch_s": explore_s,
    }


@torch.no_grad()
def saturation(explore: Policy, prompts: list[str], seeds: list[int]) -> dict:
    """Over one explore batch: per quantized linear, the share of input values beyond the calibrated amax."""
    counts: dict[str, list[float]] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].abs()
            stats = counts.setdefault(name, [0, 0, 0.0])
            stats[0] += int((x > module.input_amax).sum())
            stats[1] += x.numel()
            stats[2] = max(stats[2], float(x.max() / module.input_amax))

        return record

    layers = {name: m for name, m in explore.transformer.named_modules() if isinstance(m, NVFP4Linear)}
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        sample(explore, prompts, seeds, EXPLORE_STEPS)
    finally:
        for handle in handles:
            handle.remove()
    above = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    worst = max(counts, key=lambda name: counts[name][2])
    return {
        "batch": f"{len(seeds)} images x {EXPLORE_STEPS} steps of {prompts[0]!r}",
        "values_above_amax": above / total,
        "layers_with_values_above_amax": sum(c[0] > 0 for c in counts.values()),
        "layers": len(counts),
        "largest_max_over_amax": {"layer": worst, "ratio": counts[worst][2]},
    }


# Layer groups of an SD3 (MMDiT) block: the image stream and the context (text) stream.
LAYER_GROUPS = {
    "image_attn_qkv": r"attn\.to_[qkv]$",
    "image_attn_out": r"attn\.to_out\.0$",
    "image_mlp": r"\.ff\.net\.",
    "context_attn_qkv": r"attn\.add_[qkv]_proj$",
    "context_attn_out": r"attn\.to_add_out$",
    "context_mlp": r"\.ff_context\.net\.",
    "image_stream": r"attn\.to_[qkv]$|attn\.to_out\.0$|\.ff\.net\.",
    "context_stream": r"attn\.add_[qkv]_proj$|attn\.to_add_out$|\.ff_context\.net\.",
}
NOISE_SIGMAS = (0.01, 0.03, 0.1)


def ablation(bf16: Policy, prompts: list[str], seeds: list[int], reference: np.ndarray, reward) -> dict:
    """Spearman etc. vs bf16@6 for partial NVFP4 copies (only the named linears quantized, or all but them) and for noisy bf16."""
    k = min(K, len(seeds))
    blocks = {f"block_{b}": rf"^transformer_blocks\.{b}\." for b in range(len(bf16.transformer.transformer_blocks))}
    fine_groups = {name: pattern for name, pattern in LAYER_GROUPS.items() if not name.endswith("_stream")}
    result = {}
    variants = [
        ("only", name, rf"^(?!.*(?:{pattern}))") for name, pattern in (blocks | LAYER_GROUPS).items()
    ]  # keep what `pattern` does not match
    variants += [("without", name, pattern) for name, pattern in (blocks | fine_groups).items()]  # keep what it matches
    for kind, name, keep in variants:
        explore = quantize_policy(bf16, "nvfp4", "emulate", keep_patterns=(keep,))
        selection = explore.explore_state.selection
        rewards = np.stack(
            [reward.score(sample(explore, [p] * len(seeds), seeds, EXPLORE_STEPS).images, [p] * len(seeds)) for p in prompts]
        )
        summary = fidelity_summary(torch.from_numpy(rewards), torch.from_numpy(reference), k)
        result[f"nvfp4_{kind}_{name}"] = {
            "quantized_layers": len(selection.quantized),
            "linear_flop_share": linear_flop_share(bf16, selection.quantized),
            **summary,
        }
        what = f"only {name} in NVFP4" if kind == "only" else f"all but {name} in NVFP4"
        print(f"{what} ({len(selection.quantized)} linears): Spearman {summary['spearman']:.4f}", flush=True)
    for sigma in NOISE_SIGMAS:
        rewards = np.stack(
            [
                reward.score(sample(NoisyVelocity(bf16, seeds, sigma), [p] * len(seeds), seeds, EXPLORE_STEPS).images, [p] * len(seeds))
                for p in prompts
            ]
        )
        summary = fidelity_summary(torch.from_numpy(rewards), torch.from_numpy(reference), k)
        result[f"bf16_velocity_noise_{sigma}"] = summary
        print(f"bf16 + {sigma} relative velocity noise: Spearman {summary['spearman']:.4f}", flush=True)
    return result


class NoisyVelocity:
    """bf16 policy whose velocity gets sigma * |v| relative Gaussian noise; sample-call-scoped (one batch of `seeds`)."""

    def __init__(self, policy: Policy, seeds: list[int], sigma: float) -> None:
        self.policy, self.seeds, self.sigma, self.calls = policy, seeds, sigma, 0

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        from rollout.samplers import step_noise

        v = self.policy.velocity(x_t, t, cond).float()
        # per (seed, step) streams; the sampler pads small calls with copies of the last row (rollout.samplers.MIN_ROWS)
        seeds = self.seeds + self.seeds[-1:] * (len(v) - len(self.seeds))
        noise = step_noise(seeds, 1000 + self.calls, self.policy.latent_shape)
        self.calls += 1
        scale = self.sigma * v.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
        return v + scale.view(-1, 1, 1, 1) * noise


@torch.no_grad()
def linear_flop_share(policy: Policy, names: list[str]) -> float:
    """Share of the transformer's linear-layer FLOPs (rows x in x out, one forward) that the named linears do."""
    flops: dict[str, int] = {}

    def hook(name):
        return lambda module, inputs, output: flops.__setitem__(
            name, inputs[0].numel() // module.in_features * module.in_features * module.out_features
        )

    handles = [m.register_forward_hook(hook(n)) for n, m in policy.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        x = torch.zeros(1, *policy.latent_shape)
        policy.velocity(x, torch.tensor([0.5]), policy.encode_prompts(["a red circle"]))
    finally:
        for handle in handles:
            handle.remove()
    return sum(flops[n] for n in names) / sum(flops.values())


def plot(rewards: dict[str, np.ndarray], prompts: list[str], fidelity: dict, reward_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    # the verifier's partial credit is discrete: jitter so that coinciding points stay visible
    jitter = 0.02 if reward_name == "tiny_verifier" else 0.0
    low = min(float(r.min()) for r in rewards.values())
    high = max(float(r.max()) for r in rewards.values())
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    for ax, reference in zip(axes, ("bf16@6", "bf16@10")):
        x_all, y_all = rewards[reference], rewards["nvfp4@6"]
        for p, prompt in enumerate(prompts):
            x = x_all[p] + rng.uniform(-jitter, jitter, x_all.shape[1])
            y = y_all[p] + rng.uniform(-jitter, jitter, x_all.shape[1])
            ax.scatter(x, y, s=9, alpha=0.45, label=prompt)
        ax.plot([low, high], [low, high], color="gray", lw=0.8, ls="--")
        report = fidelity[f"nvfp4@6 vs {reference}"]
        ax.set_title(
            f"NVFP4 (6 steps) vs {reference.replace('@', ', ')} steps\nSpearman {report['spearman']:.3f}, top-{report['topk']} overlap {report['topk_overlap']:.3f}"
        )
        ax.set_xlabel(f"{reference} reward ({reward_name}{', jittered' if jitter else ''})")
        ax.set_aspect("equal")
    axes[0].set_ylabel(f"NVFP4 explore reward{' (jittered)' if jitter else ''}")
    axes[1].legend(fontsize=7, loc="lower right", markerscale=2)
    fig.suptitle(f"Same seeds ({x_all.shape[1]} per prompt x {len(prompts)} eval prompts), deterministic Euler ODE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit(path: str) -> str | None:
    try:
        return (
            subprocess.run(["git", "log", "-1", "--format=%h %cI", "--", path], capture_output=True, text=True, check=True).stdout.strip()
            or None
        )
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
