"""Local features (keypoints + descriptors) as an embedding kind: ``ganprint embed --backbone sift``.

A global embedding is one vector per image; a local-features artifact holds, per image, up to
``max_keypoints`` keypoints with their descriptors, so that :mod:`ganprint.verify` can match two
images and fit the geometric transform between them (copy detection under rotation / shift).

Kinds (registry :data:`LOCAL_KINDS`, :func:`register_local_kind`):

- ``sift``  OpenCV SIFT, 128-d descriptors.  OpenCV rounds SIFT descriptors to integers in
            0..255, so they are stored as uint8 without loss; matched with the L2 norm.
- ``orb``   OpenCV ORB, 256-bit binary descriptors (uint8 [32]); matched with the Hamming norm.

Every image is decoded once (:func:`ganprint.data.decode_image`), converted to grayscale and
resized to ``size`` x ``size`` (default 256; ``None`` keeps the native size); keypoint
coordinates are in that frame.  Keypoints are sorted by detector response (strongest first,
ties by position) and cut at ``max_keypoints``, so the result is deterministic.

Artifact (kind ``local_features``, stage ``embed``; row i <-> manifest row i, manifest as for
embeddings):

- ``keypoints``   float32 [N, cap, 4]: x, y (pixels of the resized image), size, angle (degrees);
- ``descriptors`` uint8   [N, cap, D]: D = 128 (sift) or 32 bytes (orb);
- ``counts``      int64   [N]: valid keypoints per image (rows beyond are zero padding).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ganprint.errors import BadImageError, GanprintError

LOCAL_FORMAT = 1  # bump when extraction changes, to invalidate cached artifacts
DEFAULT_MAX_KEYPOINTS = 400
DEFAULT_SIZE = 256
KIND = "local_features"


@dataclass(frozen=True)
class LocalKind:
    """A local-feature detector. ``create(max_keypoints)`` returns an OpenCV Feature2D;
    ``norm`` is ``l2`` or ``hamming``; ``dim`` the descriptor length in bytes."""

    name: str
    description: str
    create: Callable[[int], Any]
    norm: str
    dim: int


LOCAL_KINDS: dict[str, LocalKind] = {}


def register_local_kind(kind: LocalKind) -> LocalKind:
    if not kind.name.isidentifier() or kind.name.lower() != kind.name:
        raise ValueError(f"local feature name {kind.name!r} must be a lowercase identifier")
    if kind.name in LOCAL_KINDS:
        raise ValueError(f"local feature {kind.name!r} is already registered")
    if kind.norm not in ("l2", "hamming"):
        raise ValueError(f"local feature {kind.name!r}: norm must be l2 or hamming")
    LOCAL_KINDS[kind.name] = kind
    return kind


def is_local(name: str) -> bool:
    return name in LOCAL_KINDS


def get_local_kind(name: str) -> LocalKind:
    if name not in LOCAL_KINDS:
        raise GanprintError(f"unknown local feature '{name}'; choose one of {', '.join(LOCAL_KINDS)}")
    return LOCAL_KINDS[name]


def _sift(n: int):
    import cv2

    return cv2.SIFT_create(nfeatures=n)


def _orb(n: int):
    import cv2

    # a smaller border than the default 31 px: CT content reaches the image edges
    return cv2.ORB_create(nfeatures=n, edgeThreshold=15, patchSize=15)


register_local_kind(LocalKind("sift", "OpenCV SIFT keypoints, 128-d descriptors (L2); for `simmatrix --verify`",
                              _sift, "l2", 128))
register_local_kind(LocalKind("orb", "OpenCV ORB keypoints, 256-bit binary descriptors (Hamming); for "
                              "`simmatrix --verify`", _orb, "hamming", 32))


# ---------------------------------------------------------------------------------------------
# extraction


def prepare_gray(arr: np.ndarray, size: int | None = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> uint8 gray [size, size] (native size when ``size`` is None)."""
    import cv2

    from ganprint.data import to_gray

    g = np.ascontiguousarray(to_gray(arr))
    if size is not None and g.shape != (size, size):
        shrink = size < min(g.shape)
        g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return g


