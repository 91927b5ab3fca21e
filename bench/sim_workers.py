"""Simulated workers for bench/scale_sim.py: the real workers' methods, with compute replaced by calibrated waits.

The driver and its groups (actors.groups) run unchanged and call these by the same method names with
the same arguments; each method sleeps for its work's cost divided by the simulation's time
compression and returns a payload of the real kind (uint8 images, float64 score tables, LoRA
factor dicts), so the object store carries real traffic.

GPU sharing: Ray hands each actor its (fake) GPU ids; a worker holds an fcntl lock on its GPU's
lock file while it "computes", so two actors on one simulated GPU (a rollout worker and a reward
worker on a split GPU, or every role on a colocated one) take turns, as kernels on one device do.

This module imports only numpy and ray (no torch): an actor process that unpickles these classes
stays small. The recipe and the explore requests reach the actors through Ray serializers that
bench/scale_sim.py registers (a `SimRecipe`; an explore request as a plain dict of its fields, whose
deserializer is a builtin: one defined here would travel by value with every call), so an actor never
imports rl.config or actors.workers (which import torch).
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray

ROLES = ("rollout", "reward", "learner")


@dataclass(frozen=True)
class Profile:
    """Per-unit costs of one model family on one GPU, uncompressed seconds (bench/scale_sim.py PROFILES)."""

    name: str
    explore_image_step: float  # one image, one NVFP4 sampler step
    regen_image_step: float  # one image, one BF16 sampler step
    reward_image: float  # one image through the reward model(s)
    train_sample: float  # one regenerated sample through the update (all its trained timesteps)
    sync: float  # one rollout worker merging the LoRA factors and re-quantizing
    resolution: int  # images are resolution x resolution x 3 uint8
    lora_linears: int  # LoRA-wrapped linears, each with factors A [r, in] and B [out, r] in fp32
    lora_in: int
    lora_out: int
    source: str = ""


@dataclass(frozen=True)
class SimRecipe:
    """What a simulated worker needs of the recipe, plus the simulation's settings (a Ray serializer sends this for a Recipe)."""

    profile: Profile
    compression: float  # simulated seconds = uncompressed seconds / compression
    lock_dir: str  # one lock file per simulated GPU
    image_side: int  # stand-in image side (resolution // image_divisor), bytes accounted at the real size
    lora_rank: int  # stand-in rank of the LoRA factors (bench/scale_sim.lora_rank_for)
    steps: int  # sampler.steps of regeneration
    gpus: int = 0  # simulated GPUs: a worker Ray gives no GPU takes one in turn (pin_gpu)
    # uncompressed seconds a worker holds its GPU at a time: actors sharing a GPU interleave at this grain, as two
    # processes' kernels on one GPU do (a fixed number of holds per call let a long explore shard lock out a rescore)
    slice_s: float = 0.25


def sim_recipe(fields: dict) -> SimRecipe:
    """Deserializer of a Recipe in the actors (the serializer lives in bench/scale_sim.py)."""
    return SimRecipe(profile=Profile(**fields.pop("profile")), **fields)


@dataclass
class Busy:
    """Seconds a worker held its GPU, and payload bytes it produced and received, since the last `stats(reset=True)`."""

    gpu_seconds: float = 0.0
    calls: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    waits: dict = field(default_factory=dict)


