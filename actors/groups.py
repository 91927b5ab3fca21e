"""Actor groups: one per role, n Ray actors of its worker class, or the worker in-process when n == 0.

Every group method hands back ObjectRefs, so the driver runs the same code either way: in-process
results are `ray.put` into the object store. Only these classes name worker methods; the driver calls
typed methods (`RolloutGroup.explore`, `RewardGroup.score`, `LearnerGroup.train`, ...).

Remote rollout and reward actors restart on failure (`cluster.max_restarts`) and Ray re-issues their
in-flight calls with the same arguments (`max_task_retries`): the same seeds, so a re-issued shard
returns exactly what the lost one would have. Learners form one DeepSpeed world (actors.learners)
and are not restarted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learners import learner_rows
from actors.workers import ExploreRequest, LearnerWorker, RewardWorker, RolloutWorker
from rl.config import Recipe, Resources

PLACEMENT_TIMEOUT_S = 600  # how long the learners' bundles may wait for free resources


@dataclass(frozen=True)
class WorkerClasses:
    """The worker class each group runs: the real ones, or (bench/scale_sim.py) ones whose compute is a calibrated wait."""

    rollout: type = RolloutWorker
    reward: type = RewardWorker
    learner: type = LearnerWorker


REAL_WORKERS = WorkerClasses()


class ActorGroup:
    """n actors of `worker_class` (keyword-only constructor), or one in-process when n == 0; local and remote behind one interface."""

    def __init__(
        self,
        *,
        worker_class: type,
        num_workers: int,
        resources: Resources,
        max_restarts: int = 0,
        placement: PlacementGroup | None = None,
        in_order: bool = True,
        **worker_kwargs: Any,
    ) -> None:
        """With `placement`, worker r runs in its bundle r. in_order False lets an actor run a call whose arguments
        exist before an earlier one still waiting for its own (Ray's allow_out_of_order_execution): for stateless workers."""
        self.local = worker_class(**worker_kwargs) if num_workers == 0 else None
        self.local_lock = threading.Lock()  # an in-process worker serves one call at a time, as an actor does
        remote_class = ray.remote(worker_class)
        self.actors = [
            remote_class.options(
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
                max_restarts=max_restarts,
                max_task_retries=max_restarts,
                allow_out_of_order_execution=not in_order,
                **({} if placement is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement, rank)}),
            ).remote(**worker_kwargs)
            for rank in range(num_workers)
        ]

    def __len__(self) -> int:
        return max(len(self.actors), 1)

    def _call(self, index: int, method: str, *args: Any) -> ray.ObjectRef:
        """`method` on worker index % n (in-process: with ref arguments fetched as Ray would); the ref of its result."""
        if self.local is not None:
            resolved = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
            with self.local_lock:
                return ray.put(getattr(self.local, method)(*resolved))
        return getattr(self.actors[index % len(self.actors)], method).remote(*args)

    def _call_all(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        return [self._call(i, method, *args) for i in range(len(self))]

    def shutdown(self) -> None:
        """End the actors (a process may start new groups after)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RolloutGroup(ActorGroup):
    """Explore-precision copies of the policy (Sol-RL's rollout workers); with cluster.placement colocated, worker r
    shares learner r's bundle (LearnerGroup.placement)."""

    def __init__(self, recipe: Recipe, worker_class: type = RolloutWorker, placement: PlacementGroup | None = None) -> None:
        cluster = recipe.cluster
        super().__init__(
            worker_class=worker_class,
            num_workers=cluster.rollout_workers,
            resources=cluster.rollout_resources,
            max_restarts=cluster.max_restarts,
            placement=placement,
            recipe=recipe,
        )

    def explore(self, index: int, request: ExploreRequest) -> ray.ObjectRef:
        """Worker index % n samples the request's candidates: the ref of uint8 images [B, H, W, 3]."""
        return self._call(index, "explore", request)

    def set_weights(self, weights: ray.ObjectRef, version: int) -> list[ray.ObjectRef]:
        """Every worker merges the LoRA factors of `version` and re-quantizes; refs of their seconds."""
        return self._call_all("set_weights", weights, version)


class RewardGroup(ActorGroup):
    """Hosts of the recipe's reward models."""

    def __init__(self, recipe: Recipe, worker_class: type = RewardWorker) -> None:
        cluster = recipe.cluster
        super().__init__(
            worker_class=worker_class,
            num_workers=cluster.reward_workers,
            resources=cluster.reward_resources,
            max_restarts=cluster.max_restarts,
            # Scoring is stateless: a shard whose images exist (or a rescore) need not wait behind one still exploring,
            # as a pipelined step's rescore otherwise waits behind the next pool's scoring.
            in_order=False,
            recipe=recipe,
        )

    def score(self, index: int, images: ray.ObjectRef, prompts: list[str], evaluation: bool = False) -> ray.ObjectRef:
        """Worker index % n scores the images: the ref of float64 [B, R] (with evaluation, then the eval-only rewards)."""
        return self._call(index, "score", images, prompts, evaluation)

    def eval_metrics(self, scores: np.ndarray, prompts: list[str]) -> ray.ObjectRef:
        """The rewards' extra evaluation metrics (Reward.eval_metrics) from an evaluation's scores [B, R]."""
        return self._call(0, "eval_metrics", scores, prompts)


class LearnerGroup(ActorGroup):
    """cluster.learners learner actors in one placement group forming one DeepSpeed world, or with
    cluster.remote_learners false one learner in the driver's process (the recipe allows no more).

    With cluster.placement colocated, each bundle also holds a rollout worker's resources (RolloutGroup takes it)."""

    def __init__(self, recipe: Recipe, worker_class: type = LearnerWorker) -> None:
        cluster = recipe.cluster
        self.num_learners = cluster.learners
        colocated = [cluster.rollout_resources] if cluster.placement == "colocated" else []
        self.placement = self._place(cluster.learners, [cluster.learner_resources, *colocated]) if cluster.remote_learners else None
        super().__init__(
            worker_class=worker_class,
            num_workers=cluster.learners if cluster.remote_learners else 0,
            resources=cluster.learner_resources,
            placement=self.placement,
            recipe=recipe,
        )
        if self.actors:
            master_addr, master_port = ray.get(self.actors[0].rendezvous_address.remote())
            ray.get(
                [actor.init_distributed.remote(rank, len(self.actors), master_addr, master_port) for rank, actor in enumerate(self.actors)]
            )

    @staticmethod
    def _place(num_learners: int, resources: list[Resources]) -> PlacementGroup:
        """One bundle per learner holding the sum of `resources` (the learner's, and a colocated rollout worker's),
        packed onto as few nodes as fit them."""
        totals = {"CPU": sum(r.num_cpus for r in resources), "GPU": sum(r.num_gpus for r in resources)}
        bundle = {name: amount for name, amount in totals.items() if amount > 0}
        placement = placement_group([bundle] * num_learners, strategy="PACK")
        if not placement.wait(PLACEMENT_TIMEOUT_S):
            remove_placement_group(placement)
            raise TimeoutError(
                f"{num_learners} learner bundles {bundle} found no room in {PLACEMENT_TIMEOUT_S} s; "
                f"cluster resources: {ray.cluster_resources()} (cluster.learners, cluster.learner_resources)"
            )
        return placement

    def __len__(self) -> int:
        return self.num_learners

    def split(self, items: list) -> list[list]:
        """The items of each learner's rows, by rank (e.g. the prompts of each regenerated image shard)."""
        return [items[learner_rows(len(items), rank, self.num_learners)] for rank in range(self.num_learners)]

    def base_fingerprint(self) -> ray.ObjectRef:
        """Rank 0's rl.checkpoint.weights_fingerprint of the base transformer (every rank loads the same)."""
        return self._call(0, "base_fingerprint")

    def regenerate(self, prompts: list[str], seeds: list[int], step: int) -> list[ray.ObjectRef]:
        """Each learner samples its rows of iteration `step`'s batch; refs of the image shards [B_r, H, W, 3], by rank."""
        if len(prompts) < self.num_learners:
            raise ValueError(f"a batch of {len(prompts)} samples cannot give each of {self.num_learners} learners a row")
        return self._call_all("regenerate", prompts, seeds, step)

    def train(self, advantages: np.ndarray) -> list[ray.ObjectRef]:
        """One optimizer step on the regenerated batch, given its advantages [B] or [B, R]; every learner's metrics (equal)."""
        return self._call_all("train", advantages)

    def explore_weights(self) -> ray.ObjectRef:
        """Rank 0 publishes the sampling adapter's LoRA factors (every rank holds the same)."""
        return self._call(0, "explore_weights")

    def sample_images(self, prompts: list[str], seeds: list[int], steps: int | None = None, solver: str | None = None) -> ray.ObjectRef:
        """Rank 0 samples with eval.adapter (LearnerWorker.sample_images): the ref of uint8 images."""
        return self._call(0, "sample_images", prompts, seeds, steps, solver)

    def checkpoint_states(self) -> list[ray.ObjectRef]:
        """Every learner's checkpoint_state (ZeRO shards differ by rank)."""
        return self._call_all("checkpoint_state")

    def restore(self, states: list[dict[str, Any]]) -> list[ray.ObjectRef]:
        """Learner r loads states[r] (one per rank, as checkpoint_states wrote them)."""
        return [self._call(rank, "restore_state", state) for rank, state in enumerate(states)]

    def shutdown(self) -> None:
        """End the learner actors and free their placement group."""
        super().shutdown()
        if self.placement is not None:
            remove_placement_group(self.placement)
        self.placement = None
