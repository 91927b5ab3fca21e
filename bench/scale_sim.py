"""Scale simulator: the real Driver (its step, groups, Ray actors and object store) with workers whose compute is a
calibrated wait (bench/sim_workers.py), compressed in time, at 8 to hundreds of simulated GPUs.

A configuration is a recipe plus overrides (PLACEMENTS): `split` is the FLUX.1 and SD3.5-L recipes' layout (rollout workers
and learners on separate GPUs, phases one after another); `colocated` (every GPU runs every role) and `pipelined`
(split, explore of step t+1 during the update of step t) are the overrides of cluster.placement and
algorithm.pipeline_depth.

Per configuration it reports the iteration time (simulated wall x compression = uncompressed seconds), the analytic
expectation, each GPU group's busy share, the driver's CPU seconds per step (time.process_time of the driver
process around Driver.step: its Python, pickling and Ray client threads) and their share of the uncompressed
step, and object-store bytes per step (the payloads the workers return: images and LoRA factors at a stand-in
size of at most 1 / compression of the real bytes, so moving them costs the share of a compressed step that moving
the real ones costs of a real step; counted as moved and at the real size).

Run:   python bench/scale_sim.py [--model flux|sd35l|sana] [--gpus 8 64 128] [--compression 20]
       python bench/scale_sim.py --quick                 (CI: one small configuration, well under a minute)
       python bench/scale_sim.py --profile RUN/metrics.jsonl --recipe RECIPE.yaml   (costs from a real run's time/ metrics)
Results: bench/results/scale_sim_<model>.json / .png (--quick and --profile write to a temp dir unless --out is given).
The machine is shared: simulated waits are sleeps, but actor start-up, pickling and the driver compete for the CPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout's packages, not an installed copy's
import sim_workers  # noqa: E402  (bench/ is not a package)
from sim_workers import Profile, SimLearnerWorker, SimRecipe, SimRewardWorker, SimRolloutWorker  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sim_workers)  # actors get the classes by value: bench/ need not be on their path

# --- Cost profiles -------------------------------------------------------------------------------------------------
# Paper facts (Sol-RL, 8 GPUs, every phase on every GPU): FLUX.1 iteration 169 s, of which NVFP4 rollout 79 s and the
# rest (BF16 regeneration, rewards, training) ~90 s; SD3.5-L rollout 187 s of 427 s; SANA 46 s of 76 s. All with
# Sol-RL's batch: 48 prompts x 96 candidates explored in 6 steps, 48 x 24 regenerated in 10 steps and trained.
# The paper does not split "the rest"; assumptions, stated here and in the JSON:
#   - rewards: 2 ms of GPU time per image (PickScore, ViT-H/14 at 224 px, ~0.17 TFLOP, plus preprocessing), on every
#     explored and every regenerated image;
#   - sync (merge the LoRA factors, re-quantize to NVFP4): 1 s per rollout worker (0.5 s for the 1.6B SANA);
#   - regeneration vs training: by forward-equivalents, regeneration 10 per sample (10 steps), training per trained
#     timestep 3 forwards (theta, old, ref) + a backward (2), + 1 recompute with gradient checkpointing (FLUX):
#     FLUX 4 timesteps (timestep_fraction 0.4) x 6 = 24; SD3.5-L and SANA 6 x 5 = 30 per sample.
# LoRA payload: fp32 factors A [r, in] + B [out, r] per wrapped linear (r = 32), counted from the diffusers configs:
#   FLUX.1-dev to_q/k/v/to_out.0: 19 double blocks x 4 + 38 single blocks x 3 (no to_out) = 190 linears 3072 -> 3072;
#   SD3.5-L joint attention: 38 blocks x 8 (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out) - 1 (the last block
#   has no to_add_out) = 303 linears 2432 -> 2432; SANA 1.6B attn1 + attn2 q/k/v/out: 20 blocks x 8 = 160, 2240 -> 2240.
REFERENCE_GPUS = 8
PAPER_BATCH = {"prompts": 48, "pool": 96, "group": 24, "explore_steps": 6, "steps": 10}
ASSUMED_REWARD_IMAGE_S = 0.002


def calibrate(
    name: str, rollout_s: float, total_s: float, train_forwards: int, sync_s: float, resolution: int, lora: tuple[int, int, int]
) -> Profile:
    """Per-unit GPU-seconds that reproduce the paper's phase times on its schedule (8 GPUs, each runs every phase)."""
    b, g = PAPER_BATCH, REFERENCE_GPUS
    explored, trained = b["prompts"] * b["pool"], b["prompts"] * b["group"]
    rewards_s = (explored + trained) * ASSUMED_REWARD_IMAGE_S / g
    generate_and_train = total_s - rollout_s - rewards_s - sync_s
    regen_share = b["steps"] / (b["steps"] + train_forwards)
    return Profile(
        name=name,
        explore_image_step=rollout_s * g / (explored * b["explore_steps"]),
        regen_image_step=generate_and_train * regen_share * g / (trained * b["steps"]),
        reward_image=ASSUMED_REWARD_IMAGE_S,
        train_sample=generate_and_train * (1 - regen_share) * g / trained,
        sync=sync_s,
        resolution=resolution,
        lora_linears=lora[0],
        lora_in=lora[1],
        lora_out=lora[2],
        source=f"Sol-RL paper: rollout {rollout_s:g} s of {total_s:g} s per iteration on 8 GPUs; splits assumed (bench/scale_sim.py)",
    )


