"""The process group for sequence parallelism, from the environment torchrun sets."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class SPGroup:
    """What the sequence-parallel ops need: the group, this process's place in it, its device."""
    group: dist.ProcessGroup
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str


def _env_int(name):
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an int, got {value!r}") from None


def init_from_env(backend=None, timeout=None):
    """Join the process group described by RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT (run under `torchrun --nproc-per-node N ...`). backend: None picks nccl when CUDA
    is available, else gloo. timeout: a datetime.timedelta for collectives, so that ranks that
    disagree fail instead of waiting forever. Reuses the default group if one is initialized."""
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f"init_from_env: environment variables {', '.join(missing)} are not set; "
                           f"start the program with `torchrun --nproc-per-node N script.py`")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK: expected 0 <= RANK < WORLD_SIZE={world}, got {rank}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"init_from_env: LOCAL_RANK={local_rank} but only "
                               f"{torch.cuda.device_count()} CUDA devices are visible")
        # Before the group exists, so NCCL's communicator binds to this process's own GPU.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"init_from_env: a process group is already initialized as rank "
                           f"{dist.get_rank()} of {dist.get_world_size()}, but the environment says "
                           f"RANK={rank}, WORLD_SIZE={world}")
    group = dist.group.WORLD
    return SPGroup(group, rank, world, local_rank, device, dist.get_backend(group))
