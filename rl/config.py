"""Recipes: typed, validated once, derived sizes computed once.

A recipe is a YAML file whose top-level sections are the fields of `Recipe`. Every key is
validated; an unknown key or a wrong type is an error naming the key and the file. Overrides on
the command line use dotted keys: `sol.pool_size=48`, `run.steps=3`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from rewards.base import check_reward_name
from rl.algorithms import ALGORITHMS
from rl.schema import Section
from rollout.loading import ModelConfig


def _reward_name(name: str) -> str:
    """A reward name that resolves (rewards.base.check_reward_name): a typo is refused with the recipe, not inside an actor."""
    return check_reward_name(name)


class RunConfig(Section):
    name: str = Field("run", description="run name; also the W&B run name")
    seed: int = Field(0, ge=0, description="run seed: prompts, seeds and LoRA init derive from it")
    steps: int = Field(10, ge=1, description="RL iterations")
    output_dir: str = Field("outputs/run", description="metrics, grids and checkpoints go here")
    prompts: str = Field("tiny:train", description='"tiny:train", "tiny:eval", "tiny:curriculum" or a text file with one prompt per line')
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest checkpoint in output_dir")


class AlgorithmSettings(Section):
    """algorithm's settings every algorithm shares; AlgorithmConfig adds `name` and each registered algorithm's subsection."""

    prompts_per_step: int = Field(4, ge=1, description="P: prompts per iteration")
    group_size: int = Field(8, ge=2, description="K: training samples per prompt (the contrastive subset in Sol-RL)")
    lora_rank: int = Field(32, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    train_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the learners' base weights, which rollout workers also merge into: auto = bf16 when learners have GPUs, else fp32; LoRA weights stay fp32",
    )
    gradient_checkpointing: bool = Field(False, description="recompute the transformer's activations in backward (large models)")
    global_std: bool = Field(True, description="advantage std over the whole batch (else per prompt group)")
    drop_zero_variance: bool = Field(False, description="drop groups whose rewards are all equal (Flow-GRPO)")
    micro_batch: int = Field(8, ge=1, description="samples per forward/backward pass on a learner")
    pipeline_depth: Literal[0, 1] = Field(
        0,
        description="Sol-RL only. 1: the rollout workers explore step t+1's pool with the weights of step t while the learners "
        "regenerate and train step t (the selection is one weight version stale, explore/staleness); 0: one phase after another",
    )


# The recipe's `algorithm` section: the shared settings, `name` (one of rl.algorithms.ALGORITHMS) and one subsection per
# registered algorithm (algorithm.nft, algorithm.grpo), declared with the algorithm (its config_class): a new
# algorithm brings its settings in its own file.
AlgorithmConfig = create_model(
    "AlgorithmConfig",
    __base__=AlgorithmSettings,
    name=(Literal[tuple(ALGORITHMS)], Field("nft", description=f"the RL algorithm: {', '.join(ALGORITHMS)} (rl.algorithms)")),
    **{
        name: (algorithm.config_class, Field(default_factory=algorithm.config_class, description=f"settings of algorithm.name {name}"))
        for name, algorithm in ALGORITHMS.items()
    },
)


class SolConfig(Section):
    enabled: bool = Field(True, description="two-stage explore/regenerate (Sol-RL); false = plain baseline")
    pool_size: int = Field(96, ge=2, description="N: candidate seeds explored per prompt")
    explore_precision: Literal["nvfp4", "fp8", "bf16", "fp32"] = Field(
        "nvfp4",
        description="precision of the rollout copies: nvfp4 = W4A4 (Sol-RL), fp8 = W8A8 E4M3 with per-tensor scales, on the same linears",
    )
    explore_steps: int = Field(6, ge=1, description="ODE steps of the exploration sampler")
    selection: Literal["best_worst", "random", "extremes_random", "mean_deviation"] = "best_worst"
    quant_backend: Literal["auto", "scaled_mm", "modelopt", "emulate"] = Field(
        "auto",
        description="how quantized linears run: scaled_mm = real NVFP4 (Blackwell) / FP8 (compute capability >= 8.9) GEMMs, modelopt = "
        "NVFP4 fake quant on CUDA, emulate = pure torch anywhere; auto = the fastest that runs, logged with its reason (quant.explore)",
    )
    allow_fp8: bool = Field(
        False,
        description="explore_precision nvfp4 with quant_backend auto: on a GPU with FP8 but no NVFP4 GEMMs (Hopper), explore in fp8 on "
        "real FP8 GEMMs instead of NVFP4 fake quant (faster, other numerics: its own ranking fidelity)",
    )
    skip_modules: list[str] | None = Field(
        None,
        description="Sol-RL's skip list: linears whose name matches one (regex search; plain names match as substrings) stay in high precision; None = the family's (quant.coverage)",
    )
    min_dim: int | None = Field(
        None, ge=0, description="Sol-RL's min_dim: linears with max(in, out) <= min_dim stay in high precision; None = the family's"
    )
    keep_high_precision: list[str] = Field(
        default_factory=list,
        description="regexes of linears that stay in high precision besides skip_modules "
        r"(e.g. '^transformer_blocks\.2\.'): less NVFP4, more faithful ranking",
    )
    activation_scaling: Literal["static", "delayed"] = Field(
        "static",
        description="per-tensor activation amax: static = max calibration once per sync (a seed's image is the same alone or "
        "in any batch); delayed = Transformer Engine's DelayedScaling as Sol-RL runs it (running amax history; images depend on earlier calls)",
    )
    amax_history_len: int = Field(16, ge=1, description="delayed scaling: amax values kept per quantized input")
    amax_compute_algo: Literal["max", "most_recent"] = Field(
        "max", description="delayed scaling: amax from the history's max or its newest entry"
    )

    @model_validator(mode="after")
    def _backend_fits_the_precision(self) -> SolConfig:
        if self.quant_backend == "modelopt" and self.explore_precision != "nvfp4":
            raise ValueError(
                f"sol.quant_backend 'modelopt' quantizes to nvfp4 only, not explore_precision {self.explore_precision!r}: use scaled_mm, emulate or auto"
            )
        if self.allow_fp8 and (self.explore_precision != "nvfp4" or self.quant_backend != "auto"):
            raise ValueError(
                f"sol.allow_fp8 lets quant_backend 'auto' trade nvfp4 for fp8; it does nothing with explore_precision "
                f"{self.explore_precision!r} and quant_backend {self.quant_backend!r}: drop it, or set nvfp4 and auto"
            )
        return self

    @field_validator("keep_high_precision", "skip_modules")
    @classmethod
    def _patterns_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a regular expression: {error}") from None
        return patterns


class SamplerConfig(Section):
    solver: Literal["euler", "dpm2"] = Field("dpm2", description="deterministic solver of regeneration / NFT rollouts")
    steps: int = Field(10, ge=1, description="steps of the training-label sampler (regeneration)")
    shift: float | None = Field(None, gt=0, description="None: the model family's shift")


class RewardSpec(Section):
    name: str = Field(description="registry name, dotted path 'pkg.module:Class' or entry point")
    weight: float = Field(
        1.0, ge=0, description="weight in the weighted-sum baseline (sum_k w_k R_k) and the proxy that selects explored seeds"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")

    _name_resolves = field_validator("name")(_reward_name)


class RewardsConfig(Section):
    models: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="tiny_verifier")], min_length=1)
    on_reward_error: Literal["fail", "skip"] = Field("fail", description="skip: drop the affected groups and count them")
    retries: int = Field(1, ge=0, description="retries of a failed reward call before on_reward_error applies")


class BalanceConfig(Section):
    mode: Literal["weighted_sum", "qp"] = Field(
        "weighted_sum",
        description="multi-reward combination: weighted_sum = the group advantage of sum_k w_k R_k (DiffusionNFT); qp = MARBLE",
    )
    solve_every: int = Field(10, ge=1, description="full K-backward QP solve every n steps; amortised in between")
    amortized: Literal["marble", "normalized"] = Field(
        "marble",
        description="amortised steps: marble = MARBLE's sum_k a_k A_k (the largest gradient dominates); normalized = weights "
        "rescaled by the last full step's gradient norms, which reproduces the full step's direction",
    )
    ema: float = Field(0.7, ge=0, lt=1, description="EMA on the QP weights")
    floor: float = Field(0.0, ge=0, description="minimum weight per reward")


class Resources(Section):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads of this role's actors; None = cluster.torch_threads")


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; None starts a local Ray when none is running")
    rollout_workers: int = Field(2, ge=0, description="0 = run rollouts in the driver process")
    reward_workers: int = Field(1, ge=0)
    learners: int = Field(1, ge=1)
    remote_learners: bool = Field(True, description="false = the single learner runs in the driver process")
    rollout_resources: Resources = Resources(num_cpus=0.5)
    reward_resources: Resources = Resources(num_cpus=0.5)
    learner_resources: Resources = Resources(num_cpus=1.0)
    explore_shards_per_worker: int = Field(
        4,
        ge=1,
        description="explore calls per rollout worker per step: the step's candidates split into rollout_workers x this many "
        "shards, each scored as it lands; more overlap scoring with exploring (the last shard's scoring is the tail) and "
        "balance uneven workers better, but cost the driver two Ray calls each",
    )
    zero_stage: Literal[0, 1, 2] = Field(
        0,
        description="DeepSpeed ZeRO stage of the learner group; not 3: it partitions the parameters, which then exist only "
        "inside the engine's forward, and the learners compute their gradients outside it and hand them to the engine",
    )
    placement: Literal["split", "colocated"] = Field(
        "split",
        description="split: rollout workers and learners on their own devices; colocated (Sol-RL's layout): rollout worker r and "
        "learner r share one placement-group bundle (one GPU), so every GPU explores, then every GPU regenerates and trains",
    )
    max_restarts: int = Field(3, ge=0, description="restarts of a failed rollout / reward actor")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per actor, unless its role's resources set their own")

    def threads(self, resources: Resources) -> int:
        """The torch threads of an actor with `resources`."""
        return resources.torch_threads or self.torch_threads


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW (beta1, beta2)"
    )
    nonfinite: Literal["stop", "skip_step"] = Field(
        "stop",
        description="an inf / NaN gradient: stop the run (the adapter and the last checkpoint stay finite) or skip the step (train/skipped_nonfinite counts them)",
    )


class LoggingConfig(Section):
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "solray"
    grid_every: int = Field(5, ge=0, description="log an image grid every n steps (0 = never)")
    progress: bool = Field(True, description="progress bar with step, reward and ETA")


class CheckpointConfig(Section):
    every: int = Field(5, ge=0, description="checkpoint every n steps (0 = only at the end)")
    keep: int = Field(2, ge=1, description="checkpoints kept on disk")


class EvalConfig(Section):
    enabled: bool = Field(True, description="evaluate before training, every n steps and after the last step")
    every: int = Field(0, ge=0, description="evaluate every n steps (0 = only before and after training)")
    prompts: str = Field("tiny:eval", description="eval prompt source (held out from training)")
    seeds_per_prompt: int = Field(8, ge=1)
    train_prompts: str | None = Field(
        None, description="a second probe on prompts the run trains on (metrics eval_train/), e.g. tiny:curriculum"
    )
    train_seeds_per_prompt: int = Field(16, ge=1, description="probe seeds per train prompt: eval seeds, which training never draws")
    rewards: list[str] = Field(
        default_factory=list,
        description="rewards scored only at evaluation, besides the training ones (tiny_verifier: strict accuracy); a training reward named here is scored once",
    )
    steps: int = Field(10, ge=1)
    solver: Literal["euler", "dpm2"] = "euler"
    adapter: Literal["ema", "current"] = Field(
        "ema", description="evaluate the EMA of the trained LoRA (as the references do) or the LoRA itself"
    )
    ema_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay cap; the decay warms up as min((1 + s) / (10 + s), cap)")
    ema_every: int = Field(1, ge=1, description="EMA update every n optimizer steps (Flow-GRPO: 8)")

    @field_validator("rewards")
    @classmethod
    def _reward_names_resolve(cls, names: list[str]) -> list[str]:
        return [_reward_name(name) for name in names]


class Recipe(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    sol: SolConfig = SolConfig()
    sampler: SamplerConfig = SamplerConfig()
    rewards: RewardsConfig = RewardsConfig()
    balance: BalanceConfig = BalanceConfig()
    cluster: ClusterConfig = ClusterConfig()
    optim: OptimConfig = OptimConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()

    def public_dump(self) -> dict[str, Any]:
        """The recipe as JSON values with every secret-named value (redact_secrets) replaced: what checkpoints and W&B keep."""
        return redact_secrets(self.model_dump(mode="json"))

    @property
    def eval_only_rewards(self) -> list[str]:
        """eval.rewards less the training rewards (evaluation scores those anyway): each reward is scored once."""
        trained = {spec.name for spec in self.rewards.models}
        return [name for name in dict.fromkeys(self.eval.rewards) if name not in trained]

    @model_validator(mode="after")
    def _check_sizes(self) -> Recipe:
        if self.sol.enabled and self.algorithm.group_size > self.sol.pool_size:
            raise ValueError(f"algorithm.group_size ({self.algorithm.group_size}) must be <= sol.pool_size ({self.sol.pool_size})")
        if self.balance.mode == "qp" and len(self.rewards.models) < 2:
            raise ValueError("balance.mode 'qp' needs at least 2 entries in rewards.models")
        if not any(spec.weight > 0 for spec in self.rewards.models):
            raise ValueError("rewards.models: at least one reward needs a positive weight")
        if self.balance.mode != "qp" and self.balance.amortized != "marble":
            raise ValueError(f"balance.amortized '{self.balance.amortized}' applies to balance.mode 'qp' only")
        for algorithm in ALGORITHMS.values():
            algorithm.check_recipe(self)
        if self.algorithm.pipeline_depth and not self.sol.enabled:
            raise ValueError("algorithm.pipeline_depth 1 overlaps exploration with training: it needs sol.enabled true")
        cluster = self.cluster
        if cluster.placement == "colocated" and not (
            self.sol.enabled and cluster.remote_learners and cluster.rollout_workers == cluster.learners
        ):
            raise ValueError(
                "cluster.placement colocated pairs one rollout worker with each learner: it needs sol.enabled true, "
                f"cluster.remote_learners true and cluster.rollout_workers == cluster.learners (got {cluster.rollout_workers} and "
                f"{cluster.learners})"
            )
        if self.cluster.learners > 1 and not self.cluster.remote_learners:
            raise ValueError(
                f"cluster.learners = {self.cluster.learners} needs cluster.remote_learners: true (a process holds one learner)"
            )
        return self

    # Derived sizes, computed once from the validated fields.
    @property
    def samples_per_step(self) -> int:
        """Training samples per iteration, P * K."""
        return self.algorithm.prompts_per_step * self.algorithm.group_size

    @property
    def explored_per_step(self) -> int:
        """Explore-precision images per iteration, P * N (0 without Sol-RL)."""
        return self.algorithm.prompts_per_step * self.sol.pool_size if self.sol.enabled else 0

    @property
    def base_precision(self) -> str:
        """Precision of the learners' (and the rollout workers' copy of the) base weights: train_precision, auto resolved."""
        return resolve_train_precision(self.algorithm.train_precision, self.cluster.learner_resources.num_gpus)


def resolve_train_precision(train_precision: str, learner_gpus: float) -> str:
    """algorithm.train_precision with "auto" resolved: bf16 when the learners have GPUs, else fp32."""
    if train_precision != "auto":
        return train_precision
    return "bf16" if learner_gpus > 0 else "fp32"


# Names of keys that hold credentials: api_key, apikey, hf_token, access_token, password, client_secret,
# secret_key, credentials; not max_tokens or tokenizer. Matched anywhere in a recipe (reward kwargs above all).
SECRET_KEY = re.compile(r"(?:^|_)(?:api_?key|secret_?key|private_?key|token|password|passwd|secret|credentials?)$", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_secrets(tree: Any, drop: bool = False) -> Any:
    """A JSON tree with the value of every key named like a secret (SECRET_KEY) replaced by REDACTED (None stays
    None: nothing was given), or with drop, without those keys."""
    if isinstance(tree, list):
        return [redact_secrets(item, drop) for item in tree]
    if not isinstance(tree, dict):
        return tree
    return {
        key: (None if value is None else REDACTED) if SECRET_KEY.search(str(key)) else redact_secrets(value, drop)
        for key, value in tree.items()
        if not (drop and SECRET_KEY.search(str(key)))
    }


# Sections and keys a resumed run may change: they do not alter what the run computes (cluster
# sizes are checked separately, since learner state is sharded per rank).
RESUMABLE_CHANGES = ("run.name", "run.steps", "run.output_dir", "run.resume", "cluster.", "logging.", "checkpoint.", "eval.")


def recipe_changes(saved: dict[str, Any], recipe: Recipe) -> list[str]:
    """Dotted keys whose value in `recipe` differs from the saved recipe dump, except RESUMABLE_CHANGES and secrets.

    A key the saved dump lacks (added to the schema since) counts as its default. train_precision is
    compared resolved: cluster.* may change, but not into learners that train in another precision.
    Secret-named keys (redact_secrets) are left out on both sides: checkpoints hold them redacted, and a
    credential, given or moved into the environment, does not change what the run computes.
    """
    current = redact_secrets(recipe.model_dump(mode="json"), drop=True)

    def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}

    old, new = leaves(Recipe().model_dump(mode="json")) | leaves(redact_secrets(saved, drop=True)), leaves(current)
    precision = "algorithm.train_precision"
    keys = sorted((set(old) | set(new)) - {precision})
    changes = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in keys
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    resolved = [resolve_train_precision(tree[precision], tree["cluster.learner_resources.num_gpus"]) for tree in (old, new)]
    if resolved[0] != resolved[1]:
        shown = [f"{tree[precision]!r}" + (f" ({value})" if tree[precision] == "auto" else "") for tree, value in zip((old, new), resolved)]
        changes.append(f"{precision}: {shown[0]} -> {shown[1]}")
    return sorted(changes)


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and every bad key."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


# A recipe is a few hundred values; YAML aliases can make a small file expand to billions ("billion laughs").
MAX_RECIPE_VALUES = 100_000


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {lines[key] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark
                )
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        tree = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise RecipeError(f"{where}: not valid YAML{at}: {problem}") from None
    if _expanded_size(tree, {}) > MAX_RECIPE_VALUES:
        raise RecipeError(f"{where}: expands to more than {MAX_RECIPE_VALUES} values (YAML aliases?); a recipe holds a few hundred")
    return tree


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """Values in `node` with every alias expanded; shared sub-trees are counted once per use but sized once."""
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) not in sizes:
        sizes[id(node)] = MAX_RECIPE_VALUES + 1  # a node that contains itself (`&a [*a]`) expands forever
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        sizes[id(node)] = min(1 + sum(_expanded_size(child, sizes) for child in children), MAX_RECIPE_VALUES + 1)
    return sizes[id(node)]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate a recipe YAML; overrides are "dotted.key=value" with YAML-typed values."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save the recipe as UTF-8") from None
    tree = _parse_yaml(text, str(path)) or {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {override!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), _parse_yaml(raw, f"override {override!r}"))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(recipe)'}: {e['msg']}" for e in error.errors())
        raise RecipeError(f"{path}: {problems}") from None
