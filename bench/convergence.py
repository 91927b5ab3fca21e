"""Sol-RL's convergence speed-up and QP balancing, measured on the tiny testbed with the real driver.

Every run is `solray.driver.train` on the main job's recipe (recipes/tiny_solrl.yaml) with its actors
in-process (one process, no Ray actors: the runs then share nothing but the machine), probing the
trained prompts every few steps (FULL). Arms differ only where the comparison needs them to:

  speed-up   sol_rl     the recipe as is: explore N seeds per prompt in NVFP4, regenerate the best / worst K
             nft        sol.enabled false: K on-policy samples per prompt (DiffusionNFT)
             random_k   the same pool as sol_rl, K of it chosen at random (sol.selection random)
  qp         the dense reward + brightness + JPEG compressibility, with
             weighted_sum (DiffusionNFT's baseline), qp_marble and qp_normalized (balance.amortized)

Compute is counted in BF16-equivalent linear FLOPs, from each run's recipe: per step
  explore    P N explore_steps F (1 - 3/4 s)   NVFP4 linears cost 1/4 of their BF16 GEMM (as on
                                              Blackwell), s = their share of the linear FLOPs
  regenerate P K steps F
  update     P K n_t (3 + 2) F                v_old, v_ref, v_theta forwards and v_theta's backward
                                              (2 F); n_t timesteps per sample (timestep_fraction)
where F is the transformer's linear FLOPs per image forward (2 x MACs). Rewards and evaluation are
not counted. Wall-clock (this machine, runs one after another) is the second panel.

Speed-up: the baseline's final value is the mean of the nft arm's last 3 evaluations of the probe
metric (eval_train/tiny_alignment, averaged over seeds); an arm's cost is the compute at which its
seed-averaged curve first reaches it (linear interpolation between evaluations); the ratio
C_nft / C_arm of those costs and its 95% interval come from 2000 bootstrap resamples of the seeds. When the
baseline gains less than 2 standard errors over the run, the ratio is reported as "n/a".

Run: python bench/convergence.py speedup | qp [--seeds 0 1 2] [--quick]
Results: bench/results/convergence_<study>.json and .png (--quick: a smoke test, nothing written to bench/results)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from quant_coverage import forward_inputs, linear_flops

from quant.coverage import select_layers
from rl.config import Recipe, load_recipe
from rollout.tiny.model import MAX_TOKENS, TEXT_DIM, build_transformer
from solray.driver import train

RECIPE = Path("recipes/tiny_solrl.yaml")
IN_PROCESS = [
    "cluster.rollout_workers=0",
    "cluster.reward_workers=0",
    "cluster.remote_learners=false",
    "logging.grid_every=0",
    "logging.progress=false",
]
QP_REWARDS = "rewards.models=[{name: tiny_alignment}, {name: brightness}, {name: jpeg_compressibility}]"
STUDIES = {
    "speedup": {"sol_rl": [], "nft": ["sol.enabled=false"], "random_k": ["sol.selection=random"]},
    "qp": {
        "weighted_sum": ["sol.enabled=false", QP_REWARDS, "balance.mode=weighted_sum", "algorithm.nft.beta=0.1"],
        "qp_marble": [
            "sol.enabled=false",
            QP_REWARDS,
            "balance.mode=qp",
            "balance.amortized=marble",
            "balance.solve_every=5",
            "algorithm.nft.beta=0.1",
        ],
        "qp_normalized": [
            "sol.enabled=false",
            QP_REWARDS,
            "balance.mode=qp",
            "balance.amortized=normalized",
            "balance.solve_every=5",
            "algorithm.nft.beta=0.1",
        ],
    },
}
# Sized so that a study of 9 runs takes under 60 minutes on 2 cores. speedup: 15 steps with a probe every 3
# (6 points per curve); qp reads only the first and last probe: 12 steps, a probe every 4 with 8 seeds per
# prompt. The held-out eval (eval/) is not read here, so it gets 1 seed per prompt.
FULL = {
    "speedup": ["run.steps=15", "eval.every=3", "eval.seeds_per_prompt=1"],
    "qp": ["run.steps=12", "eval.every=4", "eval.seeds_per_prompt=1", "eval.train_seeds_per_prompt=8"],
}
QUICK = [
    "run.steps=2",
    "eval.every=1",
    "eval.seeds_per_prompt=1",
    "eval.train_seeds_per_prompt=1",
    "algorithm.prompts_per_step=2",
    "sol.pool_size=8",
    "algorithm.group_size=4",
]
BOOTSTRAP = 2000
# the driver's timers of one training step (time/requantize is inside sync; eval, grid and checkpoint are not training)
STEP_PHASES = ("prompts", "explore", "score", "select", "regen", "rescore", "advantage", "update", "sync")


def linear_flops_per_forward() -> tuple[float, float]:
    """(F, s): the tiny transformer's linear FLOPs per image forward (2 x MACs) and the share its NVFP4 linears do."""
    transformer = build_transformer().to("meta")
    with torch.device("meta"):
        inputs = forward_inputs("sd3", {"in_channels": 3, "pooled_projection_dim": TEXT_DIM}, 32, 1, MAX_TOKENS, TEXT_DIM)
        macs = linear_flops(transformer, inputs)
    quantized = select_layers(transformer, "tiny").quantized
    return 2.0 * sum(macs.values()), sum(macs[n] for n in quantized) / sum(macs.values())