PROFILES = {
    "flux": calibrate("flux", 79, 169, 24, 1.0, 512, (190, 3072, 3072)),
    "sd35l": calibrate("sd35l", 187, 427, 30, 1.0, 1024, (303, 2432, 2432)),
    "sana": calibrate("sana", 46, 76, 30, 0.5, 1024, (160, 2240, 2240)),
}
RECIPES = {
    "flux": ("recipes/flux1_solrl.yaml", "flux"),
    "sd35l": ("recipes/sd35l_solrl.yaml", "sd3"),
    "sana": ("recipes/sana_solrl.yaml", "sana"),
}


def profile_from_metrics(path: Path, recipe, like: Profile, reward_image_s: float = ASSUMED_REWARD_IMAGE_S) -> Profile:
    """Per-unit costs from a real run's metrics.jsonl `time/` rows (the median after the first step) under its recipe.

    The driver's timers overlap work: `score` waits for the explore shards as they land, `rescore` for the
    regenerated ones. With the workers of each phase on their own devices and the scoring keeping up:
      explore + score + select = (P N / n_rollout) explore_steps c_explore + (P N / shards) c_reward   (the last shard's score; shards = n_rollout x explore_shards_per_worker)
      regen + rescore          = (P K / n_learners) (steps c_regen + c_reward)
      update = (P K / n_learners) c_train;   sync = c_sync
    The timers cannot separate a reward's cost from generation, so c_reward is given (`reward_image_s`); payload sizes
    come from `like`. A run whose actors shared CPU cores (the tiny testbed) gives costs of that machine, not a GPU's.
    """
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = rows[1:] or rows

    def median(*keys: str) -> float:
        return statistics.median(sum(row.get(f"time/{key}") or 0.0 for key in keys) for row in rows)

    c, a, s = recipe.cluster, recipe.algorithm, recipe.sol
    P, K, N = a.prompts_per_step, a.group_size, s.pool_size
    n_r, n_l = max(c.rollout_workers, 1), c.learners
    per_learner = math.ceil(P * K / n_l)
    shard = P * N / min(n_r * c.explore_shards_per_worker, P * N)
    explore = (median("explore", "score", "select") - shard * reward_image_s) * n_r / (P * N * s.explore_steps)
    regen = (median("regen", "rescore") / per_learner - reward_image_s) / recipe.sampler.steps
    return Profile(
        name=f"{like.name}@{Path(path).parent.name}",
        explore_image_step=max(explore, 0.0),
        regen_image_step=max(regen, 0.0),
        reward_image=reward_image_s,
        train_sample=median("update") / per_learner,
        sync=median("sync"),
        resolution=recipe.model.resolution or like.resolution,
        lora_linears=like.lora_linears,
        lora_in=like.lora_in,
        lora_out=like.lora_out,
        source=f"time/ medians of {path} ({len(rows)} rows), reward {reward_image_s:g} s per image given",
    )


