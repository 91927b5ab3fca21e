from pathlib import Path

import pytest

from rewards import build_reward
from rl.config import Recipe, RecipeError, load_recipe


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_and_derived_sizes(tmp_path):
    recipe = load_recipe(_write(tmp_path, "algorithm:\n  prompts_per_step: 3\n  group_size: 4\nsol:\n  pool_size: 12\n"))
    assert recipe.samples_per_step == 12 and recipe.explored_per_step == 36
    assert load_recipe(_write(tmp_path, "sol:\n  enabled: false\n")).explored_per_step == 0
    assert Recipe().model.path == "tiny"
    assert Recipe().base_precision == "fp32"  # auto, learners without GPUs
    assert load_recipe(_write(tmp_path, "cluster:\n  learner_resources: {num_gpus: 1}\n")).base_precision == "bf16"
    assert (
        load_recipe(_write(tmp_path, "algorithm:\n  train_precision: fp32\ncluster:\n  learner_resources: {num_gpus: 1}\n")).base_precision
        == "fp32"
    )
    # a training reward also named in eval.rewards (say after overriding rewards.models) is scored once
    both = load_recipe(
        _write(tmp_path, "rewards:\n  models: [{name: tiny_verifier}]\neval:\n  rewards: [tiny_alignment, tiny_verifier, tiny_alignment]\n")
    )
    assert both.eval_only_rewards == ["tiny_alignment"]


def test_overrides_use_dotted_keys_and_yaml_types(tmp_path):
    recipe = load_recipe(_write(tmp_path, "run:\n  steps: 5\n"), ["run.steps=7", "sol.enabled=false", "optim.lr=1e-3"])
    assert recipe.run.steps == 7 and recipe.sol.enabled is False and recipe.optim.lr == 1e-3


