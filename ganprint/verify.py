"""Geometric verification of candidate pairs: descriptor matching + RANSAC similarity fit.

A global descriptor shortlists, for each real image, its K most similar generated images;
verification then *proves* a copy: local descriptors of the two images are matched (nearest
neighbour with Lowe's ratio test), and a 4-dof similarity transform (rotation, uniform scale,
shift: ``cv2.estimateAffinePartial2D`` with RANSAC) is fitted to the matched keypoint positions.
The score of a pair is the number of RANSAC inliers: how many matched keypoints agree with *one*
rigid placement of one image onto the other.  Unrelated CT-like slices share anatomy, so they get
tens of ratio-test matches, but those scatter and a consistent fit keeps few of them (5-12 on the
synthetic phantoms); a rotated, shifted, re-contrasted copy keeps more (15-60 there, hundreds for
sharp copies).  Matches are one-to-one (a candidate keypoint keeps its nearest query keypoint) and
fits that shrink or enlarge by more than 3x are rejected, so no degenerate fit counts many matches
onto one point as inliers.  The raw count is used, not a share of the keypoints: every image is cut
at the same ``max_keypoints``, so the count is already on one scale, and a share would reward images
with few keypoints (blank borders) with large scores from a handful of chance inliers.

Public API (library first; ``ganprint simmatrix --verify`` calls :func:`verify_for_similarity`):

- :class:`Match` one verified pair: ``inliers``, ``matches``, ``transform`` float64 [2, 3]
  (maps the *query* image's pixel coordinates to the *candidate*'s: ``c = A @ [x, y, 1]``), and
  ``angle`` (degrees, as ``cv2.getRotationMatrix2D``), ``scale``, ``shift`` (tx, ty) derived from it.
- :func:`verify_images` two decoded images (uint8 arrays) -> :class:`Match` (extracts features
  itself; for a report's evidence gallery).
- :func:`verify_pair` two images' features -> :class:`Match`.
- :func:`verify_candidates` queries x their candidate lists -> :class:`Verified` (values [Q, K]
  descending, indices [Q, K], matches [Q, K], transform [Q, 2, 3] of each query's best match).
- :func:`verify_for_similarity` the similarity-artifact tensors ``verify_*`` (docs/ARTIFACTS.md).
- :data:`VERIFY_METHODS` / :func:`register_verify_method`: how ``--verify`` artifacts are read and
  scored, resolved from their kind (:func:`method_for`): ``ransac`` (local features, this module) and
  ``register`` (raw-pixel grids: :mod:`ganprint.verify_register`).
- :func:`best_matches` a verified similarity artifact -> one row per real image: its best verified
  generated image (id, path), inliers, matches and the fitted rotation / scale / shift (for a
  report's evidence gallery).

Speed: for one query, its n descriptors are compared with all K candidates' descriptors in one
int8 matrix product [n, D] x [D, K * w] (``torch._int_mm``, int32 sums: SIFT values 0..255 shifted
by -128 and ORB bits as +-1 give exact distances, independent of the thread count); the two nearest
per (query keypoint, candidate) come from a max, a blank-out and a second max; only pairs with at
least ``MIN_MATCHES`` ratio-test matches reach RANSAC.  Queries run in parallel threads (torch and
OpenCV release the GIL).  bench/verify_throughput.py measures pairs/s against OpenCV's
``BFMatcher.knnMatch`` + the same RANSAC on the same pairs (identical inlier counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ganprint.errors import ArtifactError, GanprintError
from ganprint.local_features import DEFAULT_MAX_KEYPOINTS, DEFAULT_SIZE, LocalSet, extract, get_local_kind

DEFAULT_RATIO = 0.8  # Lowe's ratio test
DEFAULT_REPROJ = 4.0  # RANSAC inlier threshold, pixels of the (resized, 256 px) image
DEFAULT_K = 50
MIN_MATCHES = 3  # a similarity has 4 dof: 2 matches always fit exactly, so they prove nothing
MIN_SCALE = 1.0 / 3.0  # fits that shrink or enlarge by more than 3x are rejected as degenerate
RANSAC_ITERS = 2000
RANSAC_CONFIDENCE = 0.995


@dataclass
class Match:
    """One verified pair. ``transform`` float64 [2, 3] maps query pixels (x, y) to candidate pixels,
    or None when no fit was attempted (fewer than MIN_MATCHES matches)."""

    inliers: int
    matches: int
    transform: Any = None

    @property
    def angle(self) -> float:
        """Rotation in degrees, the convention of ``cv2.getRotationMatrix2D`` (positive =
        counter-clockwise as displayed, y pointing down); nan without a fit."""
        if self.transform is None:
            return math.nan
        return math.degrees(math.atan2(-self.transform[1, 0], self.transform[0, 0]))

    @property
    def scale(self) -> float:
        if self.transform is None:
            return math.nan
        return math.hypot(self.transform[0, 0], self.transform[1, 0])

    @property
    def shift(self) -> tuple[float, float]:
        if self.transform is None:
            return (math.nan, math.nan)
        return float(self.transform[0, 2]), float(self.transform[1, 2])


@dataclass
class Verified:
    """Verification of Q queries against K candidates each.

    values float32 [Q, K] inlier counts, descending; indices int64 [Q, K] the candidates (into the
    key set) in that order (-1: padding); matches int32 [Q, K] ratio-test matches of those pairs;
    transform float32 [Q, 2, 3] of each query's best pair (nan when its best has no fit)."""

    values: Any
    indices: Any
    matches: Any
    transform: Any


