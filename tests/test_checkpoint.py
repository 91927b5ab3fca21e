import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import rl.checkpoint as checkpoint
from actors.workers import LearnerWorker, RewardWorker
from rl.advantages import group_advantages
from rl.checkpoint import (
    CheckpointError,
    adapter_state_dict,
    attach_lora,
    checkpoint_steps,
    join_tensors,
    latest_checkpoint,
    load_checkpoint,
    load_lora,
    lora_config,
    newest_valid_checkpoint,
    save_checkpoint,
    save_lora,
    split_tensors,
    weights_fingerprint,
)
from rl.config import RecipeError, load_recipe, recipe_changes
from rollout import load_policy
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER
from rollout.tiny import prompt_set
from rollout.tiny.model import WEIGHTS_DIR
from solray.driver import train
from solray.tracking import read_metrics

REPO = Path(__file__).parents[1]
# The in-process tiny Sol-RL run of tests/test_driver.py, a little shorter per step.
SMALL = [
    "algorithm.prompts_per_step=2",
    "algorithm.group_size=4",
    "sol.pool_size=8",
    "sol.explore_steps=3",
    "sampler.steps=4",
    "cluster.rollout_workers=0",
    "cluster.reward_workers=0",
    "cluster.remote_learners=false",
    "logging.progress=false",
    "eval.enabled=false",
]


def _adamw() -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    param = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    return param, torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.9))


def _adamw_steps(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, targets: list[float]) -> None:
    for target in targets:
        param.grad = param.detach() - target
        optimizer.step()


