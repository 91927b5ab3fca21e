"""Benchmarks that CI runs in their smoke-test modes, so that a long run fails only for its own reasons."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "study, arms", [("speedup", {"sol_rl", "nft", "random_k"}), ("qp", {"weighted_sum", "qp_marble", "qp_normalized"})]
)
def test_convergence_bench_quick_mode(study, arms):
    done = subprocess.run(
        [sys.executable, "bench/convergence.py", study, "--quick", "--seeds", "0"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(re.search(r"wrote (\S+\.json)", done.stdout)[1])
    assert not path.is_relative_to(REPO)  # --quick never writes into bench/results
    result = json.loads(path.read_text())
    assert set(result["runs"]) == arms and path.with_suffix(".png").is_file()
    for rows in result["runs"].values():
        assert [row["step"] for row in rows[0]["evaluations"]] == [0, 1, 2] and rows[0]["compute_per_step"] > 0
    if study == "speedup":
        assert set(result["speedup"]["arms"]) == arms
        # Sol-RL explores 2 x 8 seeds in NVFP4 on top of the baseline's work: it costs more per step
        assert result["runs"]["sol_rl"][0]["compute_per_step"] > result["runs"]["nft"][0]["compute_per_step"]
    else:
        assert {"worst", "eval_train/tiny_alignment", "eval_train/brightness"} <= set(result["changes"]["qp_marble"])


def test_convergence_compute_counts_every_forward_and_backward():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import convergence
    finally:
        sys.path.remove(str(REPO / "bench"))
    from rl.config import load_recipe

    flops, share = convergence.linear_flops_per_forward()
    assert share == pytest.approx(0.5657, abs=1e-3)  # bench/results/quant_coverage.json: the tiny rule's NVFP4 share
    recipe = load_recipe(REPO / "recipes/tiny_solrl.yaml", ["algorithm.prompts_per_step=2", "algorithm.group_size=4", "sol.pool_size=8"])
    # explore 2 x 8 seeds x 6 steps at 1 - 3/4 s; regenerate 8 x 10 steps; update 8 samples x 6 timesteps x (3 forwards + backward 2)
    expected = flops * (2 * 8 * 6 * (1 - 0.75 * share) + 8 * 10 + 8 * 6 * 5)
    assert convergence.step_compute(recipe, flops, share) == pytest.approx(expected)
    baseline = load_recipe(
        REPO / "recipes/tiny_nft.yaml", ["algorithm.prompts_per_step=2", "algorithm.group_size=4", "algorithm.nft.kl_weight=0"]
    )
    assert convergence.step_compute(baseline, flops, share) == pytest.approx(flops * (8 * 10 + 8 * 6 * 4))
