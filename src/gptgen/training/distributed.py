"""Process-group setup for `torchrun`: gloo on CPU, NCCL on CUDA; rank 0 writes files.

A run launched by torchrun (WORLD_SIZE > 1 in the environment) joins the process group here; the same
code run as one plain process gets a DistEnv of world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    owns_group: bool = False  # True when this module created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistEnv:
    """Join the torchrun process group (if launched so), or return a single-process DistEnv."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), dist.get_backend())
    if not launched_distributed():
        return DistEnv()
    if not dist.is_available():
        raise TrainingError("This PyTorch build has no torch.distributed; run training as a single process.")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank,
                   int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())), backend, owns_group=True)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64, so token counts stay exact)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """rank 0's obj on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
