"""Tile helpers shared by the exact searches (:mod:`ganprint.similarity`, :mod:`ganprint.prefilter`).

A bottom module: it imports no other ganprint module, so both searches can use it without
importing each other.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _one_thread(device):
    """Run the selection on one thread.  With two, each of its ~10 small ops ends in a barrier,
    and when other jobs share the cores a descheduled partner thread makes every barrier cost a
    time slice: on a loaded 2-core box the selection cost 1.48x the matmul with two threads,
    1.19x with one (the matmul keeps both)."""
    import torch

    if getattr(device, "type", device) != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _tiles(n: int, size: int):
    """(start, stop) of consecutive slices of ``range(n)``, ``size`` long (the last may be shorter)."""
    for s in range(0, n, size):
        yield s, min(n, s + size)
