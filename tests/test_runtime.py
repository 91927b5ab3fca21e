"""The driver with remote Ray actors: same numbers as in-process, no arrays in the driver, weight
sync that the rollout copy really uses, killed actors re-issued, and rewards that fail."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from actors.groups import LearnerGroup
from actors.workers import ExploreRequest, RewardWorker
from rewards import Reward, RewardError
from rl.config import Recipe, load_recipe
from rollout import load_policy
from rollout.samplers import sample, seed_for
from solray.driver import ActorLostError, Driver, RewardFailedError, _driver_sized, actor_lost_message, train, unscored_shares
from solray.exploration import apply_reward_failures

STEPS = 2
# fp32 exploration with the regeneration sampler's settings, so a synced rollout copy must
# reproduce the learner's own samples; lr high enough that one update changes the images.
RUNTIME = [
    f"run.steps={STEPS}",
    "algorithm.prompts_per_step=2",
    "algorithm.group_size=4",
    "algorithm.lora_rank=4",
    "sol.pool_size=8",
    "sol.explore_precision=fp32",
    "sol.explore_steps=4",
    "sampler.solver=euler",
    "sampler.steps=4",
    "optim.lr=3e-3",
    "eval.enabled=false",
]
IN_PROCESS = ["cluster.rollout_workers=0", "cluster.reward_workers=0", "cluster.remote_learners=false"]
REMOTE = ["cluster.rollout_workers=2", "cluster.reward_workers=1", "cluster.remote_learners=true"]
PIPELINED = ["algorithm.pipeline_depth=1"]


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)  # logical: the kill test's driver runs beside the reference one
    yield
    ray.shutdown()


def run_steps(driver: Driver, kill_at: int | None = None) -> list[dict]:
    """STEPS driver steps; in step `kill_at`, rollout worker 0 is killed after each explore call and the reward worker
    before each scoring (with pipeline_depth 1, step 0 explores twice: its own pool and step 1's)."""
    history = []
    exploration = driver.exploration
    explore, score = exploration.explore, exploration.score
    for step in range(STEPS):
        if step == kill_at:

            def explore_then_kill(prompts, step):
                refs = explore(prompts, step)
                ray.kill(exploration.rollout.actors[0], no_restart=False)  # mid-shard: its calls are in flight
                return refs

            def score_then_kill(image_refs, prompts):
                ray.kill(driver.rewards.actors[0], no_restart=False)
                return score(image_refs, prompts)

            exploration.explore, exploration.score = explore_then_kill, score_then_kill
        history.append(driver.step(step))
        exploration.explore, exploration.score = explore, score
    return history


@pytest.fixture(scope="module")
def remote_driver(local_ray, tmp_path_factory):
    driver = Driver(load_recipe("recipes/tiny_solrl.yaml", [*RUNTIME, *REMOTE, f"run.output_dir={tmp_path_factory.mktemp('remote')}"]))
    yield driver, run_steps(driver)
    driver.shutdown()


def assert_same_run(a: list[dict], b: list[dict], loss_rel: float) -> None:
    for first, second in zip(a, b, strict=True):
        assert first["explore/reward_mean"] == second["explore/reward_mean"]
        assert first["reward/tiny_alignment"] == second["reward/tiny_alignment"]
        assert first["loss/nft"] == pytest.approx(second["loss/nft"], rel=loss_rel)


@pytest.mark.slow
def test_remote_actors_give_the_in_process_numbers(remote_driver, tmp_path):
    _, remote = remote_driver
    in_process = train(load_recipe("recipes/tiny_solrl.yaml", [*RUNTIME, *IN_PROCESS, f"run.output_dir={tmp_path}"])).history
    assert_same_run(remote, in_process, loss_rel=1e-5)


@pytest.mark.slow
def test_driver_fetches_only_score_tables_and_scalars(remote_driver):
    _, history = remote_driver
    P, N, K, R = 2, 8, 4, 1
    score_tables = (P * N + P * K) * R * 8  # float64 pool scores + regen rewards
    for metrics in history:
        # the rest is scalar metrics: well under one 32x32 RGB image (3072 bytes) per step
        assert score_tables <= metrics["driver/fetched_bytes"] < score_tables + 3072


def test_driver_refuses_to_fetch_images_or_latents():
    assert _driver_sized({"loss": 1.0, "rewards": np.zeros((4, 2))}) == 8 + 64
    with pytest.raises(TypeError, match=r"\(4, 32, 32, 3\) uint8 array: images and latents must stay in the object store"):
        _driver_sized(np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="images and latents"):
        _driver_sized([np.zeros((2, 3, 8, 8), np.float32)])


@pytest.mark.slow
def test_synced_rollout_copy_samples_what_the_learner_samples(remote_driver):
    driver, _ = remote_driver
    recipe = driver.recipe
    prompts = ["a red circle", "two squares", "a cross left of a triangle", "a blue triangle"]
    seeds = [seed_for(7, 0, p, 0) for p in range(len(prompts))]
    exploration = driver.exploration

    def request(version: int) -> ExploreRequest:
        return ExploreRequest(prompts, seeds, recipe.sol.explore_steps, "euler", None, version, exploration.weights_ref)

    explore = ray.get(exploration.rollout.explore(1, request(exploration.version)))
    learner = ray.get(driver.learners.regenerate(prompts, seeds, 0)[0])
    # merged weights (rollout) vs base + LoRA adapter (learner): equal up to float rounding of a pixel
    diff = np.abs(explore.astype(int) - learner.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    # ... and the trained weights are really in use: the base model draws something else
    base = sample(load_policy("tiny"), prompts, seeds, recipe.sol.explore_steps, solver="euler").images
    assert np.abs(base.astype(int) - learner.astype(int)).max() > 16
    with pytest.raises(ray.exceptions.RayTaskError, match="holds weights v2, asked to explore with v1"):
        ray.get(exploration.rollout.explore(0, request(exploration.version - 1)))


@pytest.fixture(scope="module")
def pipelined_driver(local_ray, tmp_path_factory):
    recipe = load_recipe("recipes/tiny_solrl.yaml", [*RUNTIME, *REMOTE, *PIPELINED, f"run.output_dir={tmp_path_factory.mktemp('piped')}"])
    driver = Driver(recipe)
    yield driver, run_steps(driver)
    driver.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("pipelined", [False, True], ids=["depth0", "depth1"])
def test_killed_rollout_and_reward_actors_are_restarted_and_their_shards_reissued(pipelined, request, tmp_path):
    _, reference = request.getfixturevalue("pipelined_driver" if pipelined else "remote_driver")
    driver = Driver(load_recipe("recipes/tiny_solrl.yaml", [*RUNTIME, *REMOTE, *(PIPELINED * pipelined), f"run.output_dir={tmp_path}"]))
    actors = [*driver.exploration.rollout.actors, *driver.rewards.actors]
    pids = [ray.get(actor.describe.remote())["pid"] for actor in actors]
    # depth 0: after the first sync, so the restarted worker must catch up to v1; depth 1: step 1's pool, explored
    # during step 0 with v0, whose requests sit before the v1 sync on the worker that restarts
    history = run_steps(driver, kill_at=0 if pipelined else 1)
    killed = [ray.get(actor.describe.remote())["pid"] != pid for actor, pid in zip(actors, pids)]
    assert killed == [True, False, True]  # rollout 0 and the reward worker were restarted
    driver.shutdown()
    assert_same_run(history, reference, loss_rel=0)


@pytest.mark.slow
def test_pipelined_steps_select_from_a_pool_explored_one_version_behind(pipelined_driver, remote_driver):
    driver, pipelined = pipelined_driver
    _, sequential = remote_driver
    assert [row["explore/staleness"] for row in pipelined] == [0.0, 1.0]
    assert [row["explore/staleness"] for row in sequential] == [0.0, 0.0]
    assert_same_run(pipelined[:1], sequential[:1], loss_rel=0)  # step 0 has no earlier step to overlap
    # Step 1's pool was explored with v0 (the base model: the LoRA starts at zero), the sequential run's with v1.
    recipe, base = driver.recipe, load_policy("tiny")
    alignment = driver.rewards.local or RewardWorker(recipe=recipe)
    pool_means = []
    for p, prompt in enumerate(driver.prompts(1)):
        seeds = [seed_for(recipe.run.seed, 1, p, j) for j in range(recipe.sol.pool_size)]
        images = sample(base, [prompt] * len(seeds), seeds, recipe.sol.explore_steps, solver="euler").images
        pool_means.append(alignment.score(images, [prompt] * len(seeds))[:, 0].mean())
    assert pipelined[1]["explore/reward_mean"] == pytest.approx(np.mean(pool_means), rel=1e-6)
    assert pipelined[1]["explore/reward_mean"] != sequential[1]["explore/reward_mean"]


@ray.remote
def images_once(release: str, images: np.ndarray) -> np.ndarray:
    """`images`, once the file `release` exists: a shard still being explored."""
    while not os.path.exists(release):
        time.sleep(0.05)
    return images


@pytest.mark.slow
def test_a_reward_worker_scores_ready_images_before_a_shard_still_exploring(remote_driver, tmp_path):
    """A pipelined step's rescore must not wait behind the next pool's scoring calls, submitted earlier but waiting
    for their images (RewardGroup runs calls out of order; in order, this get times out)."""
    driver, _ = remote_driver
    images, prompts = np.full((2, 32, 32, 3), 128, np.uint8), ["a red circle", "a blue square"]
    release = str(tmp_path / "release")
    waiting = driver.rewards.score(0, images_once.remote(release, images), prompts)
    ready = driver.rewards.score(0, images, prompts)
    try:
        scores = ray.get(ready, timeout=60)
    finally:
        open(release, "w").close()
    np.testing.assert_array_equal(ray.get(waiting, timeout=60), scores)


@pytest.mark.slow
def test_colocated_placement_shares_each_learner_bundle_with_a_rollout_worker(remote_driver, tmp_path):
    _, split = remote_driver
    colocated = ["cluster.placement=colocated", "cluster.rollout_workers=1", f"run.output_dir={tmp_path}"]
    driver = Driver(load_recipe("recipes/tiny_solrl.yaml", [*RUNTIME, *REMOTE, *colocated]))
    placement = driver.learners.placement
    try:
        # tiny_solrl: a learner needs 0.75 CPU and a rollout worker 0.5; one bundle holds both
        assert ray.util.placement_group_table(placement)["bundles"] == {0: {"CPU": 1.25}}
        assert [ray.get(actor.describe.remote())["placement_group"] for actor in driver.exploration.rollout.actors] == [placement.id.hex()]
        history = run_steps(driver)
    finally:
        driver.shutdown()
    assert_same_run(history, split, loss_rel=0)  # where the actors run changes no number


@pytest.mark.slow
def test_a_killed_learner_stops_the_run_naming_the_checkpoint_a_resume_continues_from(local_ray, tmp_path, monkeypatch):
    overrides = [*RUNTIME, *REMOTE, "run.steps=3", "checkpoint.every=1", "logging.grid_every=0", f"run.output_dir={tmp_path}"]
    recipe = load_recipe("recipes/tiny_solrl.yaml", overrides)
    train_step, issued = LearnerGroup.train, []

    def train_and_kill_in_step_2(group, advantages):
        refs = train_step(group, advantages)
        issued.append(len(refs))
        if len(issued) == 2:
            ray.kill(group.actors[0])  # its train call is in flight: learners are never restarted
        return refs

    monkeypatch.setattr(LearnerGroup, "train", train_and_kill_in_step_2)
    with pytest.raises(
        ActorLostError,
        match=rf"died in step 2 .*training stopped, run the same command again: run.resume auto continues from {tmp_path}/checkpoints/step_000001$",
    ):
        train(recipe)
    monkeypatch.undo()
    resumed = train(recipe)  # what the message promises
    assert [row["step"] for row in resumed.history] == [0, 1, 2] and sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[
        -1
    ] == "step_000003"


def test_the_lost_actor_message_says_how_to_continue_the_run(tmp_path):
    error = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: LearnerWorker")
    assert actor_lost_message(error, "in step 3", tmp_path, "auto") == (
        "an actor of the run died in step 3 (The actor died unexpectedly before finishing this task.); "
        "training stopped, no checkpoint had been written"
    )
    (tmp_path / "checkpoints" / "step_000002").mkdir(parents=True)
    newest = tmp_path / "checkpoints" / "step_000002"
    assert actor_lost_message(error, "in step 3", tmp_path, "auto").endswith(
        f"run the same command again: run.resume auto continues from {newest}"
    )
    assert actor_lost_message(error, "in step 3", tmp_path, "never").endswith(
        f"run it again with run.resume=auto to continue from {newest}"
    )


def reward_worker(specs: list[dict], **rewards) -> RewardWorker:
    """A RewardWorker of these reward specs and rewards.* settings."""
    return RewardWorker(recipe=Recipe(rewards={"models": specs, **rewards}))


class FailingReward(Reward):
    name = "failing_for_tests"

    def __call__(self, images, prompts, metadata):
        raise RuntimeError("reward server unreachable")


def test_reward_errors_fail_with_the_reward_name_or_become_nan_columns():
    images, prompts = np.zeros((2, 32, 32, 3), np.uint8), ["a circle", "a square"]
    with pytest.raises(RewardError, match="'failing_for_tests' raised RuntimeError: reward server unreachable"):
        reward_worker([{"name": "test_runtime:FailingReward"}], retries=1, on_reward_error="fail").score(images, prompts)
    scores = reward_worker([{"name": "tiny_verifier"}, {"name": "test_runtime:FailingReward"}], retries=0, on_reward_error="skip").score(
        images, prompts
    )
    assert scores.shape == (2, 2) and np.isfinite(scores[:, 0]).all() and np.isnan(scores[:, 1]).all()


def test_a_reward_failing_past_its_retries_stops_the_run_naming_where_and_how_to_continue(tmp_path):
    overrides = [*RUNTIME, *IN_PROCESS, "eval.enabled=false", "logging.grid_every=0", f"run.output_dir={tmp_path}"]
    failing = ["rewards.models=[{name: test_runtime:FailingReward}]", "rewards.retries=0"]
    with pytest.raises(
        RewardFailedError,
        match=r"^reward 'failing_for_tests' raised RuntimeError: reward server unreachable; training stopped in step 1, "
        "no checkpoint had been written$",
    ):
        train(load_recipe("recipes/tiny_solrl.yaml", overrides + failing))


def test_unscored_shares_count_each_rewards_nans():
    rewards = np.array([[0.5, np.nan], [np.nan, np.nan], [0.2, 1.0], [0.9, np.nan]])
    assert unscored_shares(rewards, ["verifier", "vlm_judge"]) == {"rewards/verifier/unscored": 0.25, "rewards/vlm_judge/unscored": 0.75}


def test_on_reward_error_skip_drops_whole_groups_and_fail_names_the_prompt(caplog):
    recipe = load_recipe("recipes/tiny_solrl.yaml", RUNTIME + IN_PROCESS)
    rewards = np.array([[0.5], [np.nan], [0.2], [0.9], [0.1], [0.3]])
    prompts = ["a circle"] * 3 + ["a square"] * 3
    with pytest.raises(RewardError, match=r"step 3: 1 of 6 images got no reward from \['tiny_alignment'\] \(first: prompt 'a circle'\)"):
        apply_reward_failures(recipe, rewards, prompts, [0, 0, 0, 1, 1, 1], step=3)
    recipe = recipe.model_copy(update={"rewards": recipe.rewards.model_copy(update={"on_reward_error": "skip"})})
    kept, dropped = apply_reward_failures(recipe, rewards, prompts, [0, 0, 0, 1, 1, 1], step=3)
    assert dropped == 1
    assert "step 3: 1 images got no reward from ['tiny_alignment']; skipped their 1 prompt groups" in caplog.text
    assert np.isnan(kept[:3]).all() and kept[3:, 0].tolist() == [0.9, 0.1, 0.3]


def test_a_recipe_that_does_not_fit_the_cluster_fails_before_starting_actors(local_ray, tmp_path):
    recipe = load_recipe("recipes/tiny_solrl.yaml", [*REMOTE, "cluster.learner_resources.num_cpus=7.5", f"run.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"tiny_solrl: the actors need 8.75 CPUs .* but the Ray cluster has 8;"):
        Driver(recipe)


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_leaves_no_ray_process_behind(tmp_path):
    output_dir, ray_root = tmp_path / "run", Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    overrides = [*RUNTIME, *REMOTE, "run.steps=20", f"run.output_dir={output_dir}", "logging.progress=false"]
    env = os.environ | {"RAY_TMPDIR": str(ray_root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "solray.cli", "train", "recipes/tiny_solrl.yaml", *overrides]
    driver = psutil.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (output_dir / "metrics.jsonl").is_file():  # the first step is done: every actor is up
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run logged no step in 300 s"
            time.sleep(0.2)
        started = driver.children(recursive=True)  # the Ray it started: GCS, raylet, dashboard agents, actors
        assert len(started) >= 5
        driver.kill()
        driver.wait()
        # GCS and raylet go at once; Ray's dashboard and runtime-env agents first try for 60 s to tell the (dead) GCS that
        # the raylet died (ray._private.utils.publish_error_to_driver), then exit
        _, alive = psutil.wait_procs(started, timeout=150)
        assert [process.info for process in psutil.process_iter(["pid", "name"]) if process in alive] == []
    finally:
        for process in [driver, *driver.children(recursive=True)] if driver.is_running() else []:
            process.kill()
        shutil.rmtree(ray_root, ignore_errors=True)
