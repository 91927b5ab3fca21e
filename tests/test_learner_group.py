"""The learner world: 2 learner actors (gloo, DeepSpeed) regenerate and train their halves of a batch,
stay identical, and take the step one in-process learner takes on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from actors.groups import LearnerGroup
from actors.learners import learner_rows
from actors.workers import LearnerWorker, RolloutWorker, StaleWeightsError, worker_device
from quant import lora_merged_weights
from rl.checkpoint import load_checkpoint, save_checkpoint
from rl.config import load_recipe
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER
from rollout.samplers import seed_for
from rollout.tiny import prompt_set

TINY = [
    "algorithm.prompts_per_step=2",
    "algorithm.group_size=4",
    "algorithm.lora_rank=4",
    "algorithm.lora_alpha=8",
    # 4 rows per learner in micro-batches of 3 + 1, 8 rows alone in 3 + 3 + 2: micro-batch means must not leak into the step
    "algorithm.micro_batch=3",
    "sampler.steps=4",
    "sol.enabled=false",
    "optim.lr=1e-3",
    "optim.grad_clip=0.1",  # below the gradient norms (0.2 - 0.3): clipping takes part
]
# Two rewards balanced by the QP at every step, ZeRO stage 2 as the production recipes use it, and AdamW betas of our own.
BETAS = (0.8, 0.99)
WORLD = [
    "rewards.models=[{name: tiny_verifier}, {name: jpeg_compressibility}]",
    "balance.mode=qp",
    "balance.solve_every=1",
    "cluster.zero_stage=2",
    f"optim.betas=[{BETAS[0]}, {BETAS[1]}]",
]
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [prompt for prompt in prompt_set("train")[:2] for _ in range(4)]
SEEDS = [seed_for(0, 0, p, j) for p in range(2) for j in range(4)]
ADVANTAGES = np.array([1.2, -0.4, 0.3, -1.1, 0.8, -0.9, np.nan, 0.1], dtype=np.float32)  # one sample dropped
# 2 learners vs 1 differ by float rounding (GEMMs over 4 rows instead of 8, sums split over ranks):
# measured up to 3e-7 relative on the metrics and 1e-6 on the adapter, whose steps are lr = 1e-3
# (up to 4.7e-6 relative at ZeRO 0, 1 and 2 on a QP step that follows an amortised one).
REL, ADAPTER_ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def world_and_alone(local_ray):
    """Two remote learners forming a world, and one learner in-process, on the same recipe, fresh for each test.

    Fresh because steps compound float rounding: Adam divides the near-zero first gradients of
    lora_A by their own size, so a QP step after a plain one differed by 2.5e-5 (2.5% of lr).
    """
    threads = ["cluster.learner_resources.torch_threads=1"]
    world = LearnerGroup(
        load_recipe("recipes/tiny_solrl.yaml", TINY + WORLD + threads + ["cluster.learners=2", "cluster.learner_resources.num_cpus=1"])
    )
    yield world, LearnerGroup(load_recipe("recipes/tiny_solrl.yaml", TINY + WORLD + threads + ["cluster.remote_learners=false"]))
    world.shutdown()


def step(group: LearnerGroup, advantages: np.ndarray) -> tuple[np.ndarray, dict, list[dict[str, torch.Tensor]]]:
    """Regenerate PROMPTS x SEEDS, train once; the images, the metrics and every learner's trainable adapter."""
    images = np.concatenate(ray.get(group.regenerate(PROMPTS, SEEDS, 0)))
    metrics = ray.get(group.train(advantages))
    assert all(m == metrics[0] for m in metrics)  # sums over the world: every learner reports the same
    adapters = [state["adapters"][TRAINABLE_ADAPTER] for state in ray.get(group.checkpoint_states())]
    return images, metrics[0], adapters


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def assert_world_takes_the_single_step(world: LearnerGroup, alone: LearnerGroup, advantages: np.ndarray) -> None:
    before = ray.get(alone.checkpoint_states()[0])["adapters"][TRAINABLE_ADAPTER]
    world_images, world_metrics, (rank0, rank1) = step(world, advantages)
    alone_images, alone_metrics, (single,) = step(alone, advantages)
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert np.abs(world_images.astype(int) - alone_images).max() <= 1
    assert max_difference(single, before) > 1e-4  # the step moved the adapter ...
    assert max_difference(rank0, single) < ADAPTER_ATOL  # ... and the world moved it the same way
    for key in ("loss/kl", "train/grad_norm", "train/samples") + tuple(k for k in alone_metrics if k.startswith(("loss/nft", "balance/"))):
        assert world_metrics[key] == pytest.approx(alone_metrics[key], rel=REL, abs=1e-9), key
    assert world_metrics["train/samples"] == np.isfinite(advantages.reshape(len(advantages), -1)).any(1).sum()


def test_learner_rows_cut_like_array_split():
    for size, world in ((8, 2), (7, 3), (3, 3)):
        rows = [np.arange(size)[learner_rows(size, rank, world)] for rank in range(world)]
        assert all(np.array_equal(a, b) for a, b in zip(rows, np.array_split(np.arange(size), world)))


@pytest.mark.slow
def test_two_learners_take_the_single_learner_step(world_and_alone):
    assert_world_takes_the_single_step(*world_and_alone, ADVANTAGES)


