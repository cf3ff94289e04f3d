"""Multi-process training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc-per-node N -m ganprint train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT set; :func:`init_distributed` joins them (nccl on CUDA, gloo on CPU)
and picks each rank's device.  Without those variables everything here is a no-op, so the same
trainer runs single-process.

Consistency across ranks: parameters start identical (same seed; DDP also broadcasts rank 0's),
gradients are all-reduced, so the EMA of the momentum encoder is identical too; the queue is fed
with the all-gathered keys of every rank in rank order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ganprint.errors import GanprintError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device_spec: str = "auto") -> DistContext:
    """Join the torchrun process group when there is one; resolve this rank's device."""
    from ganprint.device import rank_device, resolve_device

    world = _env_world()
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=resolve_device(device_spec))
    if not dist.is_available():
        raise GanprintError("torch.distributed is not available in this torch build; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_spec, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except Exception as exc:  # bad MASTER_ADDR/PORT, missing env, ...
            raise GanprintError(f"cannot join the torchrun process group ({exc}); launch with "
                                "`torchrun --nproc-per-node N -m ganprint train ...`") from exc
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, True, owns)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_cat(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) from all ranks, in rank order, along dim 0."""
    if not ctx.enabled or ctx.world == 1:
        return t
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(out, t)
    return torch.cat(out, 0)


def broadcast_(ctx: DistContext, t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if ctx.enabled and ctx.world > 1:
        dist.broadcast(t, src)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.enabled and ctx.world > 1:
        dist.barrier()


def gather_digests(ctx: DistContext, hexdigest: str) -> list[str]:
    """The sha256 hex digest of every rank, in rank order (as uint8 tensors: no pickling)."""
    t = torch.tensor(list(bytes.fromhex(hexdigest)), dtype=torch.uint8, device=ctx.device)
    allt = all_gather_cat(ctx, t[None]).cpu()
    return [bytes(row.tolist()).hex() for row in allt]
