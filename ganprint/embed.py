"""``embed`` stage: images -> feature vectors [N, D] + manifest, as an embeddings artifact.

Decoding runs in DataLoader workers so it overlaps the model's forward pass; the model runs
under ``inference_mode``, CNNs in channels_last, AMP on CUDA.  The artifact's ``cache_key`` is a
digest of the inputs' content hashes, the backbone, its weights digest, the preprocessing and the
checkpoint, so re-running with identical inputs reuses the artifact instead of recomputing.

Manifest (parquet), row i <-> embeddings row i:
``row, image_id, path, relpath, subset, split, label, sha256, width, height``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from ganprint.artifacts import (
    artifact_base,
    artifact_paths,
    base_provenance,
    digest_json,
    ensure_writable,
    read_provenance,
    releases_output_claim,
    write_artifact,
)
from ganprint.data import ImageRecord, decode_image, discover
from ganprint.embed_common import EmbedOutcome, collect_bad, hash_records, inputs_digest  # noqa: F401  (re-exported)
from ganprint.errors import ArtifactError, BadImageError, GanprintError

EMBED_FORMAT = 1  # bump when the embedding computation changes, to invalidate cached artifacts


class _ImageDataset:
    """Item i -> (tensor [C, S, S] or None, i, width, height, error or None)."""

    def __init__(self, records: list[ImageRecord], preprocess) -> None:
        self.records = records
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            with open(rec.path, "rb") as fh:
                data = fh.read()
            arr = decode_image(data, rec.path)
            return self.preprocess(arr), i, int(arr.shape[1]), int(arr.shape[0]), None
        except BadImageError as exc:
            return None, i, 0, 0, exc.reason
        except OSError as exc:
            return None, i, 0, 0, f"cannot read file ({exc.strerror})"


def _collate(items):
    import torch

    good = [it for it in items if it[0] is not None]
    bad = [(it[1], it[4]) for it in items if it[0] is None]
    x = torch.stack([it[0] for it in good]) if good else None
    meta = [(it[1], it[2], it[3]) for it in good]
    return x, meta, bad


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(0, min(4, n - 1))


def extract_features(
    model,
    records: list[ImageRecord],
    preprocess,
    device,
    batch_size: int = 32,
    workers: int = 0,
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
):
    """Run ``model`` over ``records``. Returns (features float32 [M, D] on CPU, kept indices,
    sizes {i: (w, h)}, bad {i: reason}); M = images that decoded."""
    import torch
    from torch.utils.data import DataLoader

    from ganprint.device import autocast_context

    ds = _ImageDataset(records, preprocess)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    feats: list[Any] = []
    kept: list[int] = []
    sizes: dict[int, tuple[int, int]] = {}
    bad: dict[int, str] = {}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode(), autocast_context(device):
        for x, meta, errs in loader:
            for i, reason in errs:
                bad[i] = reason
            if x is not None:
                x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                f = model(x).float().cpu()
                feats.append(f)
                for i, w, h in meta:
                    kept.append(i)
                    sizes[i] = (w, h)
            if on_batch is not None:
                on_batch((0 if x is None else x.shape[0]) + len(errs))
    out = torch.cat(feats) if feats else torch.zeros(0, 0)
    return out, kept, sizes, bad


@releases_output_claim("out")
def run_embed(
    inputs: list[str],
    out: str | os.PathLike,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    image_size: int | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    skip_bad: bool = False,
    force: bool = False,
    stdin=None,
    progress: bool = True,
    max_keypoints: int | None = None,
    group=None,
) -> EmbedOutcome | None:
    """Embed ``inputs`` (folders / files / ``-``) and write the artifact ``out``.

    ``backbone`` sift / orb writes a local-features artifact instead (ganprint.local_features;
    ``max_keypoints`` per image, ``image_size`` the square size features are extracted at).

    ``group``: a :class:`ganprint.distributed.Group` under torchrun (call as ``group.run(run_embed,
    ..., group=group)``): each rank hashes and embeds a shard of the manifest, rank 0 gathers and
    writes the one artifact (the same as one process') and returns the outcome; the others None."""
    from ganprint.local_features import is_local, run_local_embed

    if is_local(backbone):
        if weights is not None or checkpoint is not None:
            raise GanprintError(f"--backbone {backbone}: local features take no --weights or --checkpoint")
        if group is not None and group.enabled and group.world > 1:
            raise GanprintError(f"--backbone {backbone}: local features run in one process; start it without torchrun")
        return run_local_embed(inputs, out, backbone, max_keypoints=max_keypoints or 400, image_size=image_size or 256,
                               workers=workers, skip_bad=skip_bad, force=force, stdin=stdin, progress=progress)
    import torch

    from ganprint.backbones import get_backbone, load_backbone
    from ganprint.device import resolve_device

    t0 = time.perf_counter()
    g = group if group is not None and group.enabled else None
    main = g is None or g.is_main
    if batch_size < 1:
        raise GanprintError(f"--batch-size {batch_size}: must be at least 1")
    if g is not None and "-" in inputs:
        raise GanprintError("reading paths from stdin (-) does not work under torchrun; pass folders or files")
    get_backbone(backbone)  # an unknown name fails before any file is read
    tpath, _ = artifact_paths(out)
    if main:  # under torchrun only rank 0 writes (OUT need not exist on other nodes)
        ensure_writable(out)
    records, skipped = discover(list(inputs), stdin=stdin, skip_bad=skip_bad)
    dev = resolve_device(device) if g is None else g.device
    if g is None:
        hashes = hash_records(records)
    else:
        from ganprint.distributed import sharded_hashes

        hashes = sharded_hashes(g, records, hash_records)
    if checkpoint is not None:  # its weights replace the backbone's: fetch none, use its image size
        from ganprint.checkpoint import checkpoint_load_args

        weights, image_size = checkpoint_load_args(checkpoint, backbone, weights, image_size)
    loaded = load_backbone(backbone, weights, image_size)
    model = loaded.model
    ckpt_prov: dict[str, Any] | None = None
    if checkpoint is not None:
        from ganprint.contrastive.restore import apply_checkpoint

        model, ckpt_prov = apply_checkpoint(loaded, checkpoint)
    bprov = loaded.provenance()
    if ckpt_prov is not None:
        bprov["dim"] = ckpt_prov.get("dim", bprov["dim"])
    key = digest_json({
        "format": EMBED_FORMAT,
        "inputs": inputs_digest(records, hashes),
        "backbone": bprov,
        "checkpoint": ckpt_prov,
        "skip_bad": skip_bad,
    })
    old = {}
    if main and not force and tpath.exists():
        try:
            old = read_provenance(out)
        except ArtifactError:
            old = {}
    reuse = old.get("cache_key") == key
    if g is not None:  # loading may fail on one rank: agree first, then take rank 0's answer
        g.check(None)
        reuse = bool(g.broadcast_int(int(reuse)))
    if reuse:
        return EmbedOutcome(artifact_base(out), True, int(old.get("rows", 0)),
                            int(old.get("dim", 0)), [], time.perf_counter() - t0, 0.0, old) if main else None

    if workers is None and g is not None:  # the ranks of one node share its cores
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        nworkers = max(0, min(4, (os.cpu_count() or 1) // local - 1))
    else:
        nworkers = default_workers() if workers is None else max(0, workers)
    model = model.to(dev)
    channels_last = loaded.spec.channels_last and dev.type != "mps"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    t_run = time.perf_counter()

    def extract(recs, on_batch=None):
        got = extract_features(model, recs, loaded.preprocess, dev, batch_size, nworkers, channels_last,
                               on_batch=on_batch)
        if g is not None and got[3] and not skip_bad:  # fail this rank now; the others learn it at once
            first = min(got[3])
            raise BadImageError(recs[first].path, got[3][first])
        return got

    def extract_all(recs, on_batch=None):
        if g is None:
            return extract(recs, on_batch)
        from ganprint.distributed import sharded_extract

        return sharded_extract(g, lambda shard: extract(shard, on_batch), recs, batch_size)

    if progress and main:
        from ganprint.progress import make_progress

        bar = make_progress(f"embed ({backbone})" + ("" if g is None else f", rank 0 of {g.world}"))
        with bar:
            if g is None:
                total = len(records)
            else:  # rank 0 sees its own shard's progress
                from ganprint.distributed import batch_shard_bounds

                total = batch_shard_bounds(len(records), batch_size, 0, g.world)[1]
            task = bar.add_task("embed", total=total)
            got = extract_all(records, on_batch=lambda n: bar.advance(task, n))
    else:
        got = extract_all(records)
    elapsed = time.perf_counter() - t_run
    if got is None:  # under torchrun, not rank 0: rank 0 writes
        return None
    feats, kept, sizes, bad = got
    collect_bad(records, bad, skip_bad, skipped)
    if not kept:
        raise GanprintError("no image could be decoded; check the inputs")

    import pandas as pd

    rows = []
    for row, i in enumerate(kept):
        r = records[i]
        w, h = sizes[i]
        rows.append({
            "row": row, "image_id": r.image_id, "path": r.path, "relpath": r.relpath,
            "subset": r.subset, "split": r.split, "label": r.label, "sha256": hashes[i],
            "width": w, "height": h,
        })
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype("Int8")
    kept_records = [records[i] for i in kept]
    prov = base_provenance(
        "embeddings", "embed",
        **bprov,
        checkpoint=ckpt_prov,
        inputs_hash=inputs_digest(kept_records, [hashes[i] for i in kept]),
        rows=len(kept),
        seed=0,
        device=dev.type,
        cache_key=key,
        skipped=len(skipped),
        subsets=sorted({str(r.subset) for r in kept_records}),
    )
    prov["dim"] = int(feats.shape[1])
    base = write_artifact(out, {"embeddings": feats.contiguous()}, table, prov, table_meta={"skipped": skipped})
    return EmbedOutcome(base, False, len(kept), int(feats.shape[1]), skipped, time.perf_counter() - t0,
                        len(records) / elapsed if elapsed > 0 else 0.0, prov, _embedding_warnings(feats, table))


def _embedding_warnings(feats, table) -> list[str]:
    """Rows a similarity cannot use well: all-zero vectors (cosine undefined) and tiny images."""
    out = []
    zero = (feats.abs().amax(dim=1) == 0).nonzero().flatten().tolist() if len(feats) else []
    if zero:
        eg = table.iloc[zero[0]]
        out.append(f"{len(zero)} image(s) embed to an all-zero vector (e.g. {eg['path']}, {eg['width']}x{eg['height']} px); "
                   "their similarities carry no information: check or drop them")
    tiny = table.index[(table["width"] < 8) | (table["height"] < 8)].tolist()
    if tiny:
        eg = table.iloc[tiny[0]]
        out.append(f"{len(tiny)} image(s) are smaller than 8 px on a side (e.g. {eg['path']}, "
                   f"{eg['width']}x{eg['height']} px) and were upsampled to the backbone's input size")
    return out
