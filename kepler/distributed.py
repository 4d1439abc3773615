"""``torch.distributed`` in one place: process-group setup from ``torchrun``'s environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), the collectives the quantizers, the trainer and evaluation
share, and what a failed collective says about the other ranks (:func:`lost_rank_reason`). Every
collective is a no-op in a single process (no process group, or a group of one)."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``cuda:<LOCAL_RANK>``) when CUDA is available, else the CPU.
    ValueError, one line, for a name that is no device (``cpu``, ``cuda``, ``cuda:<index>``) or one
    that is not here."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {requested!r} is not a device: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r}: kepler runs on cpu or cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return device


def available_memory(device: torch.device) -> int:
    """Bytes free to use on ``device``: the GPU's free memory, or the machine's available memory
    (Linux ``MemAvailable``; the physical memory elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def init_distributed(requested_device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group when launched by ``torchrun`` with WORLD_SIZE > 1 (NCCL on GPUs, gloo on
    CPUs); a plain single process otherwise. A collective that waits longer than ``timeout_minutes``
    for another rank fails (see :func:`lost_rank_reason`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


class RankLostError(RuntimeError):
    """A collective failed because another rank of the run is gone (killed, crashed) or did not
    answer within the process group's timeout."""


# gloo raises its transport failures as plain RuntimeErrors whose text starts with their place in
# gloo's sources, "[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer ...", "[...
# /gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 12000ms for recv operation to complete";
# NCCL and the rendezvous store raise torch.distributed.DistError.
_GLOO_TRANSPORT = "gloo/transport/"
_SOURCE_PLACE = re.compile(r"^\[[^\]]*\]\s*")


def lost_rank_reason(error: BaseException) -> str | None:
    """The backend's reason in one line when ``error`` is a collective failing because another rank
    is gone or silent past the timeout (``Connection closed by peer [127.0.0.1]:55964``), else None."""
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _GLOO_TRANSPORT in str(error))):
        return None
    text = _SOURCE_PLACE.sub("", str(error).strip())
    # The first sentence: gloo goes on with advice ("This is typically caused by ..."), NCCL with
    # versions and environment variables on further lines.
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Set by rank_local(): this process's collectives act on its own rank only.
_RANK_LOCAL = False


def is_distributed() -> bool:
    """True inside a process group of more than one rank (and not inside :func:`rank_local`)."""
    return not _RANK_LOCAL and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def rank_local():
    """Inside the block, :func:`all_reduce_sum`, :func:`broadcast_from_rank0` and the quantizers'
    statistics act on this rank alone: for work one rank does while the others wait (rank 0 encoding
    a prior's codes), where a collective would wait forever for ranks that never join it."""
    global _RANK_LOCAL
    previous, _RANK_LOCAL = _RANK_LOCAL, True
    try:
        yield
    finally:
        _RANK_LOCAL = previous


def world_size() -> int:
    """The number of ranks :func:`all_reduce_sum` sums over: 1 outside a process group (or inside
    :func:`rank_local`)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's; returns ``tensor``."""
    if is_distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if is_distributed():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    """Wait for every rank."""
    if is_distributed():
        dist.barrier()