class SimWorker:
    """Shared by the three roles: the GPU lock and the busy accounting."""

    role = ""

    def __init__(self, *, recipe: SimRecipe) -> None:
        self.sim = recipe
        ids = ray.get_gpu_ids() if ray.is_initialized() else []
        self.gpu = str(ids[0]) if ids else self.pin_gpu()
        self.lock_path = os.path.join(recipe.lock_dir, f"gpu-{self.gpu}.lock")
        self.busy = Busy()

    def pin_gpu(self) -> str:
        """A worker Ray gave no GPU (the simulation's reward workers) takes simulated GPU k, k counted over such
        workers as they start (a counter file beside the locks); with no simulated GPUs it shares with nobody."""
        if not self.sim.gpus:
            return f"cpu-{os.getpid()}"
        with open(os.path.join(self.sim.lock_dir, "pinned"), "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            k = len(counter.read())
            counter.write("x")
        return str(k % self.sim.gpus)

    def wait(self, seconds: float) -> float:
        """Hold this worker's GPU for `seconds` uncompressed (in turns of at most slice_s); the simulated seconds it took, lock waits included."""
        start = time.perf_counter()
        turns = max(1, math.ceil(seconds / self.sim.slice_s))
        chunk = seconds / self.sim.compression / turns
        with open(self.lock_path, "a") as lock:
            for _ in range(turns):
                fcntl.flock(lock, fcntl.LOCK_EX)
                held = time.perf_counter()
                time.sleep(chunk)
                self.busy.gpu_seconds += time.perf_counter() - held
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.busy.calls += 1
        return time.perf_counter() - start

    def images(self, n: int) -> np.ndarray:
        """n stand-in uint8 images [n, side, side, 3]."""
        side = self.sim.image_side
        out = np.zeros((n, side, side, 3), dtype=np.uint8)
        self.busy.bytes_out += out.nbytes
        return out

    def stats(self, reset: bool = True) -> dict:
        """This worker's role, GPU and Busy counters (read by bench/scale_sim.py, not by the groups)."""
        out = {"role": self.role, "gpu": self.gpu, "pid": os.getpid()} | vars(self.busy)
        if reset:
            self.busy = Busy()
        return out

    def describe(self) -> dict:
        return {"pid": os.getpid(), "gpu": self.gpu}


class SimRolloutWorker(SimWorker):
    """actors.workers.RolloutWorker: explore and set_weights."""

    role = "rollout"

    def __init__(self, *, recipe: SimRecipe) -> None:
        super().__init__(recipe=recipe)
        self.version = 0

    def set_weights(self, update: dict, version: int) -> float:
        if version <= self.version:
            raise RuntimeError(f"refusing weights of version {version}: the rollout worker already holds version {self.version}")
        self.busy.bytes_in += sum(np.asarray(value).nbytes for value in update.values())
        self.version = version
        return self.wait(self.sim.profile.sync)

    def explore(self, request: dict) -> np.ndarray:
        """request: an ExploreRequest's fields (prompts, seeds, steps, version, weights)."""
        if request["weights"] is not None and request["version"] > self.version:
            self.set_weights(ray.get(request["weights"]), request["version"])
        if request["version"] != self.version:
            raise RuntimeError(f"rollout worker holds weights v{self.version}, asked to explore with v{request['version']}")
        self.wait(len(request["seeds"]) * request["steps"] * self.sim.profile.explore_image_step)
        return self.images(len(request["seeds"]))


class SimRewardWorker(SimWorker):
    """actors.workers.RewardWorker: score and eval_metrics (one reward column)."""

    role = "reward"

    def score(self, images: np.ndarray, prompts: list, evaluation: bool = False) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        self.busy.bytes_in += images.nbytes
        self.wait(len(images) * self.sim.profile.reward_image)
        # Distinct values, so best/worst selection and Spearman see rankings; never NaN.
        return np.random.default_rng(self.busy.calls).random((len(images), 1))

    def eval_metrics(self, scores: np.ndarray, prompts: list) -> dict:
        return {}


def learner_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Copied from actors.learners.learner_rows (which imports deepspeed): learner `rank`'s contiguous rows."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class SimLearnerWorker(SimWorker):
    """actors.workers.LearnerWorker: regenerate its rows, train on them, publish the LoRA factors."""

    role = "learner"

    def __init__(self, *, recipe: SimRecipe) -> None:
        super().__init__(recipe=recipe)
        self.rank, self.world_size = 0, 1
        self.rows: slice | None = None
        self.factors: dict | None = None  # rank 0's LoRA factors, built on the first explore_weights

    def base_fingerprint(self) -> str:
        return f"sim-{self.sim.profile.name}"

    def rendezvous_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def init_distributed(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        self.rank, self.world_size = rank, world_size

    def regenerate(self, prompts: list, seeds: list, step: int) -> np.ndarray:
        self.rows = learner_rows(len(prompts), self.rank, self.world_size)
        n = len(prompts[self.rows])
        self.wait(n * self.sim.steps * self.sim.profile.regen_image_step)
        return self.images(n)

    def train(self, advantages: np.ndarray) -> dict:
        if self.rows is None:
            raise RuntimeError("train() needs a regenerate() first")
        n = len(advantages[self.rows])
        self.rows = None
        self.wait(n * self.sim.profile.train_sample)
        return {"loss/sim": 0.0, "train/samples": float(n)}

    def explore_weights(self) -> dict:
        """The profile's LoRA factors in fp32 (lora_A [r, in], lora_B [out, r] per linear), as quant.lora_update ships them."""
        if self.factors is None:
            p, r = self.sim.profile, self.sim.lora_rank
            self.factors = {}
            for i in range(p.lora_linears):
                self.factors[f"linear{i}.weight.lora_A"] = np.zeros((r, p.lora_in), np.float32)
                self.factors[f"linear{i}.weight.lora_B"] = np.zeros((p.lora_out, r), np.float32)
        self.busy.bytes_out += sum(value.nbytes for value in self.factors.values())
        return self.factors

    def sample_images(self, prompts: list, seeds: list, steps: int | None = None, solver: str | None = None) -> np.ndarray:
        self.wait(len(prompts) * (steps or self.sim.steps) * self.sim.profile.regen_image_step)
        return self.images(len(prompts))

    def checkpoint_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass
