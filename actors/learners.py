"""The learner world: n LearnerWorkers placed together form one torch.distributed / DeepSpeed world.

Every learner receives the whole batch description (prompts, seeds, advantages: small) and works on
its own rows, learner r on the r-th contiguous block as np.array_split cuts it. Gradients are summed
over the world before the optimizer step (rl/trainer.py), so the learners stay identical and
together take the step one learner would take on the whole batch.

DeepSpeed's part is the world (gloo on CPU, nccl with CUDA), the gradient sum and the optimizer
step: the engine wraps the Trainer's AdamW, sums the learners' local gradients, clips the norm and,
with ZeRO stage 1 or 2, partitions the optimizer state. Stage 3 is not offered (cluster.zero_stage):
it partitions the parameters themselves, which only exist inside the engine's forward, and the
learner computes its gradients outside it.

A group with one learner and `cluster.remote_learners: false` runs it in the caller's process with
the plain Trainer (no torch.distributed); its results are `ray.put`, so callers hold refs either way.
"""

from __future__ import annotations

import os
import socket

import deepspeed
import deepspeed.comm as dist
import ray
import torch

from rl.balance import RewardBalancer
from rl.config import EvalConfig, OptimConfig
from rl.trainer import Trainer
from rollout.policy import Policy


def learner_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Learner `rank`'s contiguous rows of a batch, as np.array_split cuts it into world_size blocks."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def free_address() -> tuple[str, int]:
    """This node's IP and a TCP port free on it: where rank 0 hosts the world's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return ray.util.get_node_ip_address(), probe.getsockname()[1]


def join_world(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the learners' process group through DeepSpeed: nccl where CUDA is, else gloo."""
    # Ray gives each learner its own devices, so its accelerator is device 0 (DeepSpeed reads LOCAL_RANK).
    os.environ["LOCAL_RANK"] = "0"
    if not torch.cuda.is_available():
        # gloo does the all-reduce. Left alone, DeepSpeed JIT-compiles its shared-memory CPU op here:
        # it needs a C++ compiler and half a minute, and a run killed mid-compile leaves a lock file
        # on which every later run waits forever. DeepSpeed keeps this dict for such edits.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        auto_mpi_discovery=False,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        verbose=False,
    )


class DeepSpeedTrainer(Trainer):
    """A Trainer in the learner world: sums run over deepspeed.comm, and a DeepSpeed engine sums the gradient and steps."""

    def __init__(
        self,
        policy: Policy,
        *,
        optim: OptimConfig,
        evaluation: EvalConfig,
        balancer: RewardBalancer | None,
        seed: int,
        micro_batch: int,
        zero_stage: int,
    ) -> None:
        """Trainer's arguments, and the recipe's algorithm.micro_batch and cluster.zero_stage for the engine."""
        super().__init__(policy, optim=optim, evaluation=evaluation, balancer=balancer, seed=seed)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": optim.grad_clip,
            "gradient_allreduce_op": "sum",  # local gradients already weigh each sample by 1 / (whole-batch count)
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        }
        self.engine, *_ = deepspeed.initialize(
            model=policy.transformer, optimizer=self.optimizer, model_parameters=list(self.params.values()), config=config
        )

    def all_reduce(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Each tensor summed over the world (None stays None), on the learner's device for nccl."""
        summed = []
        for tensor in tensors:
            if tensor is not None:
                on_device = tensor.to(self.policy.device, copy=True)
                dist.all_reduce(on_device)
                tensor = on_device.to(tensor.device)
            summed.append(tensor)
        return summed

    def _apply_gradient(self, local_grad: torch.Tensor) -> dict[str, float]:
        """The engine's step along the sum over the learners of local_grad [D].

        The backward of <params, local_grad> hands local_grad to the engine as the parameters'
        gradient (ZeRO 1/2 take gradients only through engine.backward); the engine sums it over the
        world, clips the norm and steps.
        """
        params = list(self.params.values())
        parts = local_grad.split([p.numel() for p in params])
        self.engine.backward(sum((p * g.view_as(p).to(p.dtype)).sum() for p, g in zip(params, parts)))
        # ZeRO computes the norm over its partitions in step(); without ZeRO the engine keeps none,
        # so it is taken from the summed gradient, which sits in .grad until the step.
        norm_in_step = self.engine.zero_optimization_stage() > 0
        grad_norm = None if norm_in_step else torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params]))
        self.engine.step()
        return self._stepped(float(self.engine.get_global_grad_norm() if norm_in_step else grad_norm))

    def load_state_dict(self, state: dict) -> None:
        """Trainer.load_state_dict; under ZeRO 1/2 the engine's fp32 master copy is then re-read from the
        adapter weights, so load those first (LearnerWorker.restore_state does)."""
        super().load_state_dict(state)
        if self.engine.zero_optimization_stage() > 0:
            self.engine.optimizer.refresh_fp32_params()