def test_optimizer_and_per_algorithm_keys_are_their_own(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, ""), ["optim.betas=[0.8, 0.95]", "algorithm.grpo.adv_clip=2.5", "cluster.learners=2", "cluster.zero_stage=2"]
    )
    assert recipe.optim.betas == (0.8, 0.95) and Recipe().optim.betas == (0.9, 0.999)
    assert (recipe.algorithm.grpo.adv_clip, recipe.algorithm.nft.adv_clip) == (2.5, 5.0)
    assert (recipe.cluster.learners, recipe.cluster.remote_learners, recipe.cluster.zero_stage) == (2, True, 2)
    threads = load_recipe(_write(tmp_path, ""), ["cluster.torch_threads=3", "cluster.learner_resources.torch_threads=2"]).cluster
    assert (threads.threads(threads.learner_resources), threads.threads(threads.rollout_resources)) == (2, 3)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("run:\n  stepz: 3\n", [], r"recipe.yaml: run.stepz: Extra inputs are not permitted"),
        ("run:\n  steps: many\n", [], r"run.steps: Input should be a valid integer"),
        ("colour: red\n", [], r"colour: Extra inputs are not permitted"),
        ("", ["sol.pool_size=0"], r"sol.pool_size: Input should be greater than or equal to 2"),
        ("", ["algorithm.group_size=32", "sol.pool_size=16"], r"group_size \(32\) must be <= sol.pool_size \(16\)"),
        ("", ["balance.mode=qp"], r"balance.mode 'qp' needs at least 2 entries in rewards.models"),
        ("", ["cluster.zero_stage=3"], r"cluster.zero_stage: Input should be 0, 1 or 2"),
        ("", ["cluster.learners=2", "cluster.remote_learners=false"], r"cluster.learners = 2 needs cluster.remote_learners: true"),
        ("", ["optim.betas=[0.9, 1.0]"], r"optim.betas.1: Input should be less than 1"),
        ("- a\n- b\n", [], r"a recipe is a mapping of sections, got list"),
        (
            "sol:\n  keep_high_precision: ['blocks.(2']\n",
            [],
            r"sol.keep_high_precision: Value error, 'blocks.\(2' is not a regular expression: missing \)",
        ),
        ("sol:\n  skip_modules: ['norm[']\n", [], r"sol.skip_modules: Value error, 'norm\[' is not a regular expression"),
        (
            "",
            ["algorithm.name=grpo", "sol.enabled=false", "algorithm.grpo.sde_window_size=4", "algorithm.grpo.sde_window_range=[0, 3]"],
            r"must satisfy lo < hi <= sampler.steps \(10\) and hold sde_window_size \(4\)",
        ),
        (
            "",
            ["algorithm.name=grpo", "sol.enabled=false", "algorithm.grpo.sde_window_size=2", "algorithm.grpo.sde_window_range=[0, 12]"],
            r"lo < hi <= sampler.steps \(10\)",
        ),
        ("", ["algorithm.grpo.sde_window_range=[0, 5]"], r"sde_window_range is set but sde_window_size is 0"),
        ("", ["balance.amortized=pareto"], r"balance.amortized: Input should be 'marble' or 'normalized'"),
        ("", ["eval.adapter=old"], r"eval.adapter: Input should be 'ema' or 'current'"),
        ("", ["model.schedule=cosine"], r"model.schedule: Input should be 'pipeline' or 'linear'"),
        ("", ["optim.lr=.inf"], r"optim.lr: Input should be a finite number"),
        ("", ["rewards.models=[{name: tiny_verifier, weight: .nan}]"], r"rewards.models.0.weight: Input should be a finite number"),
        ("", ["model.shift=.inf"], r"model.shift: Input should be a finite number"),
        (
            "",
            ["rewards.models=[{name: tiny_verifier, weight: -1}]"],
            r"rewards.models.0.weight: Input should be greater than or equal to 0",
        ),
        ("", ["rewards.models=[{name: tiny_verifier, weight: 0}]"], r"at least one reward needs a positive weight"),
        ("", ["balance.amortized=normalized"], r"balance.amortized 'normalized' applies to balance.mode 'qp' only"),
        ("", ["algorithm.grpo.sde_window_size=2"], r"sde_window_size applies to algorithm.name 'grpo' only"),
        (
            "",
            [
                "algorithm.name=grpo",
                "sol.enabled=false",
                "algorithm.grpo.cps=true",
                "algorithm.grpo.sde_window_size=1",
                "algorithm.grpo.sde_window_range=[9, 10]",
            ],
            r"a CPS window may hold only the last step",
        ),
        ("", ["sol.explore_precision=fp4"], r"sol.explore_precision: Input should be 'nvfp4', 'fp8', 'bf16' or 'fp32'"),
        ("", ["sol.quant_backend=te"], r"sol.quant_backend: Input should be 'auto', 'scaled_mm', 'modelopt' or 'emulate'"),
        (
            "",
            ["sol.explore_precision=fp8", "sol.quant_backend=modelopt"],
            r"sol: Value error, sol.quant_backend 'modelopt' quantizes to nvfp4 only, not explore_precision 'fp8'",
        ),
        (
            "",
            ["sol.allow_fp8=true", "sol.explore_precision=fp8"],
            r"sol.allow_fp8 lets quant_backend 'auto' trade nvfp4 for fp8; it does nothing with explore_precision 'fp8'",
        ),
        (
            "",
            ["sol.allow_fp8=true", "sol.quant_backend=emulate"],
            r"does nothing with explore_precision 'nvfp4' and quant_backend 'emulate'",
        ),
        ("", ["sol.allow_fp8s=true"], r"sol.allow_fp8s: Extra inputs are not permitted"),
        (
            "run:\n  steps: 3\n  seed: 1\n  steps: 4\n",
            [],
            r"recipe.yaml: not valid YAML \(line 4, column 3\): key 'steps' given twice \(lines 2 and 4\)",
        ),
        ("run:\n  steps: [3\n", [], r"recipe.yaml: not valid YAML \(line 3, column 1\): expected ',' or ']', but got '<stream end>'"),
        ("run:\n  name: 'x\n", [], r"recipe.yaml: not valid YAML \(line 3, column 1\): found unexpected end of stream"),
        ("", ["run.steps=true"], r"run.steps: Value error, Input should be a number, not the boolean true"),
        ("", ["optim.lr=yes"], r"optim.lr: Value error, Input should be a number, not the boolean true"),
        ("", ["run.seed=-1"], r"run.seed: Input should be greater than or equal to 0"),
        ("", ["run.steps=[1"], r"override 'run.steps=\[1': not valid YAML"),
        # billion laughs: 9 levels of 10 aliases each expand to 10^9 values
        (
            "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))
            + "rewards:\n  models: [{name: brightness, kwargs: {bomb: *a9}}]\n",
            [],
            r"recipe.yaml: expands to more than 100000 values \(YAML aliases\?\)",
        ),
        ("run: &loop\n  nested: *loop\n", [], r"expands to more than 100000 values"),
    ],
)
def test_bad_recipes_name_the_key_and_the_file(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, text), overrides)