@pytest.mark.slow
def test_two_learners_balance_two_rewards_like_one(world_and_alone):
    # [B, 2] advantages: per-reward gradients are summed over the world before the QP solve.
    advantages = np.stack([ADVANTAGES, np.array([0.5, 0.5, -1.0, np.nan, -0.2, 1.4, 0.3, -0.6], dtype=np.float32)], axis=1)
    assert_world_takes_the_single_step(*world_and_alone, advantages)


@pytest.mark.slow
def test_learners_step_with_the_recipes_adamw_betas(world_and_alone):
    for group in world_and_alone:
        for state in ray.get(group.checkpoint_states()):
            assert tuple(state["trainer"]["optimizer"]["param_groups"][0]["betas"]) == BETAS


@pytest.mark.slow
def test_restored_learners_repeat_their_step_exactly(world_and_alone, tmp_path):
    # Through rl.checkpoint's files: each rank's ZeRO 2 optimizer shard round-trips through safetensors + JSON.
    # Under ZeRO 2 the engine steps an fp32 master copy of the adapter: a restore must refresh it.
    for name, group in zip(("world", "alone"), world_and_alone):
        saved = save_checkpoint(tmp_path / name, ray.get(group.checkpoint_states()), {"step": 0}, keep=1)
        first = step(group, ADVANTAGES)[2]
        states, _ = load_checkpoint(saved)
        assert len(states) == len(group)
        ray.get(group.restore(states))
        again = step(group, ADVANTAGES)[2]
        assert all(max_difference(a, b) == 0 for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("cps", [False, True])
def test_grpo_learner_samples_a_trajectory_and_trains_on_it(cps):
    overrides = ["algorithm.name=grpo", "algorithm.grpo.timestep_fraction=0.5", f"algorithm.grpo.cps={cps}", "algorithm.grpo.adv_clip=2.5"]
    learner = LearnerWorker(recipe=load_recipe("recipes/tiny_solrl.yaml", TINY + overrides))
    assert learner.algorithm.config.adv_clip == 2.5  # GRPO's own clip, not algorithm.nft.adv_clip
    before = {name: p.detach().clone() for name, p in learner.trainer.params.items()}
    images = learner.regenerate(PROMPTS, SEEDS, 0)
    trajectory = learner.regen[0]
    assert images.shape[0] == 8 and trajectory.latents.shape[:2] == (5, 8) and trajectory.method == ("cps" if cps else "sde")
    metrics = learner.train(np.array([1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -2.0, 0.0], dtype=np.float32))
    assert np.isfinite(metrics["loss/grpo"]) and metrics["train/samples"] == 8
    assert metrics["grpo/approx_kl"] < 1e-10  # sampled with the policy being trained: ratio 1 at the start
    assert any(not torch.equal(before[name], p) for name, p in learner.trainer.params.items())
    with pytest.raises(RuntimeError, match="regenerate"):
        learner.train(np.zeros(8, dtype=np.float32))


def test_bf16_learner_trains_fp32_lora_and_a_rollout_worker_merges_its_update_to_the_same_weights():
    recipe = load_recipe(
        "recipes/tiny_solrl.yaml",
        TINY
        + [
            "algorithm.train_precision=bf16",
            "algorithm.gradient_checkpointing=true",
            "sol.explore_precision=bf16",
            "sol.quant_backend=emulate",
        ],
    )
    learner = LearnerWorker(recipe=recipe)
    assert learner.policy.transformer.gradient_checkpointing
    assert learner.policy.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in learner.trainer.params.values()} == {torch.float32}
    before = {name: p.detach().clone() for name, p in learner.trainer.params.items()}
    learner.regenerate(PROMPTS, SEEDS, 0)
    metrics = learner.train(ADVANTAGES)
    assert np.isfinite(metrics["loss/nft"])
    assert max((p - before[name]).abs().max().item() for name, p in learner.trainer.params.items()) > 1e-4

    rollout = RolloutWorker(recipe=recipe)
    rollout.set_weights(learner.explore_weights(), version=1)

    merged = lora_merged_weights(learner.policy.transformer, OLD_ADAPTER)
    explore = dict(rollout.policy.transformer.named_parameters())
    assert all(torch.equal(explore[key], weight.to(torch.bfloat16)) for key, weight in merged.items())
    assert any(not torch.equal(rollout.base_weights[key].float(), weight) for key, weight in merged.items())
    with pytest.raises(StaleWeightsError, match="already holds version 1"):
        rollout.set_weights(learner.explore_weights(), version=1)


def test_a_worker_given_gpus_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device(0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"num_gpus=0.5, but torch sees no CUDA device"):
        worker_device(0.5)


def test_joining_the_learner_world_on_cpu_compiles_nothing(tmp_path):
    """DeepSpeed's shared-memory CPU op is not built: a lock left by a run killed while building it made every later run hang."""
    (tmp_path / "extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "extensions" / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm" / "lock").touch()
    code = (
        "import socket; import deepspeed.comm as dist; from actors.learners import join_world\n"
        "probe = socket.socket(); probe.bind(('127.0.0.1', 0)); port = probe.getsockname()[1]; probe.close()\n"
        "join_world(0, 1, '127.0.0.1', port); print('world size', dist.get_world_size())\n"
    )
    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "world size 1" in done.stdout, done.stderr[-2000:]