def extract(arr: np.ndarray, kind: str | LocalKind = "sift", max_keypoints: int = DEFAULT_MAX_KEYPOINTS,
            size: int | None = DEFAULT_SIZE, detector=None) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints float32 [n, 4] (x, y, size, angle) and descriptors uint8 [n, D] of one image,
    n <= ``max_keypoints``, strongest first.  ``detector``: a reusable OpenCV object of ``kind``."""
    spec = kind if isinstance(kind, LocalKind) else get_local_kind(kind)
    if max_keypoints < 1:
        raise GanprintError(f"--max-keypoints {max_keypoints}: must be at least 1")
    g = prepare_gray(arr, size)
    det = detector if detector is not None else spec.create(max_keypoints)
    kps, desc = det.detectAndCompute(g, None)
    if not kps or desc is None:
        return np.zeros((0, 4), np.float32), np.zeros((0, spec.dim), np.uint8)
    kp = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in kps], dtype=np.float32)
    resp = np.array([k.response for k in kps], dtype=np.float64)
    order = np.lexsort((kp[:, 0], kp[:, 1], -resp))[:max_keypoints]
    # SIFT descriptors are integer-valued floats in 0..255 (OpenCV saturate_casts them): lossless
    d = np.clip(np.rint(desc), 0, 255).astype(np.uint8) if desc.dtype != np.uint8 else desc
    return np.ascontiguousarray(kp[order]), np.ascontiguousarray(d[order])


def pad(features: list[tuple[np.ndarray, np.ndarray]], cap: int, dim: int):
    """List of (kp [n, 4], desc [n, D]) -> (keypoints [N, cap, 4], descriptors [N, cap, D], counts [N])."""
    n = len(features)
    kp = np.zeros((n, cap, 4), np.float32)
    de = np.zeros((n, cap, dim), np.uint8)
    counts = np.zeros(n, np.int64)
    for i, (k, d) in enumerate(features):
        m = min(len(k), cap)
        kp[i, :m], de[i, :m], counts[i] = k[:m], d[:m], m
    return kp, de, counts


# ---------------------------------------------------------------------------------------------
# the embed stage for local kinds


def _extract_records(records, spec: LocalKind, max_keypoints: int, size: int | None, workers: int,
                     on_image: Callable[[], None] | None = None):
    """(features list aligned with records (None where decoding failed), sizes, bad {i: reason})."""
    import threading

    import cv2

    from ganprint.data import decode_image

    local = threading.local()

    def one(i: int):
        det = getattr(local, "det", None)
        if det is None:
            det = local.det = spec.create(max_keypoints)
        rec = records[i]
        try:
            with open(rec.path, "rb") as fh:
                arr = decode_image(fh.read(), rec.path)
        except BadImageError as exc:
            return i, None, (0, 0), exc.reason
        except OSError as exc:
            return i, None, (0, 0), f"cannot read file ({exc.strerror})"
        out = extract(arr, spec, max_keypoints, size, detector=det)
        if on_image is not None:
            on_image()
        return i, out, (int(arr.shape[1]), int(arr.shape[0])), None

    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallel over images instead (OpenCV releases the GIL)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(one, range(len(records))))
    finally:
        cv2.setNumThreads(prev)
    feats: list[Any] = [None] * len(records)
    sizes: dict[int, tuple[int, int]] = {}
    bad: dict[int, str] = {}
    for i, f, wh, err in results:
        if err is not None:
            bad[i] = err
        else:
            feats[i], sizes[i] = f, wh
    return feats, sizes, bad


def run_local_embed(
    inputs: list[str],
    out: str | os.PathLike,
    kind: str = "sift",
    max_keypoints: int = DEFAULT_MAX_KEYPOINTS,
    image_size: int | None = DEFAULT_SIZE,
    workers: int | None = None,
    skip_bad: bool = False,
    force: bool = False,
    stdin=None,
    progress: bool = True,
):
    """``embed --backbone sift|orb``: write a local-features artifact ``out``; returns an
    :class:`ganprint.embed.EmbedOutcome` (``dim`` = descriptor bytes).

    An image without any keypoint (blank, uniform) is an error naming the file; with
    ``skip_bad`` it is kept with 0 keypoints (and a warning), so rows still line up with the
    global embeddings of the same folders (it verifies against nothing: score 0)."""
    import pandas as pd
    import torch

    from ganprint.artifacts import (
        artifact_base,
        base_provenance,
        digest_json,
        ensure_writable,
        read_provenance,
        write_artifact,
    )
    from ganprint.data import discover
    from ganprint.embed_common import EmbedOutcome, collect_bad, hash_records, inputs_digest
    from ganprint.errors import ArtifactError

    t0 = time.perf_counter()
    spec = get_local_kind(kind)
    if max_keypoints < 1:
        raise GanprintError(f"--max-keypoints {max_keypoints}: must be at least 1")
    if image_size is not None and image_size < 16:
        raise GanprintError(f"--image-size {image_size}: too small for local features; use at least 16")
    ensure_writable(out)
    records, skipped = discover(list(inputs), stdin=stdin, skip_bad=skip_bad)
    hashes = hash_records(records)
    import cv2

    params = {"detector": spec.name, "opencv": cv2.__version__, "max_keypoints": int(max_keypoints),
              "size": image_size, "norm": spec.norm, "descriptor_bytes": spec.dim, "format": LOCAL_FORMAT}
    preprocess = {"size": image_size, "color": "gray", "interpolation": "area/cubic (cv2)", "mean": None, "std": None}
    key = digest_json({"inputs": inputs_digest(records, hashes), "local": params, "skip_bad": skip_bad})
    if not force:
        try:
            old = read_provenance(out)
        except ArtifactError:
            old = {}
        if old.get("cache_key") == key:
            return EmbedOutcome(artifact_base(out), True, int(old.get("rows", 0)), int(old.get("dim", 0)), [],
                                time.perf_counter() - t0, 0.0, old)
    nworkers = workers if workers is not None else min(4, os.cpu_count() or 1)
    t_run = time.perf_counter()
    if progress:
        from ganprint.progress import make_progress

        bar = make_progress(f"embed ({spec.name})")
        with bar:
            task = bar.add_task("embed", total=len(records))
            feats, sizes, bad = _extract_records(records, spec, max_keypoints, image_size, nworkers,
                                                 on_image=lambda: bar.advance(task, 1))
    else:
        feats, sizes, bad = _extract_records(records, spec, max_keypoints, image_size, nworkers)
    elapsed = time.perf_counter() - t_run
    collect_bad(records, bad, skip_bad, skipped)
    kept = [i for i in range(len(records)) if feats[i] is not None]
    if not kept:
        raise GanprintError("no image could be decoded; check the inputs")
    empty = [i for i in kept if len(feats[i][0]) == 0]
    if empty and not skip_bad:
        raise GanprintError(f"{records[empty[0]].path}: no {spec.name} keypoints found (blank or uniform image?); "
                            f"remove it, or pass --skip-bad to keep it with 0 keypoints ({len(empty)} such image(s))")
    warnings = [{"path": records[i].path, "reason": f"no {spec.name} keypoints (it verifies against nothing)",
                 "action": "kept with 0 keypoints"} for i in empty]
    kp, de, counts = pad([feats[i] for i in kept], max_keypoints, spec.dim)
    rows = []
    for row, i in enumerate(kept):
        r = records[i]
        w, h = sizes[i]
        rows.append({"row": row, "image_id": r.image_id, "path": r.path, "relpath": r.relpath, "subset": r.subset,
                     "split": r.split, "label": r.label, "sha256": hashes[i], "width": w, "height": h})
    table = pd.DataFrame(rows)
    table["label"] = table["label"].astype("Int8")
    kept_records = [records[i] for i in kept]
    prov = base_provenance(
        KIND, "embed",
        backbone=spec.name, timm_name=None, weights=None, weights_source="opencv",
        weights_digest=digest_json(params), preprocess=preprocess, dim=spec.dim, checkpoint=None,
        local=params, inputs_hash=inputs_digest(kept_records, [hashes[i] for i in kept]), rows=len(kept),
        seed=0, device="cpu", cache_key=key, skipped=len(skipped), empty=len(empty),
        subsets=sorted({str(r.subset) for r in kept_records}),
    )
    base = write_artifact(out, {"keypoints": torch.from_numpy(kp), "descriptors": torch.from_numpy(de),
                                "counts": torch.from_numpy(counts)}, table, prov,
                          table_meta={"skipped": skipped, "empty": warnings})
    return EmbedOutcome(base, False, len(kept), spec.dim, skipped + warnings, time.perf_counter() - t0,
                        len(records) / elapsed if elapsed > 0 else 0.0, prov)


@dataclass
class LocalSet:
    """Local features of N images, as numpy: keypoints float32 [N, cap, 4], descriptors uint8
    [N, cap, D], counts int64 [N]; ``norm`` l2 | hamming; ``table`` the manifest (or None)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    counts: np.ndarray
    norm: str
    table: Any = None
    provenance: dict | None = None
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def subset(self, rows) -> "LocalSet":
        rows = np.asarray(rows, dtype=np.int64)
        tab = None if self.table is None else self.table.iloc[rows].reset_index(drop=True)
        return LocalSet(self.keypoints[rows], self.descriptors[rows], self.counts[rows], self.norm, tab,
                        self.provenance, self.source)

    @classmethod
    def from_features(cls, features: list[tuple[np.ndarray, np.ndarray]], norm: str = "l2",
                      cap: int | None = None) -> "LocalSet":
        """From a list of :func:`extract` outputs."""
        dim = next((d.shape[1] for _, d in features if d.ndim == 2), 128 if norm == "l2" else 32)
        cap = cap or max([len(k) for k, _ in features] + [1])
        kp, de, counts = pad(features, cap, dim)
        return cls(kp, de, counts, norm)


def load_local(path: str | os.PathLike) -> LocalSet:
    """Read a local-features artifact (refused if it is another kind)."""
    from ganprint.artifacts import TENSOR_SUFFIX, read_artifact
    from ganprint.errors import ArtifactError

    art = read_artifact(path, kind=None)
    if art.provenance.get("kind") != KIND:
        raise ArtifactError(f"{art.base}{TENSOR_SUFFIX}: is a '{art.provenance.get('kind')}' artifact, expected "
                            f"'{KIND}'; embed the images with --backbone sift (or orb) for --verify")
    norm = (art.provenance.get("local") or {}).get("norm", "l2")
    return LocalSet(art.tensor("keypoints").numpy(), art.tensor("descriptors").numpy(),
                    art.tensor("counts").numpy().astype(np.int64), norm, art.table, art.provenance,
                    f"{Path(art.base)}{TENSOR_SUFFIX}")
