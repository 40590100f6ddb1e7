"""Small helpers around torch.distributed that also work without a process group.

Before ``init_process_group`` (or in a plain single-process run) ``rank()`` and ``world_size()``
report what the launcher put in the environment (``RANK``/``WORLD_SIZE``, default 0/1), and the
collective helpers act as the world-size-1 identity. Collective helpers must be called by every
rank of the group in the same order.
"""
from __future__ import annotations

import os
import socket
import zlib
from typing import Any

import torch
import torch.distributed as dist

_OPS = ("mean", "sum", "max", "min")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def rank() -> int:
    """Global rank; the launcher's ``RANK`` (default 0) before the process group exists."""
    return dist.get_rank() if is_initialized() else _env_int(("RANK",), 0)


def world_size() -> int:
    """Number of processes; the launcher's ``WORLD_SIZE`` (default 1) before the process group exists."""
    return dist.get_world_size() if is_initialized() else _env_int(("WORLD_SIZE",), 1)


def local_rank() -> int:
    """Rank within this node (``LOCAL_RANK`` from torchrun/deepspeed/Slurm wrappers, default 0)."""
    return _env_int(("LOCAL_RANK",), 0)


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects; use for small things only)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def hostnames() -> list[str]:
    """Host name of every rank, in rank order (collective)."""
    return all_gather_object(socket.gethostname())


def node_count() -> int:
    """Number of nodes in the job.

    From the launcher's environment when it says (``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` or
    ``LOCAL_SIZE``), otherwise by counting distinct host names (collective in that case; the
    environment is the same on all ranks, so all ranks take the same branch).
    """
    total = _env_int(("WORLD_SIZE",), 0)
    per_node = _env_int(("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), 0)
    if total > 0 and per_node > 0 and total % per_node == 0:
        return total // per_node
    return len(set(hostnames()))


def _reduce_device() -> torch.device:
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _key_hash(keys: list[str]) -> float:
    return float(zlib.crc32("\x00".join(keys).encode("utf-8")))


def reduce_scalars(values: dict[str, float], op: str = "mean", union_keys: bool = False) -> dict[str, float]:
    """Reduce a dict of scalars over all ranks with ONE all_reduce of a packed float64 tensor.

    ``op``: "mean" (losses, rates), "sum" (counts), "max", "min". Every rank must pass the same
    keys: a mismatch of the same length is detected (a key checksum travels in the tensor) and
    raises RuntimeError on all ranks; a different NUMBER of keys makes the collective fail or hang.
    For per-rank counters whose keys may differ (skipped samples by reason), pass
    ``union_keys=True``: one extra all_gather of the key names, missing keys count as 0.
    """
    if op not in _OPS:
        raise ValueError(f"reduce_scalars: op must be one of {_OPS}, got {op!r}")
    if union_keys and is_initialized():
        every = set().union(*all_gather_object(sorted(values)))
        values = {k: values.get(k, 0.0) for k in every}
    keys = sorted(values)
    if not is_initialized():
        return {k: float(values[k]) for k in keys}
    h = _key_hash(keys)
    packed = [float(values[k]) for k in keys] + [h, -h]
    tensor = torch.tensor(packed, dtype=torch.float64, device=_reduce_device())
    reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM,
                 "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op)
    result = tensor.cpu().tolist()
    n = dist.get_world_size()
    if op in ("mean", "sum"):
        same_keys = result[-2] == h * n and result[-1] == -h * n
    else:
        same_keys = result[-2] == h and result[-1] == -h
    if not same_keys:
        raise RuntimeError(f"reduce_scalars: ranks passed different keys (rank {dist.get_rank()} had {keys})")
    if op == "mean":
        return {k: v / n for k, v in zip(keys, result)}
    return dict(zip(keys, result))
