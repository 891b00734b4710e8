"""Data-parallel training with PyTorch's own engine: `torchrun` + DistributedDataParallel.

    torchrun --nproc-per-node 8 -m skdcgn distill --preset imagenet-256 ...

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR / MASTER_PORT); without them
(WORLD_SIZE unset or 1) everything runs single-process, exactly as before. The process group
uses nccl on CUDA and gloo on the CPU (the tests run 2 gloo processes).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SkdcgnError


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun launch.

    Fields:
        rank: global rank, in [0, world_size).
        local_rank: rank on this machine (picks the CUDA device).
        world_size: number of processes, >= 1; 1 means single-process (no process group).
    """
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when running with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes files and logs)."""
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world_size): which share of the work this process takes."""
        return self.rank, self.world_size


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise SkdcgnError(f"{name}: expected an integer, got {value!r}") from None


def dist_env() -> DistEnv:
    """RANK / LOCAL_RANK / WORLD_SIZE from the environment (torchrun's variables)."""
    env = DistEnv(_env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise SkdcgnError(f"RANK={env.rank}, WORLD_SIZE={env.world_size}: not a valid process layout")
    return env


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group when launched by torchrun; return the layout and this rank's device."""
    env = dist_env()
    if not env.enabled:
        return env, device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise SkdcgnError("the process group disagrees with RANK / WORLD_SIZE")
    return env, device


def barrier(env: DistEnv) -> None:
    """Wait until every rank reaches this point; a no-op when single-process."""
    if env.enabled:
        dist.barrier()


@torch.no_grad()
def broadcast_state(module: nn.Module, env: DistEnv) -> None:
    """Make every rank's parameters and buffers those of rank 0 (e.g. batch-norm statistics)."""
    if env.enabled:
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def wrap(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` (gradients averaged across ranks in backward);
    `module` itself when the process runs alone (`env` not enabled)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not env.enabled:
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