def test_split_tensors_round_trips_optimizer_and_generator_state(tmp_path):
    param, optimizer = _adamw()
    _adamw_steps(param, optimizer, [1.0, 2.0])
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    skeleton, tensors = split_tensors(
        {"step": 2, "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "balancer": None}
    )
    assert set(tensors) == {"optimizer/state/0/step", "optimizer/state/0/exp_avg", "optimizer/state/0/exp_avg_sq", "generator"}
    save_file(tensors, tmp_path / "state.safetensors")
    restored = join_tensors(json.loads(json.dumps(skeleton)), load_file(tmp_path / "state.safetensors"))
    assert list(restored["optimizer"]["state"]) == [0]  # int keys survive JSON, or torch would drop the moments
    assert restored["step"] == 2 and restored["balancer"] is None

    resumed_param, resumed = _adamw()
    resumed_param.data.copy_(param.detach())
    resumed.load_state_dict(restored["optimizer"])
    _adamw_steps(param, optimizer, [3.0, 4.0])
    _adamw_steps(resumed_param, resumed, [3.0, 4.0])
    assert torch.equal(resumed_param, param)
    resumed_generator = torch.Generator()
    resumed_generator.set_state(restored["generator"])
    assert torch.equal(torch.rand(4, generator=resumed_generator), torch.rand(4, generator=generator))
    with pytest.raises(TypeError, match="state at 'x' is a set"):
        split_tensors({"x": {1, 2}})


def _learner_step(learner: LearnerWorker, rewarder: RewardWorker, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    rewards = torch.tensor(rewarder.score(learner.regenerate(prompts, seeds, 0), prompts))
    return learner.train(group_advantages(rewards, torch.arange(len(prompts)) // 4).numpy())


def test_learner_restored_from_a_checkpoint_continues_bit_identically(tmp_path):
    # Three rewards with QP balancing: the balancer's weights are part of the state; a full
    # solve at step 0 and 2, the amortised update (which uses the saved weights) at step 1.
    recipe = load_recipe(REPO / "recipes/tiny_marble.yaml", ["sampler.steps=3", "balance.solve_every=2", "algorithm.micro_batch=8"])
    rewarder = RewardWorker(recipe=recipe)
    prompts = [p for p in prompt_set("train")[:2] for _ in range(4)]
    original = LearnerWorker(recipe=recipe)
    _learner_step(original, rewarder, prompts, list(range(8)))
    path = save_checkpoint(tmp_path, [original.checkpoint_state()], {"step": 1, "version": 1}, keep=2)

    restored = LearnerWorker(recipe=recipe)
    (learner_state,), run_state = load_checkpoint(path)
    restored.restore_state(learner_state)
    assert run_state == {"step": 1, "version": 1} and restored.trainer.step == 1
    for seeds in (list(range(8, 16)), list(range(16, 24))):
        expected = _learner_step(original, rewarder, prompts, seeds)
        assert _learner_step(restored, rewarder, prompts, seeds) == expected
    assert "balance/weight_2" in expected
    # the EMA (evaluation's weights) is part of the state, and its LoRA is written for sampling
    assert all(torch.equal(restored.trainer.ema.weights[k], w) for k, w in original.trainer.ema.weights.items())
    ema_lora = load_lora(path / "ema_lora")
    assert ema_lora.keys() == adapter_state_dict(original.policy, TRAINABLE_ADAPTER).keys()
    for adapter in (TRAINABLE_ADAPTER, OLD_ADAPTER):
        mine, theirs = adapter_state_dict(restored.policy, adapter), adapter_state_dict(original.policy, adapter)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def _fake_learner_states(value: float) -> list[dict]:
    """Two learners: the same adapters, each its own trainer state (ZeRO shards differ by rank)."""
    adapters = {
        TRAINABLE_ADAPTER: {"block.lora_A.weight": torch.full((2, 3), value)},
        OLD_ADAPTER: {"block.lora_A.weight": torch.zeros(2, 3)},
    }
    config = {"r": 2, "lora_alpha": 4.0, "target_modules": ["block"]}
    ema = {"block.lora_A.weight": torch.full((2, 3), value / 2)}
    return [
        {
            "adapters": adapters,
            "ema_lora": ema,
            "lora_config": config,
            "trainer": {"step": int(value), "shard": torch.full((rank + 1,), value)},
        }
        for rank in range(2)
    ]


def test_saves_are_atomic_and_pruned_and_a_killed_save_is_ignored(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, _fake_learner_states(step), {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000006"]

    def disk_full(tensors, path, metadata=None):
        raise OSError(f"no space left writing {Path(path).name}")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="no space left"):
        save_checkpoint(tmp_path, _fake_learner_states(8), {"step": 8}, keep=2)
    assert (tmp_path / ".tmp-step_000008").is_dir()  # what a kill mid-save leaves
    assert sorted(checkpoint_steps(tmp_path)) == [4, 6] and latest_checkpoint(tmp_path).name == "step_000006"

    monkeypatch.undo()
    save_checkpoint(tmp_path, _fake_learner_states(8), {"step": 8}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000006", "step_000008"]
    learners, run_state = load_checkpoint(latest_checkpoint(tmp_path))
    assert run_state == {"step": 8} and [learner["trainer"]["step"] for learner in learners] == [8, 8]
    assert [learner["trainer"]["shard"].tolist() for learner in learners] == [[8.0], [8.0, 8.0]]
    for learner in learners:
        assert torch.equal(learner["adapters"][TRAINABLE_ADAPTER]["block.lora_A.weight"], torch.full((2, 3), 8.0))
        assert learner["lora_config"] == {"r": 2, "lora_alpha": 4.0, "target_modules": ["block"]}
    with pytest.raises(FileExistsError, match="step_000008 already exists"):
        save_checkpoint(tmp_path, _fake_learner_states(8), {"step": 8}, keep=2)


def test_saved_lora_loads_with_diffusers_pipeline_loader_and_peft_config(tmp_path):
    policy = load_policy("tiny")
    policy.add_lora(4, 8.0, init_seed=0)
    with torch.no_grad():
        for param in policy.adapter_parameters(TRAINABLE_ADAPTER).values():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    save_lora(adapter_state_dict(policy, TRAINABLE_ADAPTER), lora_config(policy, TRAINABLE_ADAPTER), tmp_path / "lora")

    # What StableDiffusion3Pipeline.load_lora_weights(dir) runs for the transformer.
    fresh = load_policy("tiny")
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "lora"), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, fresh.transformer, adapter_name="loaded", metadata=metadata)
    assert (fresh.transformer.peft_config["loaded"].r, fresh.transformer.peft_config["loaded"].lora_alpha) == (4, 8.0)
    config = LoraConfig.from_pretrained(str(tmp_path / "lora"))
    assert (config.r, config.lora_alpha) == (4, 8.0)

    prompts = prompt_set("train")[:3]
    x_t = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6, 0.9])
    with torch.no_grad(), policy.adapter(TRAINABLE_ADAPTER):
        trained = policy.velocity(x_t, t, policy.encode_prompts(prompts))
    with torch.no_grad(), policy.adapter(None):
        base = policy.velocity(x_t, t, policy.encode_prompts(prompts))
    with torch.no_grad():
        loaded = fresh.velocity(x_t, t, fresh.encode_prompts(prompts))
    assert (trained - base).abs().max() > 0.1
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)

    # What `solray sample/eval --lora` runs: a checkpoint directory or its lora/ folder.
    attached = load_policy("tiny")
    attach_lora(attached, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(attached.velocity(x_t, t, attached.encode_prompts(prompts)), trained, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"holds no pytorch_lora_weights.safetensors: pass a checkpoint directory"):
        attach_lora(load_policy("tiny"), tmp_path / "missing")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda step: _truncate(step / "trainer.safetensors"), r"cannot be read \(SafetensorError"),
        (lambda step: (step / "state.json").write_text("{garbage"), r"cannot be read \(JSONDecodeError"),
        (lambda step: (step / "state.json").unlink(), r"cannot be read \(FileNotFoundError: .*state.json"),
        (lambda step: shutil.rmtree(step / "lora"), r"cannot be read \(FileNotFoundError: .*lora"),
        (
            lambda step: [shutil.rmtree(child) if child.is_dir() else child.unlink() for child in step.iterdir()],
            r"cannot be read \(FileNotFoundError",
        ),
        (
            lambda step: save_file(
                {"transformer.block.lora_A.weight": torch.full((2, 3), float("nan"))}, step / "lora" / checkpoint.LORA_WEIGHTS
            ),
            r"1 LoRA tensors hold inf or NaN, e.g. \['lora/block.lora_A.weight'\]",
        ),
    ],
    ids=["truncated_safetensors", "garbage_state", "no_state", "no_lora", "empty_dir", "nan_lora"],
)
def test_a_damaged_checkpoint_is_refused_by_name_and_the_newest_sound_one_is_found(tmp_path, damage, message):
    for step in (2, 4):
        save_checkpoint(tmp_path, _fake_learner_states(step), {"step": step, "recipe": {}}, keep=2)
    damage(tmp_path / "step_000004")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "step_000004")) + ".*" + message):
        load_checkpoint(tmp_path / "step_000004")
    sound, (_, run_state), skipped = newest_valid_checkpoint(tmp_path)
    assert sound == tmp_path / "step_000002" and run_state["step"] == 2 and [path.name for path, _ in skipped] == ["step_000004"]
    assert re.search(message, skipped[0][1])


