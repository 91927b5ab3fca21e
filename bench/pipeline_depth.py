"""What algorithm.pipeline_depth 1 costs in learning against 0: the main job (recipes/tiny_solrl.yaml) run
twice with the same seeds, differing only in that key.

With depth 1 the rollout workers explore step t+1's pool with step t's weights while the learners regenerate
and train step t, so each step's best / worst selection comes from a pool one weight version old; the
regeneration and the update use the current weights (README, "Placement and pipelining"). Reported per
depth: the main job's before / after evaluation (held-out `eval/` and trained-prompt `eval_train/` probes,
with standard errors), the mean training reward of the first and last 5 steps, the ranking fidelity of the
explore pool against its regeneration (`explore/spearman_vs_regen`, mean over steps), the staleness, the
part of exploring that training did not hide (`time/explore_wait`) and the step's phase seconds.

Run:   python bench/pipeline_depth.py                      (both runs, one after another: ~45 min on 2 cores)
       python bench/pipeline_depth.py --runs DIR0 DIR1     (summarise finished runs of depth 0 and 1)
Results: bench/results/pipeline_depth.json and .png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, not an installed copy's
from solray.tracking import read_metrics  # noqa: E402

PROBES = ["eval/strict", "eval/tiny_alignment", "eval_train/strict", "eval_train/tiny_alignment"]
WINDOW = 5  # steps averaged at the start and the end of training


def run(depth: int, output_dir: Path) -> float:
    """The main job with algorithm.pipeline_depth `depth`; its wall seconds."""
    command = [sys.executable, "-m", "solray.cli", "train", "recipes/tiny_solrl.yaml", f"algorithm.pipeline_depth={depth}"]
    command += [f"run.output_dir={output_dir}", "run.resume=never", "logging.progress=false"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - started


def summary(output_dir: Path) -> dict:
    """One run's figures from its metrics.jsonl and eval.jsonl."""
    steps, evals = read_metrics(output_dir / "metrics.jsonl"), read_metrics(output_dir / "eval.jsonl")
    before, after = evals[0], evals[-1]
    reward = [row["reward/tiny_alignment"] for row in steps]
    phases = [sum(v for k, v in row.items() if k.startswith("time/") and k not in ("time/requantize", "time/explore")) for row in steps]
    return {
        "steps": len(steps),
        "eval": {p: {"before": before[p], "after": after[p], "before_se": before[f"{p}_se"], "after_se": after[f"{p}_se"]} for p in PROBES},
        "reward_first_steps": float(np.mean(reward[:WINDOW])),
        "reward_last_steps": float(np.mean(reward[-WINDOW:])),
        "reward_per_step": reward,
        "spearman_vs_regen_mean": float(np.mean([row["explore/spearman_vs_regen"] for row in steps])),
        "spearman_vs_regen_per_step": [row["explore/spearman_vs_regen"] for row in steps],
        "staleness_mean": float(np.mean([row["explore/staleness"] for row in steps])),
        # depth 1 only, from step 2 (step 1 explores its own pool)
        "explore_wait_s_mean": float(np.mean(waits))
        if (waits := [row["time/explore_wait"] for row in steps if "time/explore_wait" in row])
        else None,
        "phase_s_per_step_median": float(np.median(phases)),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for depth, run_summary in result["runs"].items():
        axes[0].plot(run_summary["reward_per_step"], label=f"pipeline_depth {depth}")
        axes[1].plot(run_summary["spearman_vs_regen_per_step"], label=f"pipeline_depth {depth}")
    axes[0].set(xlabel="step", ylabel="training reward (tiny_alignment, regenerated)", title="reward per step")
    axes[1].set(xlabel="step", ylabel="Spearman, explore pool vs regeneration", title="ranking fidelity")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs=2, metavar=("DEPTH0_DIR", "DEPTH1_DIR"), help="summarise these finished runs")
    parser.add_argument("--work", default=os.path.join(REPO, "outputs", "pipeline_depth"), help="where the runs write")
    parser.add_argument("--out", default=str(REPO / "bench/results/pipeline_depth.json"))
    args = parser.parse_args()
    walls = {}
    if args.runs:
        dirs = [Path(d) for d in args.runs]
    else:
        dirs = [Path(args.work) / f"depth{depth}" for depth in (0, 1)]
        walls = {str(depth): run(depth, d) for depth, d in enumerate(dirs)}
    result = {
        "recipe": "recipes/tiny_solrl.yaml (run seed 0), algorithm.pipeline_depth 0 and 1",
        "runs": {str(depth): summary(d) | ({"wall_s": walls[str(depth)]} if walls else {}) for depth, d in enumerate(dirs)},
        "machine": {"cpus": os.cpu_count()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for depth, s in result["runs"].items():
        evals = ", ".join(f"{p} {e['before']:.3f} -> {e['after']:.3f}" for p, e in s["eval"].items())
        print(
            f"depth {depth}: {evals}; reward {s['reward_first_steps']:.3f} -> {s['reward_last_steps']:.3f}; "
            f"spearman {s['spearman_vs_regen_mean']:.2f}; explore_wait {s['explore_wait_s_mean']} s"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