def test_fp8_exploring_and_the_kernel_backend_validate(tmp_path):
    recipe = load_recipe(_write(tmp_path, "sol:\n  explore_precision: fp8\n  quant_backend: scaled_mm\n"))
    assert (recipe.sol.explore_precision, recipe.sol.quant_backend, recipe.sol.allow_fp8) == ("fp8", "scaled_mm", False)
    assert load_recipe(_write(tmp_path, ""), ["sol.allow_fp8=true"]).sol.allow_fp8 is True


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "latin1.yaml").write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml: not UTF-8 text \(byte 16: invalid continuation byte\)"):
        load_recipe(tmp_path / "latin1.yaml")
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(_write(tmp_path, ""), ["run.steps"])


def test_every_shipped_recipe_validates():
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    names = {path.stem for path in recipes}
    assert {"tiny_solrl", "sd35m_nft", "sd35m_grpo", "sd35m_marble", "sd35l_solrl", "flux1_solrl", "sana_solrl"} <= names
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.run.name == path.stem
        if recipe.sol.enabled:
            assert recipe.algorithm.group_size <= recipe.sol.pool_size


def test_tiny_baselines_differ_from_tiny_solrl_only_where_they_should():
    recipes = Path(__file__).parents[1] / "recipes"
    solrl = load_recipe(recipes / "tiny_solrl.yaml").model_dump()
    nft = load_recipe(recipes / "tiny_nft.yaml").model_dump()
    assert nft["sol"] == solrl["sol"] | {"enabled": False}
    assert nft["run"] == solrl["run"] | {"name": "tiny_nft", "output_dir": "outputs/tiny_nft"}
    assert {k: v for k, v in nft.items() if k not in ("sol", "run")} == {k: v for k, v in solrl.items() if k not in ("sol", "run")}

    grpo = load_recipe(recipes / "tiny_grpo.yaml")
    assert (grpo.algorithm.name, grpo.sol.enabled, grpo.explored_per_step, grpo.samples_per_step) == ("grpo", False, 0, 32)
    with pytest.raises(RecipeError, match="sol.enabled with algorithm.name 'grpo' is not supported"):
        load_recipe(recipes / "tiny_grpo.yaml", ["sol.enabled=true"])

    marble = load_recipe(recipes / "tiny_marble.yaml")
    assert [spec.name for spec in marble.rewards.models] == ["tiny_verifier", "brightness", "jpeg_compressibility"]
    assert (marble.balance.mode, marble.algorithm.nft.beta) == ("qp", 0.1)
    assert [build_reward(spec.name).name for spec in marble.rewards.models] == ["tiny_verifier", "brightness", "jpeg_compressibility"]


