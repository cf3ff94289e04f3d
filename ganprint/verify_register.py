"""Registration verifier: rotation search + phase correlation, scored by NCC after alignment.

Local features (:mod:`ganprint.verify`) need local structure; a generator that works at 16 px
and is up-sampled has none, and SIFT on such images is at chance.  Registration works at the
image's own (low) resolution: the query is rotated through a small grid of angles (default
+-12 degrees in 4 degree steps), the shift between each rotated query and each candidate comes from
phase correlation (the peak of the inverse FFT of the normalised cross-power spectrum, batched
torch FFTs), the pose is refined by ECC (``cv2.findTransformECC``, rotation + shift, kept only
inside the searched range), and the pair is scored by the normalised cross-correlation (NCC) of
the candidate and the query moved by that pose, over the pixels where both are defined.  The query
is also tried smoothed (:data:`DEFAULT_QUERY_BLURS`): a copy is a blurred version of its source.

Score: ``-log(1 - ncc)``.  For zero-mean unit-norm images, ``1 - ncc`` is half the squared
residual between them, so the score is minus the log residual energy: a copy (residual a few
percent) and a look-alike slice (residual 10-20%) are far apart on it, and the score is >= 0 for
any ncc >= 0 (negative correlations are clipped to 0), so ``verify_cal``'s log ratio applies.

Input: a ``pixels`` embeddings artifact (``ganprint embed --backbone pixels --image-size S``; each row is
the S x S gray image, zero-mean, unit-norm, row-major), so images are decoded once, by embed,
and the artifact's manifest / provenance contract holds.  Shapes: images float32 [N, S, S].

Public API: :func:`register_images` two decoded images -> (score, transform [2, 3] mapping the
first image's pixels to the second's, in the S x S frame); :func:`register_candidates` queries x
candidate lists -> numpy ``values`` (scores, descending), ``indices``, ``matches`` (overlap pixels
of the coarse alignment), ``transform`` (best pair's); :func:`load_grids` reads the artifacts.
``ganprint.verify`` registers this as the ``register`` verification method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ganprint.errors import ArtifactError, GanprintError

DEFAULT_MAX_ANGLE = 12.0  # degrees; the replica transforms rotate by up to +-10
DEFAULT_ANGLE_STEP = 4.0  # coarse: ECC refines the angle
MIN_OVERLAP = 0.5  # an alignment whose overlap is under half the image proves nothing
DEFAULT_MAX_SHIFT = 0.15  # of the image side: copies keep their content in frame (synth shifts by <= 8%)
BACKBONES = ("pixels",)  # embeddings whose rows are image grids


@dataclass
class GridSet:
    """N gray images float32 [N, S, S] (zero mean, unit norm), with the manifest and provenance."""

    images: Any
    table: Any = None
    provenance: dict | None = None
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, rows) -> "GridSet":
        rows = np.asarray(rows, dtype=np.int64)
        tab = None if self.table is None else self.table.iloc[rows].reset_index(drop=True)
        return GridSet(self.images[rows], tab, self.provenance, self.source)


def angles_grid(max_angle: float = DEFAULT_MAX_ANGLE, step: float = DEFAULT_ANGLE_STEP) -> np.ndarray:
    """Angles (degrees) searched: 0, +-step, ..., +-max_angle."""
    if max_angle < 0 or step <= 0:
        raise GanprintError(f"rotation search {max_angle} / {step}: need max angle >= 0 and step > 0")
    n = int(math.floor(max_angle / step + 1e-9))
    return np.array([0.0] + [s * i * step for i in range(1, n + 1) for s in (1, -1)], dtype=np.float64)


def _rot_theta(angles_deg, device=None):
    """affine_grid thetas [A, 2, 3] sampling an image rotated by ``angles`` (degrees, as
    cv2.getRotationMatrix2D: positive = counter-clockwise as displayed) about its centre."""
    import torch

    a = torch.as_tensor(np.radians(angles_deg), dtype=torch.float32)
    c, s = torch.cos(a), torch.sin(a)
    z = torch.zeros_like(a)
    # output (u, v) samples input at R^-1 (u, v); counter-clockwise on screen (y down) = clockwise in
    # (x, y) maths coordinates, so the inverse is a counter-clockwise maths rotation
    return torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)


def _rotated(q, angles_deg):
    """q [S, S] -> (rotated [A, S, S], valid mask [A, S, S]) with zeros outside."""
    import torch
    import torch.nn.functional as F

    S = q.shape[-1]
    th = _rot_theta(angles_deg)
    grid = F.affine_grid(th, [len(angles_deg), 1, S, S], align_corners=False)
    src = torch.stack([q, torch.ones_like(q)]).unsqueeze(0).expand(len(angles_deg), 2, S, S)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0], out[:, 1]


def _spectra(x):
    """[..., S, S] -> rfft2 with zero padding to 2S (no wrap-around between shifts)."""
    import torch

    S = x.shape[-1]
    return torch.fft.rfft2(x, s=(2 * S, 2 * S))


def _masked_ncc(a, ma, b, mb):
    """NCC of a and b over the pixels where both masks are ~1: a, ma [..., S, S], b, mb broadcast."""
    w = (ma * mb > 0.999).to(a.dtype)
    n = w.sum((-2, -1)).clamp(min=1.0)
    am = (a * w).sum((-2, -1)) / n
    bm = (b * w).sum((-2, -1)) / n
    da = (a - am[..., None, None]) * w
    db = (b - bm[..., None, None]) * w
    num = (da * db).sum((-2, -1))
    den = (da.square().sum((-2, -1)) * db.square().sum((-2, -1))).sqrt().clamp(min=1e-12)
    return num / den, n


def _register_one(q, cands, cand_spec, angles_deg, max_shift: float = DEFAULT_MAX_SHIFT):
    """One query [S, S] against candidates [K, S, S] (their padded spectra ``cand_spec``) ->
    (ncc [K], overlap [K], angle [K] degrees, shift [K, 2] (dx, dy) pixels)."""
    import torch
    import torch.nn.functional as F

    S = q.shape[-1]
    K = cands.shape[0]
    A = len(angles_deg)
    rq, rm = _rotated(q, angles_deg)  # [A, S, S]
    qs = _spectra(rq)  # [A, 2S, S+1]
    cross = cand_spec.unsqueeze(0) * qs.conj().unsqueeze(1)  # [A, K, 2S, S+1]
    cross = cross / cross.abs().clamp(min=1e-9)
    corr = torch.fft.irfft2(cross, s=(2 * S, 2 * S))  # [A, K, 2S, 2S]: peak at the candidate - query shift
    # shifts beyond max_shift are not searched (a copy keeps its content in frame)
    lim = max(1, int(round(max_shift * S)))
    idx = torch.cat([torch.arange(0, lim + 1), torch.arange(2 * S - lim, 2 * S)])
    corr = corr[..., idx, :][..., idx]
    flat = corr.reshape(A, K, -1).argmax(-1)
    n = idx.numel()
    iy, ix = flat // n, flat % n
    sv = torch.cat([torch.arange(0, lim + 1), torch.arange(-lim, 0)]).to(torch.float32)
    dy, dx = sv[iy], sv[ix]  # [A, K]
    # move each rotated query by its shift (grid_sample, exact for integer shifts) and score by NCC
    th = torch.zeros(A, K, 2, 3)
    th[..., 0, 0] = 1.0
    th[..., 1, 1] = 1.0
    th[..., 0, 2] = -dx * 2.0 / S
    th[..., 1, 2] = -dy * 2.0 / S
    grid = F.affine_grid(th.view(A * K, 2, 3), [A * K, 2, S, S], align_corners=False)
    src = torch.stack([rq, rm], 1).unsqueeze(1).expand(A, K, 2, S, S).reshape(A * K, 2, S, S)
    moved = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=False).view(A, K, 2, S, S)
    ncc, ov = _masked_ncc(moved[:, :, 0], moved[:, :, 1], cands.unsqueeze(0), torch.ones(1, 1, S, S))
    ncc = torch.where(ov >= MIN_OVERLAP * S * S, ncc, torch.full_like(ncc, -1.0))
    best = ncc.argmax(0)  # [K]
    ar = torch.arange(K)
    ang = torch.as_tensor(angles_deg, dtype=torch.float32)[best]
    return ncc[best, ar], ov[best, ar], ang, torch.stack([dx[best, ar], dy[best, ar]], 1)


def transform_matrix(angle_deg: float, dx: float, dy: float, size: int) -> np.ndarray:
    """float64 [2, 3] mapping query pixel (x, y) -> candidate pixel: rotate by ``angle`` about the
    centre (cv2.getRotationMatrix2D's convention), then shift by (dx, dy)."""
    import cv2

    c = (size - 1) / 2.0
    m = cv2.getRotationMatrix2D((c, c), float(angle_deg), 1.0).astype(np.float64)
    m[0, 2] += dx
    m[1, 2] += dy
    return m


def score_of(ncc):
    """-log(1 - ncc), ncc clipped to [0, 1 - 1e-6]: minus the log residual energy of the pair."""
    import torch

    return -torch.log1p(-ncc.clamp(0.0, 1.0 - 1e-6))


DEFAULT_ECC_ITERS = 50
DEFAULT_ECC_EPS = 1e-5
DEFAULT_ECC_BLUR = 1  # Gaussian filter (pixels, odd) ECC applies to both images (1: none)
# degradation search: the query (real image) is also tried smoothed by these Gaussians (px of the
# grid), since a copy is a blurred version of its source, not the other way round; a symmetric
# blur of both (ECC's filter) cannot undo that (measured on the DDPM copies data: README)
DEFAULT_QUERY_BLURS = (0.0, 0.5, 0.8, 1.1)


def _ecc(cand: np.ndarray, query: np.ndarray, m_q2c: np.ndarray, iters: int, eps: float, blur: int):
    """Refine the query -> candidate rigid transform [2, 3] by ECC (cv2.findTransformECC, Euclidean
    motion: rotation + shift), which maximises the NCC of the candidate and the warped query over
    the pixels the warp keeps inside the query.  Returns (ncc, m_q2c) or None when ECC diverges."""
    import cv2

    w = cv2.invertAffineTransform(m_q2c).astype(np.float32)  # ECC's warp maps candidate -> query pixels
    try:
        cc, w = cv2.findTransformECC(cand, query, w, cv2.MOTION_EUCLIDEAN,
                                     (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iters, eps), None, blur)
    except cv2.error:  # no convergence (flat or unrelated images)
        return None
    return float(cc), cv2.invertAffineTransform(w.astype(np.float64))


def register_one(q, cands, cand_spec, angles_deg, *, refine: bool = True, iters: int = DEFAULT_ECC_ITERS,
                 eps: float = DEFAULT_ECC_EPS, blur: int = DEFAULT_ECC_BLUR, max_shift: float = DEFAULT_MAX_SHIFT,
                 query_blurs=(0.0,)):
    """One query float32 [S, S] against candidates [K, S, S] (padded spectra ``cand_spec``, see
    :func:`_spectra`) -> (ncc float64 [K], overlap int64 [K] pixels, transforms float64 [K, 2, 3]
    query -> candidate pixels).  Coarse: rotation grid x phase correlation (batched torch FFTs);
    then ECC from the coarse pose (``refine``); the better of the two NCCs is kept."""
    if len(query_blurs) > 1 or query_blurs[0] > 0:  # degradation search: the copy may be blurred, not the source
        best = None
        for sigma in query_blurs:
            r = register_one(_blurred(q, sigma), cands, cand_spec, angles_deg, refine=refine, iters=iters, eps=eps,
                             blur=blur, max_shift=max_shift, query_blurs=(0.0,))
            if best is None:
                best = r
            else:
                better = r[0] > best[0]
                best = (np.where(better, r[0], best[0]), np.where(better, r[1], best[1]),
                        np.where(better[:, None, None], r[2], best[2]))
        return best
    S = q.shape[-1]
    ncc, ov, ang, sh = _register_one(q, cands, cand_spec, angles_deg, max_shift)
    max_angle = float(np.abs(angles_deg).max()) if len(angles_deg) else 0.0
    ncc = ncc.double().numpy()
    ov = ov.numpy().astype(np.int64)
    ang, sh = ang.numpy(), sh.numpy()
    trans = np.stack([transform_matrix(ang[k], sh[k, 0], sh[k, 1], S) for k in range(len(ncc))]) \
        if len(ncc) else np.zeros((0, 2, 3))
    if refine:
        qn = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        cn = cands.numpy().astype(np.float32)
        for k in range(len(ncc)):
            r = _ecc(np.ascontiguousarray(cn[k]), qn, trans[k], iters, eps, blur)
            if r is not None and r[0] > ncc[k] and _plausible(r[1], S, max_angle, max_shift):
                ncc[k], trans[k] = r
    return ncc, ov, trans


def _blurred(q, sigma: float):
    """q float32 [S, S] smoothed by a Gaussian of ``sigma`` px (cv2), renormalised; sigma 0: q."""
    import cv2
    import torch

    if sigma <= 0:
        return q
    x = cv2.GaussianBlur(np.ascontiguousarray(q.numpy()), (0, 0), float(sigma), borderType=cv2.BORDER_REPLICATE)
    x = x - x.mean()
    return torch.from_numpy(x / (np.linalg.norm(x) + 1e-8))


def _plausible(m: np.ndarray, size: int, max_angle: float, max_shift: float) -> bool:
    """The refined pose stays inside the searched range (rotation <= max_angle + 2 degrees, centre
    moved by <= max_shift of the side + 1 px): a free optimiser would otherwise fit unrelated
    images better by turning / sliding them further than any copy transform does."""
    c = (size - 1) / 2.0
    x, y = m @ np.array([c, c, 1.0])
    ang = abs(math.degrees(math.atan2(m[1, 0], m[0, 0])))
    lim = max_shift * size + 1.0
    return ang <= max_angle + 2.0 and abs(x - c) <= lim and abs(y - c) <= lim


def register_candidates(queries: GridSet, keys: GridSet, candidates, *, max_angle: float = DEFAULT_MAX_ANGLE,
                        angle_step: float = DEFAULT_ANGLE_STEP, refine: bool = True, blur: int = DEFAULT_ECC_BLUR,
                        query_blurs=DEFAULT_QUERY_BLURS, threads: int | None = None, on_query=None) -> dict:
    """Re-score each query's candidate list by registration.

    candidates int64 [Q, K] (indices into ``keys``; -1 = none).  Returns numpy arrays: ``values``
    float32 [Q, K] scores (:func:`score_of` the aligned NCC), descending; ``indices`` int64 [Q, K]
    in that order (-1: padding); ``matches`` int32 [Q, K] overlap pixels of the coarse alignment;
    ``transform`` float32 [Q, 2, 3] query -> candidate pixels (S x S frame) of each best pair.
    Queries run in ``threads`` threads (torch FFTs and OpenCV's ECC release the GIL)."""
    import torch

    if queries.images.shape[1:] != keys.images.shape[1:]:
        raise ArtifactError(f"{queries.source} and {keys.source}: image grids of different sizes "
                            f"({queries.images.shape[-1]} vs {keys.images.shape[-1]} px); embed both with the same --image-size")
    if blur < 1 or blur % 2 == 0:
        raise GanprintError(f"ECC blur {blur}: must be an odd number of pixels >= 1")
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != len(queries):
        raise GanprintError(f"candidates must be [Q={len(queries)}, K], got {cand.shape}")
    Q, K = cand.shape
    ang = angles_grid(max_angle, angle_step)
    qimg = torch.as_tensor(np.asarray(queries.images, dtype=np.float32))
    kimg = torch.as_tensor(np.asarray(keys.images, dtype=np.float32))
    values = np.zeros((Q, K), np.float32)
    indices = np.full((Q, K), -1, np.int64)
    matches = np.zeros((Q, K), np.int32)
    transform = np.full((Q, 2, 3), np.nan, np.float32)
    used = np.unique(cand[cand >= 0])
    spec = {}
    if len(used):  # each candidate's spectrum once
        sp = _spectra(kimg[torch.as_tensor(used)])
        spec = {int(u): sp[i] for i, u in enumerate(used)}

    def one(q: int) -> None:
        cq = cand[q][cand[q] >= 0]
        if len(cq):
            ci = torch.as_tensor(cq)
            ncc, ov, tr = register_one(qimg[q], kimg[ci], torch.stack([spec[int(c)] for c in cq]), ang,
                                       refine=refine, blur=blur, query_blurs=tuple(query_blurs))
            s = score_of(torch.as_tensor(ncc)).numpy()
            order = np.argsort(-s, kind="stable")
            m = len(cq)
            values[q, :m], indices[q, :m], matches[q, :m] = s[order], cq[order], ov[order]
            transform[q] = tr[order[0]]
        if on_query is not None:
            on_query()

    map_queries(one, Q, threads)
    return {"values": values, "indices": indices, "matches": matches, "transform": transform}


def register_images(img_a: np.ndarray, img_b: np.ndarray, *, size: int = 32, **kw) -> tuple[float, np.ndarray]:
    """Two decoded images (uint8 [H, W] or [H, W, 3]) -> (score, transform [2, 3] a -> b pixels in the
    ``size`` x ``size`` frame); both are reduced as ``embed --backbone pixels --image-size size`` does."""
    g = GridSet(np.stack([grid_of(img_a, size), grid_of(img_b, size)]))
    out = register_candidates(g.take([0]), g.take([1]), np.array([[0]]), **kw)
    return float(out["values"][0, 0]), out["transform"][0].astype(np.float64)


def grid_of(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 image -> float32 [size, size]: gray, box-downsampled (area), zero mean, unit norm."""
    import cv2

    from ganprint.data import to_gray

    g = to_gray(arr).astype(np.float32) / 255.0
    g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA)
    g = g - g.mean()
    return g / (np.linalg.norm(g) + 1e-8)


def load_grids(paths) -> list[GridSet]:
    """``pixels`` embeddings artifacts -> their image grids; all of one ``--image-size``."""
    from ganprint.artifacts import TENSOR_SUFFIX, read_artifact

    sets = []
    for p in paths:
        art = read_artifact(p, kind=None)
        src = f"{art.base}{TENSOR_SUFFIX}"
        prov = art.provenance
        if prov.get("kind") != "embeddings" or prov.get("backbone") not in BACKBONES or prov.get("checkpoint"):
            raise ArtifactError(f"{src}: is not a raw-pixel embeddings artifact (kind {prov.get('kind')}, backbone "
                                f"{prov.get('backbone')}); embed the images with --backbone pixels for registration")
        emb = art.tensor("embeddings").numpy()
        s = int(round(math.sqrt(emb.shape[1])))
        if s * s != emb.shape[1]:
            raise ArtifactError(f"{src}: embeddings of {emb.shape[1]} values are not a square image grid; "
                                "re-run `ganprint embed --backbone pixels`")
        sets.append(GridSet(emb.reshape(-1, s, s).astype(np.float32), art.table, prov, src))
    sizes = {s.images.shape[-1] for s in sets}
    if len(sizes) > 1:
        raise ArtifactError(f"{sets[0].source} and {sets[-1].source}: image grids of different sizes "
                            f"({', '.join(str(x) for x in sorted(sizes))} px); embed all with the same --image-size")
    return sets


def map_queries(one, n: int, threads: int | None = None) -> None:
    """Call ``one(q)`` for q in range(n), on ``threads`` threads (default torch's count) when that
    is more than one: parallel over queries, torch and OpenCV held at one thread each meanwhile
    (both release the GIL), their thread counts restored afterwards."""
    import torch

    nthreads = threads or torch.get_num_threads()
    if nthreads <= 1 or n <= 1:
        for q in range(n):
            one(q)
        return
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    prev, prev_cv = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            list(pool.map(one, range(n)))
    finally:
        torch.set_num_threads(prev)
        cv2.setNumThreads(prev_cv)
