"""Worker groups: n Ray actors of one worker class, or the worker in-process when n == 0.

Both modes hand back ObjectRefs, so the driver runs the same code either way: in-process results
are `ray.put` into the object store. Remote actors restart on failure (`max_restarts`) and Ray
re-issues their in-flight calls with the same arguments (`max_task_retries`): the same seeds, so
a re-issued shard returns exactly what the lost one would have.
"""

from __future__ import annotations

from typing import Any

import ray

from rl.config import Resources


class WorkerGroup:
    def __init__(self, worker_class: type, num_workers: int, resources: Resources, max_restarts: int, *args: Any, **kwargs: Any) -> None:
        self.worker_class = worker_class
        self.local = worker_class(*args, **kwargs) if num_workers == 0 else None
        remote_class = ray.remote(worker_class).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=max_restarts, max_task_retries=max_restarts
        )
        self.actors = [remote_class.remote(*args, **kwargs) for _ in range(num_workers)]

    def __len__(self) -> int:
        return max(len(self.actors), 1)

    def call(self, index: int, method: str, *args: Any) -> ray.ObjectRef:
        """Run `method` on worker index % n; returns the ref of its result."""
        if self.local is not None:
            return call_in_process(self.local, method, args)
        return getattr(self.actors[index % len(self.actors)], method).remote(*args)

    def call_all(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        return [self.call(i, method, *args) for i in range(len(self))]


def call_in_process(worker: Any, method: str, args: tuple) -> ray.ObjectRef:
    """worker.method(*args) here, with ref arguments fetched as a Ray actor would; the ref of the `ray.put` result."""
    resolved = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
    return ray.put(getattr(worker, method)(*resolved))