# Each production recipe holds the settings of the code it reproduces (README, "Parity with the
# reference implementations"): Sol-RL = NVlabs/Sana configs/sol_rl/{base,sd3,flux1,sana}.py;
# DiffusionNFT = NVlabs/DiffusionNFT config/nft.py + base.py; Flow-GRPO = yifan123/flow_grpo config/grpo.py + base.py.
REFERENCE_SETTINGS = {
    # Sol-RL: 48 groups, 24 of 96 (best/worst), 6 NVFP4 preview steps, r32/a64, lr 3e-4, KL 1e-4, EMA evaluation
    "sd35l_solrl": {
        "model.resolution": 1024,
        "sampler.solver": "dpm2",
        "sampler.steps": 10,
        "eval.steps": 40,
        "model.cfg_scale": 1.0,
        "algorithm.nft.timestep_fraction": 0.6,
        "optim.grad_clip": 0.002,
        "algorithm.nft.kl_weight": 1e-4,
    },
    "flux1_solrl": {
        "model.resolution": 512,
        "sampler.solver": "dpm2",
        "sampler.steps": 10,
        "eval.steps": 28,
        "model.distilled_guidance": 1.0,
        "model.lora_targets": ["to_q", "to_k", "to_v", "to_out.0"],
        "algorithm.nft.timestep_fraction": 0.4,
        "optim.grad_clip": 1.0,
    },
    "sana_solrl": {
        "model.resolution": 1024,
        "model.schedule": "linear",
        "sampler.solver": "euler",
        "sampler.steps": 10,
        "eval.steps": 40,
        "algorithm.nft.timestep_fraction": 0.6,
        "optim.grad_clip": 1.0,
    },
    # DiffusionNFT sd3_pickscore / sd3_multi_reward (+ MARBLE's balancing): 512 px, 48 x 24, 0.99, 40 eval steps
    "sd35m_nft": {
        "model.resolution": 512,
        "sampler.steps": 10,
        "eval.steps": 40,
        "algorithm.nft.timestep_fraction": 0.99,
        "algorithm.nft.beta": 1.0,
        "algorithm.group_size": 24,
        "algorithm.prompts_per_step": 48,
    },
    "sd35m_marble": {
        "model.resolution": 512,
        "sampler.steps": 25,
        "algorithm.nft.timestep_fraction": 0.99,
        "algorithm.nft.beta": 0.1,
        "balance.solve_every": 10,
        "balance.ema": 0.7,
        "balance.amortized": "marble",
    },
    # Flow-GRPO pickscore_sd3 and pickscore_sd3_fast_nocfg (CPS)
    "sd35m_grpo": {
        "model.resolution": 512,
        "model.cfg_scale": 4.5,
        "sampler.steps": 10,
        "eval.steps": 40,
        "algorithm.grpo.beta_kl": 0.01,
        "algorithm.grpo.clip_range": 1e-4,
        "algorithm.grpo.noise_level": 0.7,
        "algorithm.grpo.timestep_fraction": 0.99,
        "algorithm.group_size": 24,
        "algorithm.prompts_per_step": 48,
        "optim.lr": 3e-4,
        "eval.ema_every": 8,
    },
    "sd35m_grpo_cps": {
        "model.cfg_scale": 1.0,
        "algorithm.grpo.cps": True,
        "algorithm.grpo.noise_level": 0.8,
        "algorithm.grpo.clip_range": 1e-5,
        "algorithm.grpo.beta_kl": 0.0,
        "algorithm.grpo.sde_window_size": 3,
        "algorithm.grpo.sde_window_range": (0, 5),
        "algorithm.group_size": 18,
        "algorithm.prompts_per_step": 64,
    },
    "tiny_grpo_cps": {
        "algorithm.grpo.cps": True,
        "algorithm.grpo.noise_level": 0.8,
        "algorithm.grpo.clip_range": 1e-5,
        "algorithm.grpo.beta_kl": 0.0,
        "algorithm.grpo.sde_window_size": 3,
        "algorithm.grpo.sde_window_range": (0, 5),
    },
}
SOL_RL = {
    "sol.pool_size": 96,
    "algorithm.group_size": 24,
    "algorithm.prompts_per_step": 48,
    "sol.explore_steps": 6,
    "sol.selection": "best_worst",
    "algorithm.lora_rank": 32,
    "algorithm.lora_alpha": 64.0,
    "optim.lr": 3e-4,
    "algorithm.nft.kl_weight": 1e-4,
    "eval.adapter": "ema",
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SETTINGS))
def test_production_recipes_hold_the_reference_settings(name):
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml")
    expected = REFERENCE_SETTINGS[name] | (SOL_RL if name.endswith("solrl") else {})
    for dotted, value in expected.items():
        node = recipe
        for key in dotted.split("."):
            node = getattr(node, key)
        assert node == value, f"{name}: {dotted} is {node!r}, the reference has {value!r}"


def test_public_dump_redacts_secret_named_values_and_a_resume_ignores_them():
    from rl.config import recipe_changes

    def judge(**kwargs):
        return Recipe.model_validate({"rewards": {"models": [{"name": "vlm_judge", "kwargs": kwargs}]}})

    recipe = judge(url="http://judge:8000/v1", api_key="sk-planted", max_tokens=64, extra={"hf_token": "hf-planted", "password": None})
    kwargs = recipe.public_dump()["rewards"]["models"][0]["kwargs"]
    assert kwargs == {
        "url": "http://judge:8000/v1",
        "api_key": "<redacted>",
        "max_tokens": 64,
        "extra": {"hf_token": "<redacted>", "password": None},
    }
    assert recipe.rewards.models[0].kwargs["api_key"] == "sk-planted"  # the recipe itself keeps it: the reward needs it
    # Resuming from the redacted dump, from a checkpoint written in plain text before redaction, or with the key
    # moved into the environment (no api_key kwarg) is no recipe change; any other kwarg still is.
    assert recipe_changes(recipe.public_dump(), recipe) == []
    assert recipe_changes(recipe.model_dump(mode="json"), judge(url="http://judge:8000/v1", max_tokens=64, extra={})) == []
    assert recipe_changes(recipe.public_dump(), judge(url="http://judge:8000/v1", api_key="sk-other", max_tokens=32, extra={})) == [
        "rewards.models: [{'name': 'vlm_judge', 'weight': 1.0, 'kwargs': {'url': 'http://judge:8000/v1', 'max_tokens': 64, 'extra': {}}}] -> "
        "[{'name': 'vlm_judge', 'weight': 1.0, 'kwargs': {'url': 'http://judge:8000/v1', 'max_tokens': 32, 'extra': {}}}]"
    ]