def test_resume_falls_back_past_a_truncated_checkpoint_and_sets_it_aside(tmp_path, caplog):
    recipe = load_recipe(
        REPO / "recipes/tiny_solrl.yaml",
        SMALL + [f"run.output_dir={tmp_path}", "run.steps=2", "checkpoint.every=1", "logging.grid_every=0"],
    )
    first = train(recipe)
    _truncate(tmp_path / "checkpoints" / "step_000002" / "trainer.safetensors")
    resumed = train(recipe.model_copy(update={"run": recipe.run.model_copy(update={"steps": 3})}))
    assert "skipping checkpoint step_000002" in caplog.text and "cannot be read (SafetensorError" in caplog.text
    assert [row["step"] for row in resumed.history] == [0, 1, 2]  # step 1 (0-based) again, then step 2
    assert resumed.history[1]["reward/tiny_alignment"] == first.history[1]["reward/tiny_alignment"]  # the step is repeated exactly
    assert (tmp_path / "checkpoints" / "unreadable-step_000002").is_dir()
    assert sorted(checkpoint_steps(tmp_path / "checkpoints")) == [2, 3]


def test_resume_never_refuses_an_output_dir_with_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "checkpoints", _fake_learner_states(2), {"step": 2}, keep=1)
    recipe = load_recipe(REPO / "recipes/tiny_solrl.yaml", SMALL + [f"run.output_dir={tmp_path}", "run.resume=never"])
    with pytest.raises(FileExistsError, match=r"holds a checkpoint of an earlier run \(step_000002\): set run.resume=auto"):
        train(recipe)


