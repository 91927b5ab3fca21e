"""`solray reward-server NAME`: a reward as a Ray Serve deployment, behind the HTTP front of rewards.server.

Ray Serve runs the reward (`RewardDeployment`, application `reward-NAME`): `replicas` copies with the reward
class's resources (or `gpus` each), autoscaled up to `max_replicas` on load; each takes at most
`max_ongoing_requests` requests (more wait in the caller's handle queue: back-pressure). Batching is
`@serve.batch`: a request is cut into jobs of at most `max_batch` images, waiting jobs are gathered for up
to `batch_wait_s` into batches of at most `max_batch` images, and a batch is scored in one reward call
per image size. If a merged call fails, each of its jobs is scored alone, so one bad request fails only
itself. `max_batch` and `batch_wait_s` are the deployment's user_config: a redeploy changes them in place.

HTTP is rewards.server's uvicorn front in this process, not Serve's proxy. Ray 2.60's proxy starts uvicorn
with no header-read timeout and no connection limit, so half-sent requests hold its connections forever,
and its options are one set per cluster (the first `serve.start` wins), while each reward server needs its
own limits and token. The front calls the deployment by handle, as any process of the cluster may
(`serve.get_app_handle("reward-NAME")`), so one deployment serves several training runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from rewards import build_reward
from rewards.base import reward_factory
from rewards.server import HttpFront, RequestError, ScoreApp, ServerSettings

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    images: np.ndarray
    prompts: list[str]
    metadata: list[dict[str, Any]]


def _images_in(jobs: list[_Job]) -> int:
    return sum(len(job.images) for job in jobs)


class RewardScorer:
    """A reward with dynamic batching: the body of the Ray Serve deployment, and the in-process scorer."""

    def __init__(self, reward: str, reward_kwargs: dict[str, Any]) -> None:
        self.reward = build_reward(reward, **reward_kwargs)
        self.max_batch = 64
        self.queued = 0  # jobs waiting to be scored

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Ray Serve's user_config: {"max_batch": images per reward call, "batch_wait_s": seconds a batch waits for more}."""
        self.max_batch = config["max_batch"]
        self._score_jobs.set_max_batch_size(config["max_batch"])
        self._score_jobs.set_batch_wait_timeout_s(config["batch_wait_s"])

    async def describe(self) -> dict[str, Any]:
        return {"reward": self.reward.name, "queued": self.queued, "max_batch": self.max_batch}

    async def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray | str:
        """The scores, or the message of the reward's error (a string crosses Ray without a traceback)."""
        step = self.max_batch
        jobs = [_Job(images[i : i + step], prompts[i : i + step], metadata[i : i + step]) for i in range(0, len(images), step)]
        self.queued += len(jobs)
        results = await asyncio.gather(*(self._score_jobs(job) for job in jobs))
        errors = [result for result in results if isinstance(result, str)]
        return errors[0] if errors else np.concatenate(results)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)  # set by reconfigure
    async def _score_jobs(self, jobs: list[_Job]) -> list[np.ndarray | str]:
        self.queued -= len(jobs)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            by_size.setdefault(job.images.shape[1:], []).append(index)
        results: list[np.ndarray | str] = [""] * len(jobs)
        for indices in by_size.values():
            # On a thread: the event loop keeps taking requests into the next batch while this one scores.
            scored = await asyncio.to_thread(self._score_together, [jobs[i] for i in indices])
            for index, result in zip(indices, scored):
                results[index] = result
        return results

    def _score_together(self, jobs: list[_Job]) -> list[np.ndarray | str]:
        try:
            scores = self.reward.score(
                np.concatenate([job.images for job in jobs]),
                [p for job in jobs for p in job.prompts],
                [m for job in jobs for m in job.metadata],
            )
        except Exception as error:  # RewardError, or anything else: the replica must outlive every batch
            if len(jobs) > 1:
                return [result for job in jobs for result in self._score_together([job])]
            return [str(error)]
        bounds = np.cumsum([0] + [len(job.images) for job in jobs])
        return [scores[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


RewardDeployment = serve.deployment(RewardScorer, name="reward")


@dataclass(frozen=True)
class Replicas:
    """How Ray Serve runs the reward."""

    count: int = 1
    max_count: int | None = None  # autoscale between count and max_count replicas
    gpus: float | None = None  # per replica; None: the reward class's `resources`
    max_ongoing_requests: int | None = None  # per replica; None: max_batch

    def check(self) -> Replicas:
        if self.count < 1 or (self.max_count is not None and self.max_count < self.count):
            raise ValueError(f"replicas must be >= 1 and max_replicas >= replicas, got {self.count} and {self.max_count}")
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        return self


def check_reward(reward: str, reward_kwargs: dict[str, Any]) -> None:
    """ValueError unless `reward` resolves and its constructor takes `reward_kwargs` (it is built on the replicas)."""
    try:
        inspect.signature(reward_factory(reward)).bind(**reward_kwargs)
    except TypeError as error:
        raise ValueError(f"reward {reward!r} does not take {sorted(reward_kwargs)}: {error}") from None
    except ValueError as error:
        raise ValueError(f"reward {reward!r}: {error}") from None


@contextmanager
def reward_server(
    reward: str, reward_kwargs: dict[str, Any], settings: ServerSettings, replicas: Replicas = Replicas(), app_name: str | None = None
) -> Iterator[str]:
    """Deploy `reward` and serve it over HTTP while the block runs; yields the URL. ValueError: a setting or the
    reward is unusable; OSError: the address is. Joins the Ray of this process, or of RAY_ADDRESS, or starts one."""
    settings.check()
    with deploy_reward(reward, reward_kwargs, settings, replicas, app_name) as handle, serve_http(handle, settings) as url:
        yield url


@contextmanager
def serve_http(handle, settings: ServerSettings) -> Iterator[str]:
    """The HTTP front (rewards.server) for a deployed reward, on a background thread; yields its URL."""
    front = HttpFront(ScoreApp(settings, _by_handle(handle), lambda: handle.describe.remote()), settings)
    with front.running() as url:
        yield url


def _by_handle(handle):
    from ray.serve.exceptions import BackPressureError

    async def score(images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        try:
            result = await handle.score.remote(images, prompts, metadata)
        except BackPressureError as error:
            raise RequestError(503, f"the reward deployment is busy; retry later ({error})") from None
        except Exception as error:  # a replica lost, or Serve stopping: the client retries 5xx
            logger.warning("the reward deployment failed a request: %s: %s", type(error).__name__, str(error).splitlines()[0])
            raise RequestError(503, f"the reward deployment failed: {type(error).__name__}") from None
        if isinstance(result, str):
            raise RequestError(500, result)
        return result

    return score


@contextmanager
def deploy_reward(
    reward: str, reward_kwargs: dict[str, Any], settings: ServerSettings, replicas: Replicas = Replicas(), app_name: str | None = None
):
    """Run `reward` on Ray Serve (application `app_name`, default reward-NAME) while the block runs; yields its handle.
    Stops Serve and Ray on the way out only if it started them."""
    import ray

    replicas.check()
    check_reward(reward, reward_kwargs)
    app_name = app_name or f"reward-{reward}"

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")  # the HTTP front is ours (module docstring)
        if app_name in serve.status().applications:
            raise ValueError(f"Ray Serve already runs an application {app_name!r} in this cluster: call it by handle, or pick another name")
        resources = dict(getattr(reward_factory(reward), "resources", {}))
        actor_options = {"num_cpus": resources.get("num_cpus", 1.0), "num_gpus": resources.get("num_gpus", 0.0)}
        if replicas.gpus is not None:
            actor_options["num_gpus"] = replicas.gpus
        options: dict[str, Any] = {
            "ray_actor_options": actor_options,
            "max_ongoing_requests": replicas.max_ongoing_requests or settings.max_batch,
        }
        if replicas.max_count is not None and replicas.max_count > replicas.count:
            options["autoscaling_config"] = {
                "min_replicas": replicas.count,
                "max_replicas": replicas.max_count,
                "target_ongoing_requests": max(1, options["max_ongoing_requests"] // 2),
            }
        else:
            options["num_replicas"] = replicas.count
        options["user_config"] = {"max_batch": settings.max_batch, "batch_wait_s": settings.batch_wait_s}
        app = RewardDeployment.options(**options).bind(reward, reward_kwargs)
        try:
            handle = serve.run(app, name=app_name, route_prefix=None)
        except RuntimeError as error:  # the replicas failed to start: the reward's constructor raised
            serve.delete(app_name)
            raise ValueError(f"reward {reward!r} did not start on Ray Serve: {str(error).strip().splitlines()[-1]}") from error
        try:
            yield handle
        finally:
            serve.delete(app_name)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