# ---------------------------------------------------------------------------------------------
# descriptor algebra


BIG = 1 << 30  # squared norm given to padding slots: never a nearest neighbour


def _as_int8(desc: np.ndarray, norm: str):
    """uint8 descriptors [..., D] -> int8 torch [..., D'] whose integer dot products give distances
    exactly: l2 -> x - 128 (a shift leaves |a - b| unchanged); hamming -> bits as +-1 (D' = 8 D)."""
    import torch

    if norm == "hamming":
        bits = np.unpackbits(desc, axis=-1).astype(np.int8)
        return torch.from_numpy(bits * 2 - 1)
    return torch.from_numpy((desc.astype(np.int16) - 128).astype(np.int8))


def _sqnorm(x) -> Any:
    """int32 [...] squared norms of int8 rows [..., D]."""
    import torch

    return (x.to(torch.int32) ** 2).sum(-1, dtype=torch.int32)


@dataclass
class _Keys:
    """Candidate-side descriptors, converted once: int8 [N, cap8, D'], minus the squared norms int32
    [N, cap8] (-BIG in padding slots), counts [N]; cap8 = cap rounded up to 8 (int matmul tiles)."""

    desc: Any
    nsqn: Any
    counts: np.ndarray
    dim: int


def _prepare_keys(ls: LocalSet) -> _Keys:
    import torch

    d = _as_int8(ls.descriptors, ls.norm)
    n, cap, dim = d.shape
    cap8 = max(8, -(-cap // 8) * 8)
    if cap8 != cap:
        d = torch.cat([d, torch.zeros(n, cap8 - cap, dim, dtype=torch.int8)], 1)
    sqn = _sqnorm(d)
    valid = torch.arange(cap8).view(1, -1) < torch.as_tensor(ls.counts).view(-1, 1)
    sqn = sqn.masked_fill(~valid, BIG)
    return _Keys(d.contiguous(), (-sqn).contiguous(), np.asarray(ls.counts, dtype=np.int64), dim)


def _two_nearest(qd, keys: _Keys, cq: np.ndarray, norm: str):
    """Query descriptors int8 [n, D'] x candidates ``cq`` [K] of ``keys`` -> (best [n, K],
    second [n, K] distances: L2 (not squared) or Hamming, float64; best_idx [n, K] into the
    candidate's keypoints).  One exact int8 matrix product (int32 sums) for all K candidates."""
    import torch

    K = len(cq)
    width = int(keys.counts[cq].max()) if K else 0
    width = max(8, -(-width // 8) * 8)
    ci = torch.from_numpy(cq)
    cd = keys.desc[ci, :width]  # [K, w, D']
    n = qd.shape[0]
    q = qd if n > 16 else torch.cat([qd, torch.zeros(17 - n, qd.shape[1], dtype=torch.int8)])
    dot = torch._int_mm(q, cd.reshape(K * width, -1).T)[:n].view(n, K, width)
    # maximise 2 q.c - |c|^2  <=>  minimise |q - c|^2 = |q|^2 - (2 q.c - |c|^2)
    score = torch.add(keys.nsqn[ci, :width].view(1, K, width), dot, alpha=2)  # one pass: -|c|^2 + 2 q.c
    # the two best per (query keypoint, candidate): max, blank it out, max again (cheaper than topk)
    v1, i1 = score.max(dim=2, keepdim=True)
    score.scatter_(2, i1, torch.iinfo(torch.int32).min)
    v2 = score.amax(2, keepdim=True)
    v = torch.cat([v1, v2], 2).to(torch.float64)
    nq = _sqnorm(qd).view(n, 1, 1).to(torch.float64)
    d2 = nq - v
    if norm == "hamming":  # |q - c|^2 = 4 hamming for +-1 bits
        dist = d2 / 4.0
    else:
        dist = d2.clamp(min=0.0).sqrt()
    dist = dist.masked_fill(v <= -BIG // 2, math.inf)  # padding slots (fewer keypoints than width)
    return dist[..., 0], dist[..., 1], i1[..., 0]


def _fit(src: np.ndarray, dst: np.ndarray, reproj: float, refine: int = 0) -> tuple[int, Any]:
    """RANSAC similarity src [m, 2] -> dst [m, 2]: (inliers, transform [2, 3] or None).
    ``refine``: Levenberg-Marquardt steps on the inliers (only the best pair's transform is kept,
    so only it is refined)."""
    import cv2

    M, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=reproj,
                                         maxIters=RANSAC_ITERS, confidence=RANSAC_CONFIDENCE, refineIters=refine)
    if M is None or inl is None:
        return 0, None
    scale = math.hypot(M[0, 0], M[1, 0])
    if not (MIN_SCALE <= scale <= 1.0 / MIN_SCALE):  # a collapsing or exploding fit proves no copy
        return 0, None
    return int(inl.sum()), M


def _verify_one(q_kp, q_desc, keys: _Keys, key_kp, cq, norm, ratio, reproj):
    """One query (keypoints [n, 4], int8 descriptors [n, D']) against candidates ``cq`` [K] of
    ``keys`` -> (inliers [K], matches [K], transforms: list of K arrays [2, 3] or None)."""
    K = len(cq)
    inl = np.zeros(K, np.int64)
    nmatch = np.zeros(K, np.int64)
    trans: list[Any] = [None] * K
    if q_desc.shape[0] == 0 or K == 0:
        return inl, nmatch, trans
    best, second, idx = _two_nearest(q_desc, keys, cq, norm)
    # Lowe's ratio test; a candidate with a single keypoint has no second neighbour: no test, no match
    good = ((best < ratio * second) & second.isfinite()).numpy()
    idx_np = idx.numpy()
    best_np = best.numpy()

    def pts(k):
        """Matches of candidate k, one-to-one: a candidate keypoint keeps its nearest query keypoint
        (many-to-one matches would let a degenerate, collapsing fit count them all as inliers)."""
        qi = np.flatnonzero(good[:, k])
        ci = idx_np[qi, k]
        order = np.lexsort((qi, best_np[qi, k]))
        _, first = np.unique(ci[order], return_index=True)
        keep = np.sort(order[first])
        return np.ascontiguousarray(q_kp[qi[keep], :2]), np.ascontiguousarray(key_kp[cq[k], ci[keep], :2])

    cols = np.flatnonzero(good.sum(0) >= MIN_MATCHES)
    matched = {int(k): pts(k) for k in cols}
    for k, (src, dst) in matched.items():
        nmatch[k] = len(src)
        if len(src) >= MIN_MATCHES:
            inl[k], trans[k] = _fit(src, dst, reproj)
    if inl.max(initial=0) > 0:  # the best pair's transform is reported: refine it
        k = int(np.argmax(inl))
        _, m_ref = _fit(*matched[k], reproj, refine=10)
        if m_ref is not None:
            trans[k] = m_ref
    return inl, nmatch, trans


# ---------------------------------------------------------------------------------------------
# public API


def verify_pair(kp_a: np.ndarray, desc_a: np.ndarray, kp_b: np.ndarray, desc_b: np.ndarray, *,
                norm: str = "l2", ratio: float = DEFAULT_RATIO, reproj: float = DEFAULT_REPROJ) -> Match:
    """Verify image a (query) against image b: keypoints [n, >= 2] (x, y, ...), descriptors uint8
    [n, D]. The transform maps a's pixels onto b's."""
    _check_params(ratio, reproj)
    b = LocalSet.from_features([(np.asarray(kp_b, np.float32), np.asarray(desc_b, np.uint8))], norm)
    qa = _as_int8(np.asarray(desc_a, np.uint8), norm)
    inl, nm, tr = _verify_one(np.asarray(kp_a, np.float32), qa, _prepare_keys(b), b.keypoints, np.array([0]),
                              norm, ratio, reproj)
    return Match(int(inl[0]), int(nm[0]), tr[0])


def verify_images(img_a: np.ndarray, img_b: np.ndarray, *, kind: str = "sift",
                  max_keypoints: int = DEFAULT_MAX_KEYPOINTS, size: int | None = DEFAULT_SIZE,
                  ratio: float = DEFAULT_RATIO, reproj: float = DEFAULT_REPROJ) -> Match:
    """Two decoded images (uint8 [H, W] or [H, W, 3]) -> :class:`Match`; both are resized to
    ``size`` first (as ``embed --backbone sift`` does), so the transform is in that frame."""
    spec = get_local_kind(kind)
    ka, da = extract(img_a, spec, max_keypoints, size)
    kb, db = extract(img_b, spec, max_keypoints, size)
    return verify_pair(ka, da, kb, db, norm=spec.norm, ratio=ratio, reproj=reproj)


def _check_params(ratio: float, reproj: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise GanprintError(f"--verify-ratio {ratio}: must be in (0, 1]")
    if not reproj > 0.0:
        raise GanprintError(f"--verify-reproj {reproj}: must be > 0 pixels")


def verify_candidates(queries: LocalSet, keys: LocalSet, candidates, *, ratio: float = DEFAULT_RATIO,
                      reproj: float = DEFAULT_REPROJ, threads: int | None = None,
                      on_query=None) -> Verified:
    """Re-score each query's candidate list by geometric verification.

    candidates int64 [Q, K] (indices into ``keys``; -1 = none).  Returns :class:`Verified` with
    the candidates re-ordered by inlier count (ties keep the shortlist order).  Queries run in
    ``threads`` threads (default: torch's thread count); each thread's products use one core."""
    import torch

    _check_params(ratio, reproj)
    if queries.norm != keys.norm:
        raise ArtifactError(f"{queries.source} and {keys.source}: local features of different kinds "
                            f"({queries.norm} vs {keys.norm}); embed both with the same --backbone")
    if queries.descriptors.shape[2] != keys.descriptors.shape[2]:
        raise ArtifactError(f"{queries.source} and {keys.source}: descriptor sizes differ; embed both with the same --backbone")
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != len(queries):
        raise GanprintError(f"candidates must be [Q={len(queries)}, K], got {cand.shape}")
    Q, K = cand.shape
    norm = queries.norm
    values = np.zeros((Q, K), np.float32)
    indices = np.full((Q, K), -1, np.int64)
    matches = np.zeros((Q, K), np.int32)
    transform = np.full((Q, 2, 3), np.nan, np.float32)
    prepared = _prepare_keys(keys)  # int8 [N, cap8, D'] once

    def one(q: int) -> None:
        c = cand[q]
        ok = c >= 0
        cq = c[ok]
        n = int(queries.counts[q])
        qd = _as_int8(queries.descriptors[q, :n], norm)
        inl, nm, tr = _verify_one(queries.keypoints[q, :n], qd, prepared, keys.keypoints, cq, norm, ratio, reproj)
        order = np.argsort(-inl, kind="stable")
        m = len(cq)
        values[q, :m] = inl[order]
        indices[q, :m] = cq[order]
        matches[q, :m] = nm[order]
        if m and tr[order[0]] is not None and inl[order[0]] > 0:
            transform[q] = tr[order[0]]
        if on_query is not None:
            on_query()

    from ganprint.verify_register import map_queries

    map_queries(one, Q, threads)
    return Verified(torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(matches),
                    torch.from_numpy(transform))


# ---------------------------------------------------------------------------------------------
# simmatrix integration


def load_local_sets(paths) -> list[LocalSet]:
    from ganprint.local_features import load_local

    if not paths:
        raise GanprintError("--verify: give at least one local-features artifact (ganprint embed --backbone sift)")
    sets = [load_local(p) for p in paths]
    norms = {s.norm for s in sets}
    dets = {(s.provenance or {}).get("local", {}).get("detector") for s in sets}
    if len(norms) > 1 or len(dets) > 1:
        raise ArtifactError(f"{sets[0].source} and {sets[-1].source}: local features of different kinds "
                            f"({', '.join(sorted(str(d) for d in dets))}); embed all with the same --backbone")
    params = {json_key((s.provenance or {}).get("local")) for s in sets}
    if len(params) > 1:
        raise ArtifactError(f"{sets[0].source} and {sets[-1].source}: local features with different settings "
                            "(--max-keypoints / --image-size); embed all with the same options")
    return sets


def json_key(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def locate(sets, table, rows, role: str, global_src: str, embed_hint: str = "--backbone sift",
           what: str = "local features") -> list[tuple[int, int]]:
    """(set, row) of each of ``table``'s ``rows`` (a global embeddings manifest) in ``sets`` (objects
    with ``.table`` and ``.source``), matched by content sha256; refuse when any image is missing."""
    index: dict[str, tuple[int, int]] = {}
    for si, s in enumerate(sets):
        if s.table is None or "sha256" not in s.table.columns:
            raise ArtifactError(f"{s.source}: manifest has no sha256 column; re-run `ganprint embed {embed_hint}`")
        for r, h in enumerate(s.table["sha256"].to_numpy()):
            index.setdefault(str(h), (si, r))
    if "sha256" not in table.columns:
        raise ArtifactError(f"{global_src}: manifest has no sha256 column; re-run `ganprint embed`")
    hashes = table["sha256"].to_numpy()[np.asarray(rows, dtype=np.int64)]
    found = [index.get(str(h)) for h in hashes]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        ex = table.iloc[int(np.asarray(rows)[missing[0]])]
        where = ex.get("relpath", ex.get("image_id", "?"))
        raise ArtifactError(
            f"{global_src}: {len(missing)} of {len(hashes)} {role} images have no {what} in "
            f"{', '.join(s.source for s in sets)} (e.g. {where}); embed the same folders with {embed_hint} "
            "and pass that artifact to --verify")
    return found  # type: ignore[return-value]


def lookup(sets: list[LocalSet], table, rows, role: str, global_src: str) -> LocalSet:
    """The local features of ``table``'s ``rows`` (a global embeddings manifest), matched by
    content sha256; refuse when any image has no local features."""
    found = locate(sets, table, rows, role, global_src)
    kp = np.stack([sets[si].keypoints[r] for si, r in found]) if found else sets[0].keypoints[:0]
    de = np.stack([sets[si].descriptors[r] for si, r in found]) if found else sets[0].descriptors[:0]
    counts = np.array([sets[si].counts[r] for si, r in found], dtype=np.int64)
    return LocalSet(kp, de, counts, sets[0].norm, None, sets[0].provenance, sets[0].source)


# ---------------------------------------------------------------------------------------------
# verification methods: resolved from the kind of the --verify artifact


@dataclass(frozen=True)
class VerifyMethod:
    """How ``simmatrix --verify ARTIFACT`` re-scores a shortlist.

    ``accepts(provenance)``: whether this method reads such an artifact; ``load(paths)`` -> sets;
    ``lookup(sets, table, rows, role, src)`` -> the sets' rows lined up with a global manifest;
    ``run(queries, keys, candidates, params)`` -> :class:`Verified`; ``describe(sets)`` -> the
    provenance entries of the method (``score`` names what ``verify_*_values`` hold)."""

    name: str
    description: str
    accepts: Any
    load: Any
    lookup: Any
    run: Any
    describe: Any


VERIFY_METHODS: dict[str, VerifyMethod] = {}


def register_verify_method(method: VerifyMethod) -> VerifyMethod:
    if not method.name.isidentifier():
        raise ValueError(f"verify method name {method.name!r} must be an identifier")
    if method.name in VERIFY_METHODS:
        raise ValueError(f"verify method {method.name!r} is already registered")
    for f in ("accepts", "load", "lookup", "run", "describe"):
        if not callable(getattr(method, f)):
            raise ValueError(f"verify method {method.name!r}: {f} must be callable")
    VERIFY_METHODS[method.name] = method
    return method


def method_for(path) -> VerifyMethod:
    """The verification method that reads the artifact ``path`` (by its provenance)."""
    from ganprint.artifacts import TENSOR_SUFFIX, artifact_base, read_provenance

    prov = read_provenance(path)
    ok = [m for m in VERIFY_METHODS.values() if m.accepts(prov)]
    if not ok:
        raise ArtifactError(f"{artifact_base(path)}{TENSOR_SUFFIX}: a '{prov.get('kind')}' artifact "
                            f"(backbone {prov.get('backbone')}) cannot verify; pass local features (`embed "
                            "--backbone sift`) or raw-pixel grids (`embed --backbone pixels`, registration)")
    return ok[0]


def _ransac_describe(sets) -> dict:
    p0 = sets[0].provenance or {}
    return {"detector": (p0.get("local") or {}).get("detector"), "local": p0.get("local"), "min_matches": MIN_MATCHES,
            "ransac": {"method": "cv2.estimateAffinePartial2D", "max_iters": RANSAC_ITERS,
                       "confidence": RANSAC_CONFIDENCE}, "score": "ransac_inliers"}


register_verify_method(VerifyMethod(
    "ransac", "local descriptors, ratio test, RANSAC similarity fit; score = inliers",
    accepts=lambda prov: prov.get("kind") == "local_features",
    load=lambda paths: load_local_sets(paths),
    lookup=lookup,
    run=lambda q, k, c, p: verify_candidates(q, k, c, ratio=p["ratio"], reproj=p["reproj"]),
    describe=_ransac_describe,
))


def _register_lookup(sets, table, rows, role, src):
    from ganprint.verify_register import GridSet

    found = locate(sets, table, rows, role, src, "--backbone pixels --image-size S", "pixel grids")
    imgs = (np.stack([sets[si].images[r] for si, r in found]) if found else sets[0].images[:0])
    return GridSet(imgs, None, sets[0].provenance, sets[0].source)


def _register_run(q, k, c, p):
    import torch

    from ganprint.verify_register import register_candidates

    out = register_candidates(q, k, c)
    return Verified(*(torch.from_numpy(out[n]) for n in ("values", "indices", "matches", "transform")))


def _register_describe(sets) -> dict:
    from ganprint import verify_register as VR

    size = int(sets[0].images.shape[-1])
    return {"detector": "register", "local": {"detector": "register", "size": size},
            "registration": VR.describe(size), "score": "-log(1 - aligned ncc)"}


def _accepts_grid(prov) -> bool:
    from ganprint.verify_register import BACKBONES

    return prov.get("kind") == "embeddings" and prov.get("backbone") in BACKBONES


register_verify_method(VerifyMethod(
    "register", "coarse exhaustive rotation x shift NCC, ECC on the top candidates; score = -log(1 - NCC after alignment)",
    accepts=_accepts_grid,
    load=lambda paths: __import__("ganprint.verify_register", fromlist=["load_grids"]).load_grids(paths),
    lookup=_register_lookup,
    run=_register_run,
    describe=_register_describe,
))


@dataclass
class VerifyInputs:
    """Local features (or image grids) of the generated [G], real [R] and reference [M] (or None)
    images of one similarity computation, row-aligned with the global embeddings (see
    :func:`prepare_verification`); ``method`` the :class:`VerifyMethod` that reads them."""

    gen: Any
    real: Any
    ref: Any
    sets: list
    method: Any = None


def prepare_verification(verify_paths, *, gen_table, gen_rows, real_table, real_rows, ref_table=None,
                         ref_rows=None, gen_src: str = "generated", real_src: str = "real",
                         ref_src: str = "reference", k: int = DEFAULT_K) -> VerifyInputs:
    """Load the --verify artifacts and line them up (by content sha256) with the global embeddings'
    rows; the method follows from the artifacts' kind (:data:`VERIFY_METHODS`: local features ->
    ``ransac``, raw-pixel grids -> ``register``); every refusal happens here, before any search runs."""
    if k < 0:
        raise GanprintError(f"--verify-k {k}: must be >= 0 (0 verifies every generated image)")
    if not verify_paths:
        raise GanprintError("--verify: give at least one local-features artifact (ganprint embed --backbone sift)")
    methods = {method_for(p).name for p in verify_paths}
    if len(methods) > 1:
        raise ArtifactError(f"{verify_paths[0]} and {verify_paths[-1]}: --verify artifacts of different kinds "
                            f"({', '.join(sorted(methods))}); pass artifacts of one kind")
    method = VERIFY_METHODS[methods.pop()]
    sets = method.load(verify_paths)
    lg = method.lookup(sets, gen_table, gen_rows, "generated", gen_src)
    lr = method.lookup(sets, real_table, real_rows, "real", real_src)
    lref = None if ref_table is None else method.lookup(sets, ref_table, ref_rows, "reference", ref_src)
    return VerifyInputs(lg, lr, lref, sets, method)


def verify_for_similarity(inputs: VerifyInputs, *, gen_emb, real_emb, ref_emb=None, ref_exclude=None,
                          metric: str = "cosine", k: int = DEFAULT_K, ratio: float = DEFAULT_RATIO,
                          reproj: float = DEFAULT_REPROJ, block: int = 1024, device: Any = "cpu", search):
    """The ``verify_*`` tensors and provenance of a similarity artifact.

    Shortlists: the top-``k`` generated images of each real image in the *global* embeddings
    (``gen_emb`` [G, D], ``real_emb`` [R, D]; ``k`` <= 0 or >= G: all of them), and the top-``k``
    reference images (``ref_emb`` [M, D], ``ref_exclude`` [R] as in similarity; None: the other
    real images, self excluded).  Each is re-scored by ``inputs.method`` (:func:`verify_candidates`
    for local features, registration for raw-pixel grids).
    ``search``: the global top-k search (``ganprint.similarity.topk_search``), passed in by the caller
    so that this module stays below the similarity stage.
    Returns (tensors, provenance dict)."""
    import torch

    _check_params(ratio, reproj)
    lg, lr = inputs.gen, inputs.real
    G, R = len(lg), len(lr)
    kg = G if k <= 0 or k >= G else k
    if kg < G:
        short, _, _ = search(real_emb, gen_emb, kg, metric=metric, block=block, device=device)
        cand = short.indices.numpy()
    else:
        cand = np.tile(np.arange(G), (R, 1))
    n_pairs = R * kg
    out: dict[str, Any] = {}
    method = inputs.method or VERIFY_METHODS["ransac"]
    params = {"ratio": ratio, "reproj": reproj}
    vg = method.run(lr, lg, cand, params)
    out["verify_real_values"], out["verify_real_indices"] = vg.values, vg.indices
    out["verify_real_matches"], out["verify_real_transform"] = vg.matches, vg.transform
    # real x reference (or x the other reals, self excluded) for calibrated attacks
    if inputs.ref is not None:
        lref, keys_emb = inputs.ref, ref_emb
        excl = None if ref_exclude is None else torch.as_tensor(ref_exclude, dtype=torch.long)
    else:
        lref, keys_emb, excl = lr, real_emb, torch.arange(R)
    n_ex = 1 if excl is not None and bool((excl >= 0).any()) else 0
    kr = min(len(lref) - n_ex, kg if k > 0 else len(lref))
    if kr >= 1:
        rs, _, _ = search(real_emb, keys_emb, kr, metric=metric, block=block, device=device, exclude=excl)
        rcand = rs.indices.numpy()
        vr = method.run(lr, lref, rcand, params)
        out["verify_realref_values"], out["verify_realref_indices"] = vr.values, vr.indices
        n_pairs += int((rcand >= 0).sum())
    prov = {
        "method": method.name,
        **method.describe(inputs.sets),
        "artifacts": [{"path": s.source, "pair_id": (s.provenance or {}).get("pair_id"),
                       "inputs_hash": (s.provenance or {}).get("inputs_hash")} for s in inputs.sets],
        "k": int(kg), "k_requested": int(k), "ratio": ratio, "reproj": reproj,
        "shortlist": "global similarity top-k" if kg < G else "all generated",
        "realref": "verify_realref_values" in out, "pairs": int(n_pairs),
    }
    return out, prov


def best_matches(sim):
    """Per real image of a verified similarity artifact (path or Artifact): its best verified match.

    Returns a DataFrame, one row per real image (the similarity table's order): ``image_id``,
    ``gen_image_id``, ``gen_path`` (None when nothing verified), ``inliers``, ``matches``,
    ``angle`` (degrees, as ``cv2.getRotationMatrix2D``), ``scale``, ``shift_x``, ``shift_y``
    (pixels), and ``frame`` = the square size the transform is expressed in (the local features'
    ``--image-size``; None = native size)."""
    import pandas as pd

    from ganprint.artifacts import Artifact, read_artifact

    art = sim if isinstance(sim, Artifact) else read_artifact(sim, kind="similarity")
    src = f"{art.base}.safetensors"
    if "verify_real_values" not in art.tensors:
        raise ArtifactError(f"{src}: no verified scores; re-run `ganprint simmatrix` with --verify LOCAL")
    gen_info = art.provenance.get("generated") or {}
    gen = read_artifact(gen_info["path"], kind="embeddings")
    gtab = gen.table.iloc[art.tensors["gen_rows"].numpy()].reset_index(drop=True)
    vals = art.tensors["verify_real_values"].numpy()
    idx = art.tensors["verify_real_indices"].numpy()
    nm = art.tensors["verify_real_matches"].numpy()
    tr = art.tensors["verify_real_transform"].numpy().astype(np.float64)
    frame = ((art.provenance.get("verify") or {}).get("local") or {}).get("size")
    rows = []
    for r in range(len(vals)):
        ok = vals.shape[1] > 0 and idx[r, 0] >= 0 and vals[r, 0] > 0
        m = Match(int(vals[r, 0]) if ok else 0, int(nm[r, 0]) if ok else 0, tr[r] if ok and np.isfinite(tr[r]).all() else None)
        g = gtab.iloc[int(idx[r, 0])] if ok else None
        rows.append({"image_id": str(art.table["image_id"].iloc[r]),
                     "gen_image_id": None if g is None else str(g["image_id"]),
                     "gen_path": None if g is None else str(g["path"]),
                     "inliers": m.inliers, "matches": m.matches, "angle": m.angle, "scale": m.scale,
                     "shift_x": m.shift[0], "shift_y": m.shift[1], "frame": frame})
    return pd.DataFrame(rows)