def test_resume_refuses_a_changed_recipe_and_names_the_keys(tmp_path):
    recipe = load_recipe(REPO / "recipes/tiny_solrl.yaml", SMALL + [f"run.output_dir={tmp_path}"])
    run_state = {"step": 2, "recipe": recipe.model_dump(mode="json")}
    save_checkpoint(tmp_path / "checkpoints", _fake_learner_states(2), run_state, keep=1)
    changed = load_recipe(
        REPO / "recipes/tiny_solrl.yaml", SMALL + [f"run.output_dir={tmp_path}", "optim.lr=0.01", "sol.pool_size=16", "run.steps=50"]
    )
    with pytest.raises(RecipeError, match=r"another recipe \(optim.lr: 0.003 -> 0.01; sol.pool_size: 8 -> 16\); resuming would mix"):
        train(changed)
    # Changing only the length, logging, evaluation or cluster layout is a continuation.
    assert (
        recipe_changes(
            run_state["recipe"],
            load_recipe(REPO / "recipes/tiny_solrl.yaml", SMALL + ["run.steps=50", "eval.every=5", "logging.grid_every=0"]),
        )
        == []
    )
    # A checkpoint written before a key existed resumes when the key keeps its default.
    older = copy.deepcopy(run_state["recipe"])
    del older["algorithm"]["train_precision"]
    assert recipe_changes(older, recipe) == []
    assert recipe_changes(older, load_recipe(REPO / "recipes/tiny_solrl.yaml", SMALL + ["algorithm.train_precision=bf16"])) == [
        "algorithm.train_precision: 'auto' (fp32) -> 'bf16'"
    ]
    # cluster.* may change, but "auto" must not resolve to another precision: a CPU run resumed on GPU learners.
    on_gpus = SMALL + ["cluster.learner_resources.num_gpus=1"]
    assert recipe_changes(run_state["recipe"], load_recipe(REPO / "recipes/tiny_solrl.yaml", on_gpus)) == [
        "algorithm.train_precision: 'auto' (fp32) -> 'auto' (bf16)"
    ]
    assert (
        recipe_changes(run_state["recipe"], load_recipe(REPO / "recipes/tiny_solrl.yaml", on_gpus + ["algorithm.train_precision=fp32"]))
        == []
    )


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run exited with {process.returncode} before it was killed:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run did not reach its step-2 checkpoint in time")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline_depth", [0, 1])
def test_run_killed_mid_way_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path, pipeline_depth):
    overrides = SMALL + ["run.steps=4", "checkpoint.every=2", f"algorithm.pipeline_depth={pipeline_depth}"]
    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "solray.cli", "train", "recipes/tiny_solrl.yaml", *overrides, f"run.output_dir={killed_dir}"]
    process = subprocess.Popen(
        command, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # Kill once step 2 is logged: after the step-2 checkpoint, with a metrics row it does not cover.
    _wait_for(lambda: any(row["step"] == 2 for row in read_metrics(killed_dir / "metrics.jsonl")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert sorted(checkpoint_steps(killed_dir / "checkpoints")) == [2]
    (killed_dir / "checkpoints" / ".tmp-step_000004").mkdir()  # as if the kill had hit the next save
    exploration = json.loads((killed_dir / "checkpoints/step_000002/state.json").read_text())["exploration"]
    # depth 1: step 2's pool, explored with v1 during step 1, is kept with its scores [P, N, R]
    assert [(e["step"], e["version"], len(e["scores"])) for e in exploration.values()] == [(2, 1, 2)] * pipeline_depth

    resumed = train(load_recipe(REPO / "recipes/tiny_solrl.yaml", overrides + [f"run.output_dir={killed_dir}"])).history
    uninterrupted = train(
        load_recipe(REPO / "recipes/tiny_solrl.yaml", overrides + [f"run.output_dir={tmp_path / 'uninterrupted'}"])
    ).history

    def untimed(row: dict) -> dict:
        return {k: v for k, v in row.items() if not k.startswith("time/")}

    assert [row["step"] for row in resumed] == [0, 1, 2, 3]
    assert [untimed(row) for row in resumed] == [untimed(row) for row in uninterrupted]
    assert read_metrics(killed_dir / "metrics.jsonl") == resumed
    assert sorted(checkpoint_steps(killed_dir / "checkpoints")) == [2, 4]
    assert not (killed_dir / "checkpoints" / ".tmp-step_000004").exists()
    assert resumed[3]["loss/nft"] != resumed[2]["loss/nft"]
    assert [row["explore/staleness"] for row in resumed] == [0, pipeline_depth, pipeline_depth, pipeline_depth]


def test_weights_fingerprint_ignores_the_load_precision_and_sees_changed_weights():
    fp32 = load_policy("tiny").transformer
    fingerprint = weights_fingerprint(fp32)
    assert weights_fingerprint(load_policy("tiny", precision="bf16").transformer) == fingerprint
    with torch.no_grad():
        fp32.transformer_blocks[2].attn.to_q.weight.mul_(1.01)  # 1%: about 2.5 bf16 steps
    assert weights_fingerprint(fp32) != fingerprint


def test_resume_refuses_other_base_weights_behind_the_same_model_path(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(WEIGHTS_DIR, base)
    overrides = SMALL + [f"model.path={base}", f"run.output_dir={tmp_path / 'run'}"]
    train(load_recipe(REPO / "recipes/tiny_solrl.yaml", overrides + ["run.steps=1"]))
    saved = json.loads((tmp_path / "run/checkpoints/step_000001/state.json").read_text())["base_fingerprint"]
    assert saved == weights_fingerprint(load_policy(str(base)).transformer)

    weights_file = base / "transformer/diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["proj_out.weight"] = weights["proj_out.weight"] * 1.01  # as if model.path had been re-trained
    save_file(weights, weights_file)
    expected = rf"step_000001 was trained on other base weights: model.path '{re.escape(str(base))}' now loads a transformer with fingerprint [0-9a-f]{{16}}, the checkpoint's had {saved}"
    with pytest.raises(RecipeError, match=expected):
        train(load_recipe(REPO / "recipes/tiny_solrl.yaml", overrides + ["run.steps=2"]))