# --- Configurations ------------------------------------------------------------------------------------------------
def layout(placement: str, gpus: int) -> dict[str, int]:
    """Worker counts at `gpus` simulated GPUs: split = the FLUX.1 and SD3.5-L recipes' 8-GPU layout scaled (half the GPUs
    hold a rollout worker, half a learner, each at 0.75 GPU, every GPU a 0.25-GPU reward worker); colocated = every
    GPU holds one of each role."""
    if placement.startswith("colocated"):
        return {"rollout_workers": gpus, "learners": gpus, "reward_workers": gpus}
    return {"rollout_workers": gpus // 2, "learners": gpus // 2, "reward_workers": gpus}


# The overrides that make a placement (cluster.placement, algorithm.pipeline_depth). Reward workers get no Ray GPU
# in the simulation: each is pinned to simulated GPU k (sim_workers.SimWorker.pin_gpu), the layout the recipes mean,
# so each GPU's busy share counts its reward work; check_packing starts the fractional layout itself. colocated: rollout worker r and learner r share bundle r, 0.5 GPU each (one GPU).
PLACEMENTS: dict[str, list[str]] = {
    "split": ["cluster.placement=split", "algorithm.pipeline_depth=0"],
    "pipelined": ["cluster.placement=split", "algorithm.pipeline_depth=1"],
    "colocated": ["cluster.placement=colocated", "algorithm.pipeline_depth=0"],
    "colocated+pipelined": ["cluster.placement=colocated", "algorithm.pipeline_depth=1"],
}


IDLE_PROBE_S = 3.0  # seconds of an idle driver, measured after the steps


PROMPTS_PER_GPU = PAPER_BATCH["prompts"] // REFERENCE_GPUS  # weak scaling: the per-GPU work of the paper's batch


def recipe_overrides(model: str, placement: str, gpus: int, output_dir: str, prompts_per_gpu: float = PROMPTS_PER_GPU) -> list[str]:
    """The recipe overrides of one configuration: the family's production recipe at `gpus` GPUs, with no evaluation,
    no model weights (model.family named, so check_inputs reads no checkpoint) and no CPU reservations."""
    counts = layout(placement, gpus)
    gpu_share = {"rollout": 0.5, "learner": 0.5} if placement.startswith("colocated") else {"rollout": 0.75, "learner": 0.75}
    return [
        f"model.family={RECIPES[model][1]}",
        "run.prompts=tiny:train",
        f"run.output_dir={output_dir}",
        "eval.enabled=false",
        "logging.grid_every=0",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"algorithm.prompts_per_step={max(1, round(prompts_per_gpu * gpus))}",
        f"cluster.rollout_workers={counts['rollout_workers']}",
        f"cluster.learners={counts['learners']}",
        f"cluster.reward_workers={counts['reward_workers']}",
        f"cluster.rollout_resources={{num_cpus: 0, num_gpus: {gpu_share['rollout']}}}",
        f"cluster.learner_resources={{num_cpus: 0, num_gpus: {gpu_share['learner']}}}",
        "cluster.reward_resources={num_cpus: 0, num_gpus: 0}",
        "cluster.max_restarts=0",
    ] + PLACEMENTS[placement]


# --- The analytic model --------------------------------------------------------------------------------------------
def phase_work(p: Profile, recipe) -> dict[str, float]:
    """GPU-seconds of one iteration's work, per phase (the batch of `recipe`)."""
    a, s = recipe.algorithm, recipe.sol
    P, K, N = a.prompts_per_step, a.group_size, s.pool_size
    return {
        "explore": P * N * s.explore_steps * p.explore_image_step,
        "score": P * N * p.reward_image,
        "regen": P * K * recipe.sampler.steps * p.regen_image_step,
        "rescore": P * K * p.reward_image,
        "update": P * K * p.train_sample,
    }


def reference_seconds(p: Profile, recipe, gpus: int) -> float:
    """Sol-RL's colocated schedule: every GPU runs each phase in turn on 1/gpus of the work, then syncs."""
    return sum(phase_work(p, recipe).values()) / gpus + p.sync


def expected_seconds(p: Profile, recipe, placement: str, gpus: int) -> dict[str, float]:
    """Uncompressed iteration seconds the placement's schedule implies, by phase, ignoring driver and transfer time.

    split: explore on the rollout GPUs, which also run their reward workers' share of the pool scoring (each GPU
    hosts one reward worker), then the last shard's score; regeneration and update on the learner GPUs, rescore of
    each learner's shard by one reward worker; the sync. pipelined (depth 1, split GPUs): the rollout side's and
    the learner side's work overlap (the sync queues behind the next pool's shards), so a step takes the longer of
    the two, then the sync. colocated (pipelined or not): the reference schedule, every GPU running every role's work."""
    a, c, s = recipe.algorithm, recipe.cluster, recipe.sol
    P, K, N = a.prompts_per_step, a.group_size, s.pool_size
    n_r, n_l, n_w = c.rollout_workers, c.learners, c.reward_workers
    if placement.startswith("colocated"):
        work = phase_work(p, recipe)
        return {name: seconds / gpus for name, seconds in work.items()} | {"sync": p.sync}
    shards = min(n_r * c.explore_shards_per_worker, P * N)
    shard = P * N / shards
    per_learner = math.ceil(P * K / n_l)
    explore_side = (
        math.ceil(shards / n_r) * shard * s.explore_steps * p.explore_image_step
        + P * N / n_w * p.reward_image  # this GPU's reward worker's share of the pool
    )
    phases = {
        "explore+score": explore_side + shard * p.reward_image,
        "regen": per_learner * recipe.sampler.steps * p.regen_image_step,
        "rescore": per_learner * p.reward_image,
        "update": per_learner * p.train_sample,
        "sync": p.sync,
    }
    if placement == "pipelined":
        learner_side = phases["regen"] + phases["rescore"] + phases["update"] + P * N / n_w * p.reward_image
        return {
            "rollout side": explore_side,
            "learner side": learner_side,
            "sync": p.sync,
            "step": max(explore_side, learner_side) + p.sync,
        }
    return phases


def expected_total(p: Profile, recipe, placement: str, gpus: int) -> float:
    phases = expected_seconds(p, recipe, placement, gpus)
    return phases["step"] if placement == "pipelined" else sum(phases.values())


def payload_bytes(p: Profile, recipe) -> dict[str, int]:
    """Object-store payload bytes per iteration at the real sizes: explored and regenerated images, and the LoRA
    factors (fp32) published once per sync (what the simulation moves, at stand-in sizes, it counts itself)."""
    images = recipe.explored_per_step + recipe.samples_per_step
    lora = p.lora_linears * recipe.algorithm.lora_rank * (p.lora_in + p.lora_out) * 4
    return {"images": images, "real": images * p.resolution**2 * 3 + lora, "lora": lora}


def lora_rank_for(compression: float, rank: int) -> int:
    """The stand-in LoRA rank: at most 1 / compression of the real factors' bytes (at least rank 1)."""
    return max(1, math.floor(rank / compression))


# --- Running one configuration -------------------------------------------------------------------------------------
def install_serializers(sim: SimRecipe) -> None:
    """Send a Recipe as the SimRecipe and an ExploreRequest as a dict of its fields, so that actors never import torch."""
    from dataclasses import asdict

    from actors.workers import ExploreRequest
    from rl.config import Recipe

    fields = asdict(sim)
    ray.util.register_serializer(Recipe, serializer=lambda recipe: dict(fields), deserializer=sim_workers.sim_recipe)
    ray.util.register_serializer(
        ExploreRequest,
        serializer=lambda r: {"prompts": r.prompts, "seeds": r.seeds, "steps": r.steps, "version": r.version, "weights": r.weights},
        deserializer=dict,  # a builtin: pickled by reference, not shipped with every request
    )


def remove_serializers() -> None:
    from actors.workers import ExploreRequest
    from rl.config import Recipe

    for cls in (Recipe, ExploreRequest):
        ray.util.deregister_serializer(cls)


def image_side_for(p: Profile, compression: float, recipe, budget_bytes: float) -> int:
    """The stand-in image side: the resolution halved until an image holds at most 1 / compression of the real bytes
    (moving the payloads then costs the share of a compressed step that moving the real ones costs of a real step),
    and further until one step's explored pool fits `budget_bytes` of object store."""
    side = p.resolution
    while side > 8 and (side**2 * compression > p.resolution**2 or recipe.explored_per_step * side**2 * 3 > budget_bytes):
        side //= 2
    return side


def run_config(
    model: str,
    placement: str,
    gpus: int,
    profile: Profile,
    compression: float,
    steps: int = 2,
    warmup: int = 1,
    pool_budget: float = 1 << 30,
    recipe_path: str | None = None,
    max_actors: int | None = None,
) -> dict:
    """Simulate `steps` iterations (after `warmup`) of one configuration on the real Driver; its figures."""
    from actors.groups import WorkerClasses
    from rl.config import load_recipe
    from solray.driver import Driver

    with tempfile.TemporaryDirectory(prefix="scale-sim-") as tmp:
        overrides = recipe_overrides(model, placement, gpus, os.path.join(tmp, "out"))
        base = {"model": model, "placement": placement, "gpus": gpus, "overrides": overrides}
        recipe = load_recipe(REPO / (recipe_path or RECIPES[model][0]), overrides)
        actors = sum(layout(placement, gpus).values())
        if max_actors is not None and actors > max_actors:
            return (
                base
                | analytic(profile, recipe, placement, gpus)
                | {"status": f"analytic only: {actors} actors > --max-actors {max_actors}"}
            )
        sim = SimRecipe(
            profile=profile,
            compression=compression,
            lock_dir=tmp,
            image_side=image_side_for(profile, compression, recipe, pool_budget),
            lora_rank=lora_rank_for(compression, recipe.algorithm.lora_rank),
            steps=recipe.sampler.steps,
            gpus=gpus,
        )
        ray.init(
            num_cpus=2,
            num_gpus=gpus,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=int(max(2 * pool_budget, 1 << 30) + 4 * payload_bytes(profile, recipe)["lora"]),
        )
        try:
            install_serializers(sim)
            started = time.perf_counter()
            driver = Driver(recipe, workers=WorkerClasses(rollout=SimRolloutWorker, reward=SimRewardWorker, learner=SimLearnerWorker))
            start_s = time.perf_counter() - started
            try:
                for step in range(warmup):
                    driver.step(step)
                all_actors = driver.rewards.actors + driver.learners.actors + driver.exploration.rollout.actors
                pids = [s["pid"] for s in ray.get([actor.stats.remote() for actor in all_actors])]  # resets the counters
                actor_cpu = process_cpu(pids)
                walls, cpus, main_cpus, rows = [], [], [], []
                for step in range(warmup, warmup + steps):
                    wall, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
                    rows.append(driver.step(step))
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu)
                    main_cpus.append(time.thread_time() - main_cpu)
                # Ray's client threads in the driver process spend CPU even when the driver calls nothing
                cpu = time.process_time()
                time.sleep(IDLE_PROBE_S)
                idle_cpu_per_s = (time.process_time() - cpu) / IDLE_PROBE_S
                stats = ray.get([actor.stats.remote() for actor in all_actors])
                actor_cpu = process_cpu(pids) - actor_cpu
                memory = actor_memory(pids)
            finally:
                driver.shutdown()
        finally:
            remove_serializers()
            ray.shutdown()
        measured_wall = sum(walls)
        iteration = measured_wall / steps * compression
        bytes_moved = sum(s["bytes_out"] for s in stats) / steps
        result = (
            base
            | analytic(profile, recipe, placement, gpus)
            | {
                "status": "simulated",
                "actors": actors,
                "start_seconds": start_s,
                "actor_memory_mib": memory,
                "image_side": sim.image_side,
                "iteration_s": iteration,
                "iteration_s_per_step": [w * compression for w in walls],
                "ratio_to_reference": iteration / reference_seconds(profile, recipe, gpus),
                "driver_cpu_s_per_step": sum(cpus) / steps,
                "driver_main_thread_cpu_s_per_step": sum(main_cpus) / steps,  # the driver's Python: Driver.step and its calls
                "driver_idle_cpu_s_per_s": idle_cpu_per_s,  # the process with every actor alive and no call in flight
                "driver_share_of_step": sum(cpus) / steps / iteration,
                # the headline: against the step the schedule takes uncompressed (the simulated one is longer where the host lags)
                "driver_share_of_expected_step": sum(cpus) / steps / expected_total(profile, recipe, placement, gpus),
                "actors_cpu_s_per_step": actor_cpu / steps,
                # CPU the driver and the actors used per second of simulated wall, against the machine's cores: near
                # os.cpu_count() the host, not the schedule, sets the pace (lower the compression)
                "host_cpu_load": (sum(cpus) + actor_cpu) / measured_wall,
                "object_store_bytes_per_step": {
                    "moved": bytes_moved,
                    "real": payload_bytes(profile, recipe)["real"],
                    "lora_rank": sim.lora_rank,
                    "counted": "payloads the workers returned (images, LoRA factors) at stand-in sizes; real = at the profile's resolution and the recipe's rank",
                },
                "busy_share": busy_shares(stats, measured_wall),
                "phase_s": {
                    key[5:]: statistics.mean(row[key] for row in rows) * compression
                    for key in rows[0]
                    if key.startswith("time/") and key != "time/requantize"
                },
                "driver_fetched_bytes_per_step": statistics.mean(row["driver/fetched_bytes"] for row in rows),
            }
        )
        return result


