import numpy as np
import pytest

from rl.config import load_recipe
from rollout import load_policy
from rollout.prompts import PromptSource, load_prompts
from rollout.samplers import _mix, seed_for, seeds_for
from rollout.tiny import prompt_set
from rollout.tiny.evaluate import evaluate_policy
from solray.driver import Driver, train

SMALL = [
    "run.steps=2",
    "algorithm.prompts_per_step=2",
    "algorithm.group_size=4",
    "sol.pool_size=8",
    "cluster.rollout_workers=0",
    "cluster.reward_workers=0",
    "cluster.remote_learners=false",
    "eval.enabled=false",
]


def test_seed_for_is_stable_and_distinct():
    seeds = {seed_for(0, step, p, j) for step in range(3) for p in range(4) for j in range(96)}
    assert len(seeds) == 3 * 4 * 96
    assert seed_for(0, 1, 2, 3) == seed_for(0, 1, 2, 3) != seed_for(1, 1, 2, 3)
    assert all(0 <= s < 2**31 for s in seeds)


def test_seeds_for_equals_seed_for_on_every_candidate_and_the_streams_never_change():
    rng = np.random.default_rng(0)
    prompts = np.concatenate([np.arange(-5, 400), rng.integers(0, 2**40, 1000)])  # negative: the plan streams' indices
    js = rng.integers(-3, 2**31, len(prompts))
    # sums of the seeds the pure-Python SplitMix64 (solray before seeds_for, 965baa8) gave: a changed stream changes every run
    pinned = {(0, 0): 1489183118562, (12345, 7): 1528884582621, (2**40 + 3, 99_999): 1483771969969, (2**64 - 1, 3): 1509140265991}
    for (run_seed, step), total in pinned.items():
        seeds = seeds_for(run_seed, step, prompts, js)
        assert seeds == [seed_for(run_seed, step, int(p), int(j)) for p, j in zip(prompts, js)]
        assert sum(seeds) == total
    assert [seed_for(0, 1, 2, 3), seed_for(7, 0, -3, 5)] == [754840286, 900461758]
    assert [int(_mix(123456789, 4, 0x5DE)), int(_mix(-1, 2**63, 0x5DE))] == [5612999257336594219, 7670718552120067905]  # step_noise's


def test_prompt_source_is_deterministic_per_step(tmp_path):
    source = PromptSource("tiny:train", run_seed=3)
    assert source.batch(5, 4) == PromptSource("tiny:train", run_seed=3).batch(5, 4)
    assert source.batch(5, 4) != source.batch(6, 4)
    assert len(set(source.batch(0, 4))) == 4 and set(source.batch(0, 4)) <= set(prompt_set("train"))
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n a dog \n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="neither 'tiny:train', 'tiny:eval', 'tiny:curriculum' nor an existing text file"):
        load_prompts("nope.txt")


@pytest.mark.slow
def test_in_process_sol_rl_steps_are_deterministic(tmp_path):
    runs = [load_recipe("recipes/tiny_solrl.yaml", [*SMALL, f"run.output_dir={tmp_path / name}"]) for name in ("a", "b")]
    first, second = train(runs[0]).history, train(runs[1]).history
    assert len(first) == 2
    for a, b in zip(first, second):
        assert a["reward/tiny_alignment"] == b["reward/tiny_alignment"]
        assert a["explore/reward_mean"] == b["explore/reward_mean"]
        assert a["loss/nft"] == pytest.approx(b["loss/nft"], rel=1e-6)
    assert {"time/explore", "time/score", "time/select", "time/regen", "time/rescore", "time/update", "time/sync"} <= set(first[0])
    assert all(np.isfinite(h["loss/nft"]) for h in first)


