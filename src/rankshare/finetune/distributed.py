"""Training launched by ``torchrun`` or ``accelerate launch``: one process per device, each with a shard.

Every process builds the same adapter from the same seed; ``DistributedDataParallel`` averages the
gradients, so the global batch of each step is split over the processes, not repeated. Evaluation is
sharded too and the raw tallies are pooled before metrics are computed. Only the first process writes.
Without the launchers' environment (``WORLD_SIZE`` unset or 1) all of this is a no-op. ``pick_device`` is
the device a ``--device`` names, for each process its own GPU under a launcher.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import RankshareError


def pick_device(name: str) -> torch.device:
    """The device ``--device`` names (auto: a GPU when there is one); under a launcher, this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RankshareError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankshareError("--device cuda: no CUDA GPU is available here; use --device cpu.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # a launcher's process, one per GPU
    return device


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> None:
    """Join the process group the launcher describes (gloo on CPU, NCCL on GPUs)."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # collectives use the current device: one GPU per process
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This process's share: every size()-th item, starting at its rank."""
    return items[rank() :: size()]


def gather(value) -> list:
    """Every process's ``value`` (any picklable object), in rank order, on every process."""
    if size() == 1:
        return [value]
    values = [None] * size()
    dist.all_gather_object(values, value)
    return values


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model to call in training: wrapped in DistributedDataParallel when launched."""
    if size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if size() > 1:
        dist.barrier()
