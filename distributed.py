"""torch.distributed plumbing for `torchrun --nproc_per_node N main.py ...`.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) everything here is a no-op and
the world is one process. Under torchrun: NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU;
rank 0 alone writes files and prints; evaluation gathers every rank's predictions and removes the padding
that the sampler adds, so each sample counts exactly once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA if available, else CPU; otherwise the named device (an error if it is CUDA and there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto.")
    return device


def init_distributed(device: torch.device) -> tuple[World, torch.device]:
    """Join the torchrun process group if there is one; returns the world and this process's device."""
    world = launch_world()
    if world.world_size <= 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, device


def launch_world() -> World:
    """This process's place among torchrun's processes (RANK, WORLD_SIZE, LOCAL_RANK), without joining a process
    group: for work split by rank that needs no communication (a single process is World())."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def current_world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return current_world().is_main


def say(message: str) -> None:
    """Print on rank 0 only (under torchrun every process runs the same code)."""
    if current_world().is_main:
        print(message, flush=True)


def broadcast_object(obj):
    """rank 0's `obj` on every rank (identity outside torchrun)."""
    if current_world().world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if current_world().world_size > 1:
        dist.barrier()


def sum_across_ranks(*values: float) -> list[float]:
    """Each value summed over all ranks (the values themselves outside torchrun)."""
    if current_world().world_size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    # gloo reduces CPU tensors; NCCL needs them on this process's GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = total.to(device)
    dist.all_reduce(total)
    return total.cpu().tolist()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_predictions(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every rank's predictions, keep one row per sample index, in index order.

    `outputs` holds CPU tensors with matching first dimensions and an 'indices' (N,) entry; 'bad' (indices of
    unreadable images) is merged the same way. The sampler pads the last shard with repeated indices, so rows
    are de-duplicated by index; outside torchrun the rows are only sorted by index.
    """
    world = current_world()
    gathered = [outputs]
    if world.world_size > 1:
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, outputs)
    rows = {k: torch.cat([g[k] for g in gathered]) for k in outputs if k != "bad"}
    indices = rows["indices"]  # (N_total,)
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]  # the first copy of each index
    keep = order[first]
    merged = {k: v[keep] for k, v in rows.items()}
    merged["bad"] = torch.unique(torch.cat([g["bad"] for g in gathered])) if "bad" in outputs else torch.empty(0)
    return merged
