"""Data-parallel ``embed`` and ``simmatrix`` under torchrun (torch.distributed: gloo on CPU, nccl on CUDA).

    torchrun --standalone --nproc-per-node N -m ganprint embed DATA -o OUT
    torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ganprint simmatrix DATASET -o OUT

:func:`join` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
joins the process group; without them it returns a one-process :class:`Group` whose helpers are
no-ops, so the stages run unchanged.  Each rank uses ``cuda:LOCAL_RANK`` where CUDA exists.

Failing cleanly: every step a rank may fail in alone runs through :meth:`Group.run`, which
catches the error and all-reduces a flag, so every rank learns that some rank failed at the same
collective instead of waiting for it; the lowest failing rank's one-line message is broadcast
and raised everywhere (:class:`RankFailed` on the others), rank 0 prints it, nothing is written.
A rank that dies outright is torchrun's to handle (it stops the others); a rank that hangs is
ended by the collectives' timeout (``GANPRINT_DIST_TIMEOUT`` seconds, default 1800).

Shards are contiguous: rank r holds items ``[r n / w, (r + 1) n / w)`` (:func:`shard_bounds`),
so concatenating the ranks' results in rank order gives the single-process order.  Tensors move
as padded tensors through gather / all_gather; strings as utf-8 bytes in uint8 tensors (no pickling).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from ganprint.errors import GanprintError

DEFAULT_TIMEOUT_S = 1800.0


class RankFailed(GanprintError):
    """Another rank failed; the message is that rank's own one-line error."""

    def __init__(self, rank: int, message: str, exit_code: int = 2) -> None:
        self.rank = rank
        self.exit_code = exit_code
        super().__init__(message)


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    return world > 1 or ("TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` items (sizes differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world


def batch_shard_bounds(n: int, batch: int, rank: int, world: int) -> tuple[int, int]:
    """Like :func:`shard_bounds` but in whole batches of ``batch`` items, so every rank forms the
    very batches one process would (a forward pass may round differently with another batch)."""
    nb = -(-n // batch)
    b0, b1 = shard_bounds(nb, rank, world)
    return min(n, b0 * batch), min(n, b1 * batch)


@dataclass
class Group:
    """This process' place in the run: ``rank`` of ``world``, its ``device``; ``enabled`` when
    a process group was joined (also for a world of one under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None
    enabled: bool = False
    owns: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm(self):
        """Device of the tensors handed to collectives (nccl: CUDA tensors only)."""
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    # --- failure agreement --------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on this rank, then agree with the others that every rank succeeded.

        A rank failing inside ``fn`` skips the rest of it and calls :meth:`check` with its error,
        which pairs with the other ranks' next :meth:`check` (theirs after their own ``fn``, or one
        inside it), so between two checks ranks must only run collectives that cannot fail.  Errors
        raised by a check are already agreed on and pass through.  Wrap a whole stage in it."""
        if not self.enabled:
            return fn(*args, **kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  every error must reach the flag, or the others wait
            if not getattr(exc, "_ganprint_agreed", False):
                self.check(exc)
            raise
        self.check(None)
        return out

    def check(self, err: BaseException | None) -> None:
        """All-reduce "did some rank fail?"; if so raise on every rank (the failing one re-raises its own)."""
        import torch
        import torch.distributed as dist

        flags = torch.zeros(self.world, dtype=torch.int64, device=self._comm)
        if err is not None:
            flags[self.rank] = 1
        dist.all_reduce(flags)
        failed = flags.cpu().nonzero().flatten().tolist()
        if not failed:
            return
        first = failed[0]
        if self.rank == first:
            text = str(err) if isinstance(err, GanprintError) else f"rank {first}: {type(err).__name__}: {err}"
            code = getattr(err, "exit_code", 1) if isinstance(err, GanprintError) else 1
        else:
            text, code = "", 0
        text = self.broadcast_text(text, first)
        code = self.broadcast_int(code, first)
        if err is not None and self.rank == first:
            err._ganprint_agreed = True  # type: ignore[union-attr]
            raise err
        exc = RankFailed(first, text, code)
        exc._ganprint_agreed = True  # type: ignore[attr-defined]
        raise exc

    # --- collectives ----------------------------------------------------------------------------

    def broadcast_int(self, value: int, src: int = 0) -> int:
        import torch
        import torch.distributed as dist

        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64, device=self._comm)
        dist.broadcast(t, src)
        return int(t.item())

    def broadcast_text(self, text: str, src: int = 0) -> str:
        import torch
        import torch.distributed as dist

        if not self.enabled:
            return text
        data = text.encode("utf-8")
        n = self.broadcast_int(len(data), src)
        buf = torch.zeros(max(n, 1), dtype=torch.uint8, device=self._comm)
        if self.rank == src and n:
            buf[:n] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._comm)
        dist.broadcast(buf, src)
        return bytes(buf[:n].cpu().tolist()).decode("utf-8")

    def max_int(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64, device=self._comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather_rows(self, t, dst: int | None = 0) -> list | None:
        """Every rank's ``t`` [n_r, ...] (the trailing shape and dtype equal on all ranks), in rank
        order, as CPU tensors: on ``dst`` only (``dst=None``: on every rank); elsewhere None."""
        import torch
        import torch.distributed as dist

        if not self.enabled:
            return [t.cpu()]
        t = t.to(self._comm).contiguous()
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=self._comm)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        counts = [int(s.item()) for s in sizes]
        pad = torch.zeros((max(max(counts), 1), *t.shape[1:]), dtype=t.dtype, device=self._comm)
        pad[: t.shape[0]] = t
        if dst is None:
            bufs = [torch.empty_like(pad) for _ in range(self.world)]
            dist.all_gather(bufs, pad)
        elif self.rank == dst:
            bufs = [torch.empty_like(pad) for _ in range(self.world)]
            dist.gather(pad, bufs, dst=dst)
        else:
            dist.gather(pad, None, dst=dst)
            return None
        return [b[:c].cpu() for b, c in zip(bufs, counts)]

    def gather_texts(self, texts: list[str], dst: int | None = 0) -> list[str] | None:
        """Concatenate every rank's list of one-line strings in rank order (on ``dst``; None: all)."""
        import torch

        data = "\n".join(texts).encode("utf-8") + (b"\n" if texts else b"")
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        parts = self.gather_rows(t, dst)
        if parts is None:
            return None
        out: list[str] = []
        for p in parts:
            out.extend(bytes(p.tolist()).decode("utf-8").splitlines())
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.enabled:
            dist.barrier()


def join(device_spec: str = "auto", timeout_s: float | None = None) -> Group:
    """This process' :class:`Group`: the torchrun process group when launched by torchrun
    (nccl when this rank's device is CUDA, else gloo), else a one-process group."""
    from ganprint.device import rank_device, resolve_device

    if not launched():
        return Group(device=resolve_device(device_spec))
    import datetime

    import torch.distributed as dist

    if not dist.is_available():
        raise GanprintError("torch.distributed is not available in this torch build; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_spec, local_rank)
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get("GANPRINT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        except ValueError:
            raise GanprintError("GANPRINT_DIST_TIMEOUT: not a number of seconds; unset it or give e.g. 600") from None
    owns = False
    if dist.is_initialized():
        backend = dist.get_backend()
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as exc:  # bad MASTER_ADDR/PORT, missing variables, a peer that never came
            raise GanprintError(f"cannot join the torchrun process group ({' '.join(str(exc).split())}); "
                                "launch with `torchrun --nproc-per-node N -m ganprint ...`") from None
        owns = True
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, device, True, owns, backend)


@contextlib.contextmanager
def quiet_rank(group: Group):
    """Leave the process group at the end; on ranks other than 0 turn an error into a bare exit
    status (rank 0 prints the one line, from the failing rank's own message)."""
    try:
        yield
    except GanprintError as exc:
        if group.enabled and not group.is_main:
            raise SystemExit(exc.exit_code) from None
        raise
    finally:
        leave(group)


def leave(group: Group | None) -> None:
    """Destroy the process group this module created (a no-op otherwise)."""
    if group is None or not (group.enabled and group.owns):
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# embed: a shard of the manifest per rank


def sharded_hashes(group: Group, records: list, hash_fn: Callable[[list], list[str]]) -> list[str]:
    """sha256 hex digests of ``records``: each rank hashes its shard, every rank gets them all."""
    import torch

    lo, hi = shard_bounds(len(records), group.rank, group.world)
    mine = group.run(hash_fn, records[lo:hi])
    t = torch.tensor([list(bytes.fromhex(h)) for h in mine], dtype=torch.uint8).reshape(-1, 32)
    parts = group.gather_rows(t, dst=None)
    return [bytes(row.tolist()).hex() for row in torch.cat(parts)]


def sharded_extract(group: Group, extract: Callable[[list], tuple], records: list, batch_size: int):
    """Run ``extract(shard)`` -> (features [m, D], kept, sizes {i: (w, h)}, bad {i: reason}) (indices
    into the shard, as ``embed.extract_features``) on this rank's batch-aligned shard; gather on
    rank 0.  Returns the same tuple over all ``records`` on rank 0, None on the others."""
    import torch

    lo, hi = batch_shard_bounds(len(records), batch_size, group.rank, group.world)
    feats, kept, sizes, bad = group.run(extract, records[lo:hi])
    dim = group.max_int(int(feats.shape[1]) if feats.shape[0] else 0)
    if feats.shape[0] == 0:
        feats = torch.zeros(0, dim)
    meta = torch.tensor([[lo + i, *sizes[i]] for i in kept], dtype=torch.int64).reshape(-1, 3)
    bad_idx = torch.tensor([lo + i for i in sorted(bad)], dtype=torch.int64)
    fparts = group.gather_rows(feats.float())
    mparts = group.gather_rows(meta)
    bparts = group.gather_rows(bad_idx)
    reasons = group.gather_texts([" ".join(bad[i].split()) for i in sorted(bad)])
    if fparts is None:
        return None
    meta_all = torch.cat(mparts)
    kept_all = meta_all[:, 0].tolist()
    sizes_all = {int(i): (int(w), int(h)) for i, w, h in meta_all.tolist()}
    bad_all = dict(zip(torch.cat(bparts).tolist(), reasons))
    return torch.cat(fparts), kept_all, sizes_all, bad_all


# ---------------------------------------------------------------------------------------------
# simmatrix: the generated set split across ranks


def merge_topk(values: list, indices: list, k: int):
    """Exact top-k of the union of per-rank top-k lists: values [R, k_r] (descending), indices
    [R, k_r] (-1: padding) -> (values [R, k], indices [R, k]); equal values: the lower index first."""
    import torch

    v = torch.cat(values, 1)
    i = torch.cat(indices, 1)
    v = torch.where(i < 0, torch.full_like(v, -float("inf")), v)
    big = torch.iinfo(torch.int64).max
    o = torch.argsort(torch.where(i < 0, torch.full_like(i, big), i), dim=1, stable=True)  # index order
    v, i = v.gather(1, o), i.gather(1, o)
    o = torch.argsort(v, dim=1, descending=True, stable=True)[:, :k]  # then by value, ties by index
    return v.gather(1, o).contiguous(), i.gather(1, o).contiguous()


def _pad_cols(t, k: int, fill):
    import torch

    if t.shape[1] >= k:
        return t
    return torch.cat([t, torch.full((t.shape[0], k - t.shape[1]), fill, dtype=t.dtype)], 1)


def sharded_similarity(group: Group, compute: Callable[..., dict], gen, real, *, k: int, full: bool,
                       realref: bool, **kwargs: Any) -> dict | None:
    """``compute(gen_shard, real, k=, full=, realref=, **kwargs)`` (``similarity.compute_similarity``)
    on this rank's contiguous shard of ``gen`` [G, D]; rank 0 merges: the per-rank real x gen top-k
    exactly (:func:`merge_topk`), the gen x real rows and matrix rows concatenated in rank order.
    The real x reference top-k does not involve G and is computed on rank 0 only.  Returns the
    tensors of one process' ``compute(gen, real, ...)`` on rank 0, None on the others."""
    import torch

    if len(gen) < group.world:
        raise GanprintError(f"{len(gen)} generated images for {group.world} ranks; run with at most "
                            f"{max(1, len(gen))} processes (--nproc-per-node)")
    lo, hi = shard_bounds(len(gen), group.rank, group.world)
    part = group.run(compute, gen[lo:hi], real, k=k, full=full, realref=realref and group.is_main, **kwargs)
    kk = min(k, len(gen))
    rv = _pad_cols(part["real_topk_values"], kk, -float("inf"))
    ri = _pad_cols(part["real_topk_indices"] + lo, kk, -1)
    got = {name: group.gather_rows(t) for name, t in (("rv", rv), ("ri", ri),
                                                      ("gv", part["gen_topk_values"]),
                                                      ("gi", part["gen_topk_indices"]))}
    mat = group.gather_rows(part["matrix"]) if full else None
    if not group.is_main:
        return None
    out = dict(part)
    out["real_topk_values"], out["real_topk_indices"] = merge_topk(got["rv"], got["ri"], kk)
    out["gen_topk_values"] = torch.cat(got["gv"])
    out["gen_topk_indices"] = torch.cat(got["gi"])
    if mat is not None:
        out["matrix"] = torch.cat(mat).contiguous()
    return out