def analytic(profile: Profile, recipe, placement: str, gpus: int) -> dict:
    reference = reference_seconds(profile, recipe, gpus)
    expected = expected_total(profile, recipe, placement, gpus)
    return {
        "layout": layout(placement, gpus),
        "prompts_per_step": recipe.algorithm.prompts_per_step,
        "reference_s": reference,
        "expected_s": expected,
        "expected_phases_s": expected_seconds(profile, recipe, placement, gpus),
        "expected_ratio_to_reference": expected / reference,
        "payload_bytes_per_step": payload_bytes(profile, recipe),
    }


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (those still alive)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.Error, OSError):
            continue
        total += times.user + times.system
    return total


def actor_memory(pids: list[int]) -> dict[str, float]:
    """The actor processes' memory: proportional set size (shared pages split between their users) and RSS, MiB."""
    import psutil

    pss = rss = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError):
            continue
        pss, rss = pss + info.pss, rss + info.rss
    return {"pss_total": pss / 2**20, "pss_per_actor": pss / 2**20 / max(len(pids), 1), "rss_per_actor": rss / 2**20 / max(len(pids), 1)}


def busy_shares(stats: list[dict], wall: float) -> dict[str, dict]:
    """Per GPU group (the GPUs holding the same set of roles): GPUs, and the share of the measured wall they were held."""
    gpus: dict[str, dict] = {}
    for s in stats:
        entry = gpus.setdefault(s["gpu"], {"roles": set(), "seconds": 0.0})
        entry["roles"].add(s["role"])
        entry["seconds"] += s["gpu_seconds"]
    groups: dict[str, dict] = {}
    for entry in gpus.values():
        group = groups.setdefault("+".join(sorted(entry["roles"])), {"gpus": 0, "seconds": 0.0})
        group["gpus"] += 1
        group["seconds"] += entry["seconds"]
    return {name: {"gpus": g["gpus"], "busy_share": g["seconds"] / (g["gpus"] * wall)} for name, g in sorted(groups.items())}