def step_compute(recipe: Recipe, flops: float, nvfp4_share: float) -> float:
    """BF16-equivalent linear FLOPs of one training step of `recipe` (module docstring)."""
    algorithm, sol = recipe.algorithm, recipe.sol
    samples = algorithm.prompts_per_step * algorithm.group_size
    explore = (
        algorithm.prompts_per_step
        * sol.pool_size
        * sol.explore_steps
        * (1 - 0.75 * nvfp4_share if sol.explore_precision == "nvfp4" else 1.0)
        if sol.enabled
        else 0.0
    )
    timesteps = max(1, int(recipe.sampler.steps * algorithm.nft.timestep_fraction))
    update = samples * timesteps * ((3 if algorithm.nft.kl_weight > 0 else 2) + 2)
    return flops * (explore + samples * recipe.sampler.steps + update)


def run_arm(overrides: list[str], seed: int, output_dir: Path) -> dict:
    recipe = load_recipe(RECIPE, [*IN_PROCESS, *overrides, f"run.seed={seed}", f"run.output_dir={output_dir}"])
    start = time.perf_counter()
    result = train(recipe)
    wall = time.perf_counter() - start
    step_seconds = [sum(row.get(f"time/{phase}", 0.0) for phase in STEP_PHASES) for row in result.history]
    return {"recipe": recipe, "evaluations": result.evaluations, "wall_s": wall, "step_seconds": step_seconds}


