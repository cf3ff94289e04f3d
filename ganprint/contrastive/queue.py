"""FIFO queue of momentum keys with the dataset id of each key.

``keys`` [K, D] float32 and ``ids`` [K] int64 (-1 = empty slot).  The ids let the loss drop a
queued key of the anchor itself (a stale copy of its own positive); empty slots never count as
negatives, so a queue that starts empty is harmless.  Under DDP every rank enqueues the keys of
all ranks (all-gathered, in rank order), so the queues stay identical.
"""

from __future__ import annotations

import torch


class KeyQueue:
    def __init__(self, size: int, dim: int, device="cpu") -> None:
        self.size = int(size)
        self.keys = torch.zeros(self.size, dim, device=device)
        self.ids = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``keys`` [n, D] with ``ids`` [n] at the pointer, wrapping around; when n > K only
        the last K are kept."""
        if self.size == 0:
            return
        keys = keys.detach().to(self.keys.dtype)
        ids = ids.to(torch.long)
        if keys.shape[0] > self.size:
            keys, ids = keys[-self.size:], ids[-self.size:]
        n = keys.shape[0]
        pos = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[pos] = keys.to(self.keys.device)
        self.ids[pos] = ids.to(self.ids.device)
        self.ptr = int((self.ptr + n) % self.size)

    def negative_mask(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """[B, K] bool: filled slots that do not hold a key of the anchor itself."""
        return (self.ids >= 0)[None, :] & (self.ids[None, :] != anchor_ids.to(self.ids.device)[:, None])

    def filled(self) -> int:
        return int((self.ids >= 0).sum())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"queue.keys": self.keys.cpu(), "queue.ids": self.ids.cpu(),
                "queue.ptr": torch.tensor(self.ptr, dtype=torch.long)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        keys, ids = tensors["queue.keys"], tensors["queue.ids"]
        if tuple(keys.shape) != tuple(self.keys.shape):
            raise ValueError(f"queue shape {tuple(keys.shape)} differs from {tuple(self.keys.shape)}")
        self.keys.copy_(keys)
        self.ids.copy_(ids)
        self.ptr = int(tensors["queue.ptr"])