@pytest.mark.slow
def test_driver_evaluation_before_training_is_the_base_models_eval_protocol(tmp_path):
    recipe = load_recipe("recipes/tiny_solrl.yaml", [*SMALL, "eval.enabled=true", "eval.seeds_per_prompt=2", f"run.output_dir={tmp_path}"])
    metrics = Driver(recipe).evaluate()  # the LoRA starts at zero (B = 0): the trainable adapter is the base model
    base = evaluate_policy(load_policy("tiny"), seeds_per_prompt=2)
    assert metrics["eval/strict"] == base["strict"]
    assert metrics["eval/tiny_verifier"] == pytest.approx(base["reward"], abs=1e-12)
    assert {task: metrics[f"eval/task/{task}"] for task in base["per_task"]} == {
        task: row["strict"] for task, row in base["per_task"].items()
    }


@pytest.mark.slow
def test_driver_probes_the_trained_prompts_with_an_eval_only_verifier(tmp_path):
    overrides = [
        *SMALL, "eval.enabled=true", "eval.seeds_per_prompt=1", "eval.train_prompts=tiny:curriculum", "eval.train_seeds_per_prompt=2",
        "rewards.models=[{name: tiny_alignment}]", "eval.rewards=[tiny_verifier]", f"run.output_dir={tmp_path}",
    ]  # fmt: skip
    metrics = Driver(load_recipe("recipes/tiny_solrl.yaml", overrides)).evaluate()
    base = evaluate_policy(load_policy("tiny"), prompt_set("curriculum"), seeds_per_prompt=2)
    assert metrics["eval_train/strict"] == base["strict"]
    assert metrics["eval_train/tiny_verifier"] == pytest.approx(base["reward"], abs=1e-12)
    strict = base["strict"]
    assert metrics["eval_train/strict_se"] == pytest.approx(np.sqrt(strict * (1 - strict) / 31))  # the sample std (ddof 1) / sqrt(32)
    assert {"eval/strict", "eval/tiny_alignment", "eval/tiny_alignment_se", "eval_train/tiny_alignment"} <= metrics.keys()
    assert 0 < metrics["eval_train/tiny_alignment"] < 1


class RecordingRollout:
    """A rollout group of `n` workers that records each explore call; a shard's "images" are its request."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, []

    def __len__(self) -> int:
        return self.n

    def explore(self, index, request):
        self.calls.append((index, request))
        return request


@pytest.mark.parametrize("workers, per_worker, calls", [(3, 4, 12), (2, 1, 2), (64, 4, 24)])
def test_explore_shards_span_prompts_and_scores_land_at_their_candidates(workers, per_worker, calls):
    """P x N = 4 x 6 candidates in rollout_workers x explore_shards_per_worker shards (at most one per candidate), shard i
    on worker i % n; each candidate's proxy reward lands at [prompt, candidate] whatever shard carried it."""
    from solray.exploration import SolExploration

    recipe = load_recipe(
        "recipes/tiny_solrl.yaml",
        ["algorithm.prompts_per_step=4", "algorithm.group_size=2", "sol.pool_size=6", f"cluster.explore_shards_per_worker={per_worker}"],
    )
    exploration = SolExploration.__new__(SolExploration)  # no actors: the group and the scorer are stand-ins
    exploration.recipe, exploration.rollout, exploration.version, exploration.weights_ref = recipe, RecordingRollout(workers), 0, None
    # the stand-in reward scores a candidate with its seed, so the table says where each one landed
    exploration.score = lambda requests, prompts: np.concatenate([np.array(r.seeds, dtype=np.float64)[:, None] for r in requests])
    prompts = ["a", "b", "c", "d"]
    pool = exploration.score_pool(exploration.explore(prompts, 5), prompts, 5, 0)
    recorded = exploration.rollout.calls
    assert [index for index, _ in recorded] == list(range(calls))  # the group sends shard i to worker i % n
    assert [len(r.seeds) for _, r in recorded] == [24 // calls] * calls
    assert [p for _, r in recorded for p in r.prompts] == [p for p in prompts for _ in range(6)]
    expected = [[seed_for(recipe.run.seed, 5, p, j) for j in range(6)] for p in range(4)]
    np.testing.assert_array_equal(pool.scores[..., 0], expected)