def curve(evaluations: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    return np.array([row["step"] for row in evaluations]), np.array([row[key] for row in evaluations])


def reach(steps: np.ndarray, values: np.ndarray, target: float) -> float:
    """The (fractional) step at which the curve first reaches target, by linear interpolation; inf if never."""
    for i in range(1, len(values)):
        if values[i] >= target:
            low, high = values[i - 1], values[i]
            fraction = 1.0 if high == low else (target - low) / (high - low)
            return float(steps[i - 1] + max(0.0, min(1.0, fraction)) * (steps[i] - steps[i - 1]))
    return float("inf") if values[0] < target else 0.0


def speedup(runs: dict[str, list[dict]], key: str) -> dict:
    """Compute each arm needs to reach the nft arm's final value, and its ratio to the nft arm's, with a bootstrap interval."""
    rng = np.random.default_rng(0)
    per_step = {arm: rows[0]["compute_per_step"] for arm, rows in runs.items()}
    steps = {arm: curve(rows[0]["evaluations"], key)[0] for arm, rows in runs.items()}
    values = {arm: np.stack([curve(row["evaluations"], key)[1] for row in rows]) for arm, rows in runs.items()}
    baseline = values["nft"]
    gain = baseline[:, -3:].mean(1) - baseline[:, 0]
    gain_se = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float("inf")
    final = baseline.mean(0)[-3:].mean()
    report = {"baseline_final": float(final), "baseline_gain": float(gain.mean()), "baseline_gain_se": float(gain_se), "arms": {}}
    defined = gain.mean() >= 2 * gain_se

    def cost(arm: str, rows: np.ndarray, target: float) -> float:
        return per_step[arm] * reach(steps[arm], values[arm][rows].mean(0), target)

    everyone = {arm: np.arange(len(v)) for arm, v in values.items()}
    boot = [{a: rng.integers(len(v), size=len(v)) for a, v in values.items()} for _ in range(BOOTSTRAP)]
    for arm in runs:
        point = cost(arm, everyone[arm], final)
        ratios = []
        for pick in boot:
            target = values["nft"][pick["nft"]].mean(0)[-3:].mean()
            ratios.append(_ratio(cost("nft", pick["nft"], target), cost(arm, pick[arm], target)))
        low, high = np.nanpercentile(ratios, [2.5, 97.5]) if np.isfinite(ratios).any() else (float("nan"),) * 2
        report["arms"][arm] = {
            "compute_to_reach": point,
            "speedup_vs_nft": _ratio(cost("nft", everyone["nft"], final), point) if defined else "n/a",
            "speedup_95": [float(low), float(high)] if defined else "n/a",
        }
    return report


def _ratio(baseline_cost: float, arm_cost: float) -> float:
    """C_nft / C_arm: > 1 when the arm reaches the target with less compute; 0 when it never does, NaN when
    it starts above the target (no compute needed: no ratio)."""
    if arm_cost == float("inf"):
        return 0.0
    return baseline_cost / arm_cost if arm_cost > 0 else float("nan")


def changes(runs: dict[str, list[dict]], keys: list[str]) -> dict:
    """Per arm and reward: the change from the first to the last evaluation, mean over seeds and a 95% t-interval."""
    report = {}
    for arm, rows in runs.items():
        report[arm] = {}
        for key in keys:
            delta = np.array([row["evaluations"][-1][key] - row["evaluations"][0][key] for row in rows])
            half = 4.303 * delta.std(ddof=1) / np.sqrt(len(delta)) if len(delta) == 3 else float("nan")  # t(0.975, 2)
            report[arm][key] = {
                "change": float(delta.mean()),
                "interval_95": [float(delta.mean() - half), float(delta.mean() + half)],
                "per_seed": delta.tolist(),
            }
        worst = min(keys, key=lambda k: report[arm][k]["change"])
        report[arm]["worst"] = {"reward": worst, **report[arm][worst]}
    return report


def plot(runs: dict[str, list[dict]], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for arm, rows in runs.items():
        values = np.stack([curve(row["evaluations"], key)[1] for row in rows])
        steps = curve(rows[0]["evaluations"], key)[0]
        mean, se = values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros(values.shape[1])
        compute = steps * rows[0]["compute_per_step"] / 1e12
        wall = np.array([np.cumsum([0.0, *row["step_seconds"]])[steps] for row in rows]).mean(0) / 60
        for ax, x in ((axes[0], compute), (axes[1], wall)):
            ax.plot(x, mean, marker=".", label=f"{arm} ({len(rows)} seeds)")
            ax.fill_between(x, mean - se, mean + se, alpha=0.2)
    axes[0].set_xlabel("training compute (BF16-equivalent linear TFLOPs; NVFP4 GEMMs at 1/4)")
    axes[1].set_xlabel("wall-clock minutes of training steps (2 CPU cores, in-process)")
    axes[0].set_ylabel(key)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--quick", action="store_true", help="2 tiny steps per arm and seed: a smoke test; writes into a temporary directory"
    )
    args = parser.parse_args()
    flops, share = linear_flops_per_forward()
    scratch = Path(tempfile.mkdtemp(prefix="convergence-"))
    out_dir = scratch if args.quick else Path("bench/results")
    runs: dict[str, list[dict]] = {}
    for arm, overrides in STUDIES[args.study].items():
        for seed in args.seeds:
            run = run_arm([*overrides, *(QUICK if args.quick else FULL[args.study])], seed, scratch / f"{arm}-{seed}")
            run["compute_per_step"] = step_compute(run.pop("recipe"), flops, share)
            runs.setdefault(arm, []).append(run)
            print(
                f"{arm} seed {seed}: {run['wall_s']:.0f} s, evaluations {[round(row.get('eval_train/tiny_alignment', float('nan')), 3) for row in run['evaluations']]}",
                flush=True,
            )
    key = "eval_train/tiny_alignment"
    result = {
        "study": args.study,
        "seeds": args.seeds,
        "flops_per_forward": flops,
        "nvfp4_linear_share": share,
        "runs": {a: [{k: v for k, v in r.items()} for r in rows] for a, rows in runs.items()},
    }
    if args.study == "speedup":
        result["speedup"] = speedup(runs, key)
    else:
        result["changes"] = changes(runs, [f"eval_train/{name}" for name in ("tiny_alignment", "brightness", "jpeg_compressibility")])
    path = out_dir / f"convergence_{args.study}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, key, path.with_suffix(".png"), f"tiny testbed, {args.study}: {key} on the trained prompts' probe (mean +- SE over seeds)")
    print(json.dumps(result.get("speedup", result.get("changes")), indent=1))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
