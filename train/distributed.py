"""Process-group setup (torchrun, Ray Train or a single process) and the collectives we use."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_tensor_autograd

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we created the process group (torchrun), so we tear it down
    local_world: int = 1  # training processes on this node (torchrun and Ray Train set LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Context:
    """Join the process group Ray Train made, or create one under torchrun, or run alone."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), device, owns, local_world)
    return Context(0, 1, device, False)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's rows."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    # Backward is a reduce-scatter (sum): each rank gets every rank's gradient for its own rows.
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, no gradient (counts, logged values)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def fit_with_ray(body: Callable[[dict], Any], config: dict, workers: int, out: str, name: str) -> None:
    """Run `body(config)` on `workers` Ray Train workers (a GPU each when the cluster has GPUs), with Ray's
    own files under OUT/ray/NAME; `body` joins the process group through `setup()`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if "RAY_ADDRESS" not in os.environ:  # a local instance: let its workers import this repository
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(body, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(storage_path=str(Path(out).resolve() / "ray"), name=name))
    trainer.fit()