# Fractional-GPU layouts as the Driver creates them (learners, then rollout workers, then reward workers):
# the FLUX.1 and SD3.5-L recipes' split layout, and sana_solrl.yaml's colocated one (8 reward workers x 0.125 beside
# 8 bundles of 0.875; plain actors of 0.875 stand in for the learners' placement-group bundles here).
PACKING_LAYOUTS = {
    "split (flux1_solrl, sd35l_solrl)": [("learner", 0.75, 4), ("rollout", 0.75, 4), ("reward", 0.25, 8)],
    "colocated (sana_solrl)": [("learner+rollout", 0.875, 8), ("reward", 0.125, 8)],
}


def check_packing(gpus: int = 8, timeout_s: float = 60) -> dict:
    """Start each PACKING_LAYOUTS layout's actors in the Driver's order on `gpus` fake GPUs: how many start within
    `timeout_s`, and on which GPU Ray put each (Ray assigns fake GPUs as it does real ones)."""
    recipe = SimRecipe(profile=PROFILES["flux"], compression=1.0, lock_dir=tempfile.gettempdir(), image_side=8, lora_rank=1, steps=1)
    out = {}
    for name, order in PACKING_LAYOUTS.items():
        ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        try:
            actors = [
                (role, ray.remote(SimRewardWorker).options(num_cpus=0, num_gpus=share).remote(recipe=recipe))
                for role, share, n in order
                for _ in range(n)
            ]
            refs = [actor.describe.remote() for _, actor in actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            by_gpu: dict[str, list[str]] = {}
            for (role, _), ref in zip(actors, refs):
                if ref in ready:
                    by_gpu.setdefault(ray.get(ref)["gpu"], []).append(role)
            unplaced = [role for (role, _), ref in zip(actors, refs) if ref not in ready]
            out[name] = {"actors": len(refs), "started": len(ready), "unplaced": unplaced, "roles_by_gpu": dict(sorted(by_gpu.items()))}
            for _, actor in actors:
                ray.kill(actor)
        except Exception as error:  # a report, not a reason to lose the simulation's results
            out[name] = {"error": repr(error)}
        finally:
            ray.shutdown()
    return {"gpus": gpus, "waited_s": timeout_s, "layouts": out}


# --- Report --------------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    sizes = sorted({r["gpus"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(PLACEMENTS)
    for i, placement in enumerate(PLACEMENTS):
        xs, sim, exp = [], [], []
        for j, gpus in enumerate(sizes):
            run = next((r for r in runs if r["gpus"] == gpus and r["placement"] == placement), None)
            if run:
                xs.append(j + i * width)
                sim.append(run.get("ratio_to_reference", np.nan))
                exp.append(run["expected_ratio_to_reference"])
        axes[0].bar(xs, sim, width, label=f"{placement} (simulated)")
        axes[0].scatter(xs, exp, marker="_", s=400, color="black", zorder=3)
    axes[0].axhline(1.0, color="gray", lw=1, ls="--")
    axes[0].set_xticks([j + width for j in range(len(sizes))], [f"{g} GPUs" for g in sizes])
    axes[0].set_ylabel("iteration time / Sol-RL colocated reference")
    axes[0].set_title(f"{result['profile']['name']}: bars simulated, dashes analytic (analytic only where no bar)")
    axes[0].legend(fontsize=8)
    simulated = [r for r in runs if r["status"] == "simulated"]
    for placement in PLACEMENTS:
        mine = [r for r in simulated if r["placement"] == placement]
        if mine:
            axes[1].plot(
                [r["layout"]["rollout_workers"] for r in mine],
                [100 * r["driver_share_of_expected_step"] for r in mine],
                "o-",
                label=placement,
            )
    axes[1].legend(fontsize=8)
    axes[1].axhline(1.0, color="gray", lw=1, ls="--")
    if simulated:
        axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("rollout workers")
    axes[1].set_ylabel("driver CPU s per step, % of the analytic step")
    axes[1].set_title("driver overhead")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = [
        "| placement | GPUs | rollout workers | iteration (s) | / reference | analytic / reference | GPU busy share | driver CPU s/step (% of analytic step) | object store MB/step moved (real) | host CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if r["status"] != "simulated":
            lines.append(
                f"| {r['placement']} | {r['gpus']} | {r['layout']['rollout_workers']} | ({r['expected_s']:.0f}) | - | "
                f"{r['expected_ratio_to_reference']:.2f} | - | - | - ({r['payload_bytes_per_step']['real'] / 1e6:.0f}) | - |"
            )
            continue
        busy = ", ".join(f"{name} {g['busy_share']:.2f}" for name, g in r["busy_share"].items())
        store = r["object_store_bytes_per_step"]
        lines.append(
            f"| {r['placement']} | {r['gpus']} | {r['layout']['rollout_workers']} | {r['iteration_s']:.0f} | {r['ratio_to_reference']:.2f} | "
            f"{r['expected_ratio_to_reference']:.2f} | {busy} | {r['driver_cpu_s_per_step']:.2f} ({100 * r['driver_share_of_expected_step']:.2f}%) | "
            f"{store['moved'] / 1e6:.0f} ({store['real'] / 1e6:.0f}) | {r.get('host_cpu_load', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def simulate(
    model: str,
    sizes: list[int],
    compression: list[float],
    steps: int,
    profile: Profile | None = None,
    placements: list[str] | None = None,
    packing: bool = False,
    recipe_path: str | None = None,
    max_actors: int | None = None,
) -> dict:
    profile = profile or PROFILES[model]
    runs = []
    compression = compression * len(sizes) if len(compression) == 1 else compression
    for gpus, factor in zip(sizes, compression, strict=True):
        for placement in placements or PLACEMENTS:
            print(f"{model} {placement} {gpus} GPUs, compression {factor:g} ...", flush=True)
            run = run_config(model, placement, gpus, profile, factor, steps=steps, recipe_path=recipe_path, max_actors=max_actors)
            run["compression"] = factor
            print(
                f"  {run['status']}: iteration {run.get('iteration_s', float('nan')):.1f} s, expected {run['expected_s']:.1f} s", flush=True
            )
            runs.append(run)
    result = {
        "model": model,
        "profile": vars(profile),
        "steps_measured": steps,
        "weak_scaling": f"{PROMPTS_PER_GPU} prompts per GPU (the paper's 48 on 8), pool 96, group 24",
        "machine": {"cpus": os.cpu_count(), "note": "shared with other work"},
        "runs": runs,
    }
    if packing:
        result["packing"] = check_packing()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PROFILES), default="flux")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--placements", nargs="+", choices=list(PLACEMENTS), default=list(PLACEMENTS))
    parser.add_argument(
        "--compression",
        type=float,
        nargs="+",
        default=[20.0],
        help="simulated seconds = uncompressed / compression (one, or one per --gpus)",
    )
    parser.add_argument("--steps", type=int, default=2, help="measured iterations per configuration (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="CI: the FLUX profile at 8 GPUs, split, compression 50, 1 step")
    parser.add_argument("--profile", help="a real run's metrics.jsonl: per-unit costs from its time/ metrics (with --recipe)")
    parser.add_argument("--recipe", help="the recipe of the --profile run (default: the --model's production recipe)")
    parser.add_argument("--reward-image-s", type=float, default=ASSUMED_REWARD_IMAGE_S, help="--profile: a reward's seconds per image")
    parser.add_argument(
        "--max-actors", type=int, help="configurations with more actors are reported analytically (each actor process costs ~56 MiB PSS)"
    )
    parser.add_argument("--packing", action="store_true", help="also start the recipes' fractional-GPU actors as the driver orders them")
    parser.add_argument("--out", help="output JSON path (default bench/results/scale_sim_<model>.json; a temp dir for --quick/--profile)")
    args = parser.parse_args()
    profile = None
    if args.quick:
        args.gpus, args.placements, args.compression, args.steps = [8], ["split"], [50.0], 1
    if args.profile:
        from rl.config import load_recipe

        profile = profile_from_metrics(Path(args.profile), load_recipe(args.recipe or REPO / RECIPES[args.model][0]), PROFILES[args.model])
    result = simulate(
        args.model, args.gpus, args.compression, args.steps, profile, args.placements, args.packing, max_actors=args.max_actors
    )
    default_dir = Path(tempfile.mkdtemp(prefix="scale-sim-")) if (args.quick or args.profile) else REPO / "bench/results"
    out = Path(args.out) if args.out else default_dir / f"scale_sim_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list) + "\n")
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
