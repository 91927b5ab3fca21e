"""bench/scale_sim.py: its profiles reproduce the paper's phase times, --profile inverts the driver's timers, and
--quick runs the real Driver with simulated workers and reports figures that match the payload arithmetic and
(within the slack of a shared machine) the analytic iteration time."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
try:
    import scale_sim
finally:
    sys.path.remove(str(REPO / "bench"))


@pytest.mark.parametrize("model, total", [("flux", 169), ("sd35l", 427), ("sana", 76)])
def test_profiles_reproduce_the_papers_iteration_on_its_schedule(model, total):
    recipe = load_recipe(REPO / scale_sim.RECIPES[model][0], scale_sim.recipe_overrides(model, "split", 8, "/tmp/unused"))
    profile = scale_sim.PROFILES[model]
    assert recipe.algorithm.prompts_per_step == 48 and recipe.sol.pool_size == 96 and recipe.algorithm.group_size == 24
    assert scale_sim.reference_seconds(profile, recipe, 8) == pytest.approx(total)
    # the explore phase alone is the paper's rollout time
    rollout = {"flux": 79, "sd35l": 187, "sana": 46}[model]
    assert scale_sim.phase_work(profile, recipe)["explore"] / 8 == pytest.approx(rollout)
    # weak scaling keeps the per-GPU work: the reference is the same at 64 GPUs
    big = load_recipe(REPO / scale_sim.RECIPES[model][0], scale_sim.recipe_overrides(model, "split", 64, "/tmp/unused"))
    assert scale_sim.reference_seconds(profile, big, 64) == pytest.approx(total)


def test_no_placement_beats_the_work_per_gpu():
    """Every schedule's step is at least the GPU-seconds of its work over the GPUs (work conservation): a pipelined
    split placement cannot go below the colocated reference by more than its sync time."""
    recipe = load_recipe(REPO / "recipes/flux1_solrl.yaml", scale_sim.recipe_overrides("flux", "split", 8, "/tmp/unused"))
    profile = scale_sim.PROFILES["flux"]
    floor = sum(scale_sim.phase_work(profile, recipe).values()) / 8
    for placement in scale_sim.PLACEMENTS:
        assert scale_sim.expected_total(profile, recipe, placement, 8) >= floor - 1e-9
    assert scale_sim.expected_total(profile, recipe, "split", 8) == pytest.approx(2 * floor, rel=0.05)  # half the GPUs per phase


def test_profile_from_metrics_recovers_the_costs(tmp_path):
    """Timer rows written as the driver would log them for known costs give those costs back."""
    recipe = load_recipe(REPO / "recipes/tiny_solrl.yaml", ["cluster.rollout_workers=2", "cluster.learners=1"])
    truth = scale_sim.PROFILES["sana"]
    P, K, N = recipe.algorithm.prompts_per_step, recipe.algorithm.group_size, recipe.sol.pool_size
    last_shard = P * N / (2 * recipe.cluster.explore_shards_per_worker)
    row = {
        "time/explore": 0.01,
        "time/score": P * N / 2 * 6 * truth.explore_image_step + last_shard * truth.reward_image - 0.01,
        "time/select": 0.0,
        "time/regen": 0.0,
        "time/rescore": P * K * (10 * truth.regen_image_step + truth.reward_image),
        "time/update": P * K * truth.train_sample,
        "time/sync": truth.sync,
    }
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": s} | row) for s in range(3)) + "\n")
    got = scale_sim.profile_from_metrics(path, recipe, truth, reward_image_s=truth.reward_image)
    for name in ("explore_image_step", "regen_image_step", "train_sample", "sync"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name)), name
    assert (got.lora_linears, got.lora_in) == (truth.lora_linears, truth.lora_in)


@pytest.mark.slow
def test_quick_mode_drives_the_real_driver(tmp_path):
    out = tmp_path / "sim.json"
    done = subprocess.run(
        [sys.executable, "bench/scale_sim.py", "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"wrote \S+\.json", done.stdout) and out.with_suffix(".png").is_file()
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["status"] == "simulated" and run["placement"] == "split" and run["gpus"] == 8
    # Sleeps never end early: the simulated step is at least the analytic one; a shared machine adds, so the upper
    # bound is a sanity bound of the simulation, not a speed claim.
    assert 0.97 * run["expected_s"] <= run["iteration_s"] <= 2.0 * run["expected_s"]
    assert run["expected_ratio_to_reference"] == pytest.approx(2.0, abs=0.05)  # split, sequential: half the GPUs per phase
    # object-store bytes: every explored and regenerated image at the stand-in side, and the LoRA factors once at the
    # stand-in rank (32 / compression 50 -> 1)
    side, lora = run["image_side"], 190 * 32 * (3072 + 3072) * 4
    assert run["payload_bytes_per_step"]["lora"] == lora and run["object_store_bytes_per_step"]["lora_rank"] == 1
    assert run["object_store_bytes_per_step"]["moved"] == (48 * 96 + 48 * 24) * side * side * 3 + lora // 32
    assert run["object_store_bytes_per_step"]["real"] == (48 * 96 + 48 * 24) * 512 * 512 * 3 + lora
    assert 0 < run["driver_cpu_s_per_step"] and 0 < run["driver_share_of_step"] < 0.05
    assert set(run["busy_share"]) == {"learner+reward", "reward+rollout"}
    assert all(g["gpus"] == 4 and 0 < g["busy_share"] <= 1.0 for g in run["busy_share"].values())
    assert run["driver_fetched_bytes_per_step"] > 0  # the driver fetched scores and metrics, never images
