"""Registration verifier: a coarse-to-fine cascade of rigid alignment, scored by correlation.

Local features (:mod:`ganprint.verify`) need local structure; a generator that works at 16 px
and is up-sampled has none, and SIFT on such images is at chance.  Registration works at the
image's own (low) resolution.  For each query (real image) and its K candidates (generated):

1. coarse, all K (:func:`_coarse`): the S px grids area-pooled to the coarse grid C
   (:func:`coarse_size_for`: S itself up to 32 px, 32 px above), the query smoothed
   (:data:`DEFAULT_COARSE_BLURS`), rotated through 0, +-4, ..., +-12 degrees and moved by every
   integer shift up to 15% of the side; the NCC of every pose with every candidate comes from three
   matrix products (exhaustive, no per-pair Python);
2. refinement, the ``refine_top`` best coarse candidates only (:data:`DEFAULT_REFINE_TOP`), on the
   S px grid: the coarse pose scaled to it, ECC (``cv2.findTransformECC``, rotation + shift, kept
   only inside the searched range), then the score at that pose: the NCC under a quadratic contrast
   model (a copy is re-contrasted by a gamma), best over query blurs (:func:`fine_blurs` of
   :data:`DEFAULT_QUERY_BLURS`: a copy is a blurred version of its source, not the other way round);
3. attribution across queries (:func:`_attribution`): a candidate refined for several queries is
   the copy of the one it fits best, and ranks in the others' lists no higher than their own best
   copy (a copy of a slice is nearly as close to its neighbouring slice, another query).

The unrefined candidates keep their coarse NCC, capped at the lowest refined one (the refined
score is on another grid / model, so they rank below the refined candidates).

Score: ``-log(1 - ncc)``.  For zero-mean unit-norm images, ``1 - ncc`` is half the squared
residual between them, so the score is minus the log residual energy: a copy (residual a few
percent) and a look-alike slice (residual 10-20%) are far apart on it, and the score is >= 0 for
any ncc >= 0 (negative correlations are clipped to 0), so ``verify_cal``'s log ratio applies.

Input: a ``pixels`` embeddings artifact (``ganprint embed --backbone pixels --image-size S``; each row is
the S x S gray image, zero-mean, unit-norm, row-major), so images are decoded once, by embed,
and the artifact's manifest / provenance contract holds.  Shapes: images float32 [N, S, S].
A larger S (e.g. 64 for a 64 px generator) only changes the refinement grid: the coarse stage
still runs at <= 32 px.

Public API: :func:`register_images` two decoded images -> (score, transform [2, 3] mapping the
first image's pixels to the second's, in the S x S frame); :func:`register_candidates` queries x
candidate lists -> numpy ``values`` (scores, descending), ``indices``, ``matches`` (overlap pixels
of the coarse alignment), ``transform`` (best pair's), ``refined``; :func:`describe` the
parameters for the provenance; :func:`load_grids` reads the artifacts.
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


def _coarse(q, cands, angles_deg, blurs, max_shift: float = DEFAULT_MAX_SHIFT):
    """Coarse stage, one query against K candidates, exhaustive over (blur, angle, integer shift).

    q float32 [C, C], cands [K, C, C] (both zero-mean unit-norm).  The query is smoothed by each of
    ``blurs`` (B sigmas, px), rotated by each of ``angles_deg`` (A) and moved by every integer shift
    up to ``max_shift`` of the side (n = (2L+1)^2 shifts); the NCC of each moved query with each
    candidate, over the pixels where the moved query is defined, comes from three matrix products
    ([B*A*n, C*C] x [C*C, K]: the overlap sums of query*candidate, candidate and candidate^2), so
    all K candidates and all poses cost one BLAS call each.  Returns torch tensors: (ncc [K], overlap
    [K] pixels, blur index [K], angle [K] degrees, shift [K, 2] (dx, dy) px) of each candidate's
    best pose; a pose whose overlap is under MIN_OVERLAP of the image scores -1."""
    import torch
    import torch.nn.functional as F

    C = q.shape[-1]
    K = cands.shape[0]
    A, B = len(angles_deg), len(blurs)
    L = max(1, int(round(max_shift * C)))
    rq = torch.stack([_rotated(_blurred(q, s), angles_deg)[0] for s in blurs])  # [B, A, C, C]
    rm = _rotated(q, angles_deg)[1]  # [A, C, C]: the rotation's valid mask (blur-independent)
    n_sh = (2 * L + 1) ** 2

    def moved(x):  # [..., C, C] -> [..., n_sh, C*C]: x moved by every shift, zeros outside
        P = F.pad(x, (L, L, L, L))
        w = P.unfold(-2, C, 1).unfold(-2, C, 1)  # [..., i, j, C, C]: element = P[i + r, j + c]
        return w.reshape(*x.shape[:-2], n_sh, C * C)

    W = (moved(rm) > 0.999).to(torch.float32)  # [A, n_sh, C*C]
    Qm = moved(rq) * W  # [B, A, n_sh, C*C]
    n = W.sum(-1)  # [A, n_sh]
    sa, sa2 = Qm.sum(-1), Qm.square().sum(-1)  # [B, A, n_sh]
    cf = cands.reshape(K, C * C)
    sb = (W.reshape(-1, C * C) @ cf.T).view(A, n_sh, K)
    sb2 = (W.reshape(-1, C * C) @ cf.square().T).view(A, n_sh, K)
    sab = (Qm.reshape(-1, C * C) @ cf.T).view(B, A, n_sh, K)
    nn = n.clamp(min=1.0)[..., None]
    num = sab - sa[..., None] * (sb / nn)
    va = (sa2 - sa.square() / n.clamp(min=1.0))[..., None].clamp(min=0.0)
    vb = (sb2 - sb.square() / nn).clamp(min=0.0)
    ncc = num / (va * vb).sqrt().clamp(min=1e-12)  # [B, A, n_sh, K]
    ncc = torch.where((n >= MIN_OVERLAP * C * C)[None, ..., None], ncc, torch.full_like(ncc, -1.0))
    best, flat = ncc.reshape(-1, K).max(0)  # first maximum: blur, then angle, then shift order
    b, rest = flat // (A * n_sh), flat % (A * n_sh)
    a, sh = rest // n_sh, rest % n_sh
    i, j = sh // (2 * L + 1), sh % (2 * L + 1)
    dy, dx = (L - i).to(torch.float32), (L - j).to(torch.float32)
    ang = torch.as_tensor(np.asarray(angles_deg), dtype=torch.float32)[a]
    return best, n[a, sh], b, ang, torch.stack([dx, dy], 1)


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
DEFAULT_REFINE_TOP = 8  # cascade: ECC (and the fine grid) only for each query's best coarse candidates
# attribution (register_candidates): a candidate that registers better to another query is capped at
# this query's own best only when its score exceeds that by less than this (score units: a residual
# ratio of e^0.5 = 1.65), i.e. when both are copy-level fits of near-duplicates; a foreign copy far
# above anything of the query's own keeps its score (a member whose only copy is of its neighbouring
# slice, a member too, is still found).  0.5 on the seed-0 copies data of both generators (README):
# 1.0 made the DDPM attack's AUC drop by 0.003-0.007, 0.5 did not; the DCGAN pair level met 95% with both
ATTRIBUTE_MARGIN = 0.5
DEFAULT_COARSE_SIZE = 32  # coarse grid of larger artifacts (area-pooled to it): the exhaustive search's cost grows ~S^4
DEFAULT_COARSE_BLURS = (0.8,)  # the coarse stage only shortlists: one mid blur; the blur search is at refinement


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


def _theta_of(m_q2c: np.ndarray, size: int):
    """query -> candidate pixel maps float64 [R, 2, 3] -> affine_grid thetas [R, 2, 3] (align_corners
    False) that sample the query at each candidate pixel: what cv2.warpAffine(q, m) computes."""
    import torch

    R = m_q2c.shape[0]
    full = np.zeros((R, 3, 3))
    full[:, :2] = m_q2c
    full[:, 2, 2] = 1.0
    inv = np.linalg.inv(full)  # candidate pixel -> query pixel
    # normalised u = (2x + 1) / S - 1  <=>  x = ((u + 1) S - 1) / 2
    n2p = np.array([[size / 2.0, 0, (size - 1) / 2.0], [0, size / 2.0, (size - 1) / 2.0], [0, 0, 1]])
    p2n = np.linalg.inv(n2p)
    th = p2n @ inv @ n2p
    return torch.as_tensor(th[:, :2], dtype=torch.float32)


def _pose_scores(qstack, cands, m_q2c: np.ndarray):
    """Score R poses for B query blurs at once.

    qstack float32 [B, 2, S, S] (the query and its square, each smoothed by one sigma), cands [R, S, S],
    m_q2c float64 [R, 2, 3] query -> candidate pixels.  Returns float64 numpy (ncc [R, B]: NCC of the
    moved smoothed query and the candidate; quad [R, B]: the multiple correlation of the candidate
    with the moved query and its square, i.e. the NCC under a quadratic contrast change), both over
    the pixels the moved query covers (-1 where that is under MIN_OVERLAP).  A replica is
    re-contrasted by a gamma: x^g is close to quadratic on [0, 1], and 1, q, q^2 span 1, x, x^2 for
    the normalised q = (x - m) / s."""
    import torch
    import torch.nn.functional as F

    B, _, S, _ = qstack.shape
    R = cands.shape[0]
    src = torch.cat([qstack.reshape(1, 2 * B, S, S), torch.ones(1, 1, S, S)], 1).expand(R, 2 * B + 1, S, S)
    grid = F.affine_grid(_theta_of(m_q2c, S), [R, 1, S, S], align_corners=False)
    mv = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False).double()
    w = (mv[:, -1] > 0.999).double()  # [R, S, S]
    n = w.sum((-2, -1))  # [R]
    X = mv[:, :-1].view(R, B, 2, S, S)
    y = cands.double()
    nn = n.clamp(min=1.0)
    ym = (y * w).sum((-2, -1)) / nn
    yc = (y - ym[:, None, None]) * w  # [R, S, S]
    Xm = (X * w[:, None, None]).sum((-2, -1)) / nn[:, None, None]  # [R, B, 2]
    Xc = (X - Xm[..., None, None]) * w[:, None, None]
    G = torch.einsum("rbiuv,rbjuv->rbij", Xc, Xc)  # [R, B, 2, 2]
    v = torch.einsum("rbiuv,ruv->rbi", Xc, yc)  # [R, B, 2]
    yy = yc.square().sum((-2, -1))[:, None].clamp(min=1e-18)  # [R, 1]
    ncc = v[..., 0] / (G[..., 0, 0] * yy).sqrt().clamp(min=1e-18)
    G = G + 1e-12 * torch.eye(2, dtype=G.dtype)
    quad = (torch.linalg.solve(G, v.unsqueeze(-1)).squeeze(-1) * v).sum(-1) / yy
    quad = quad.clamp(0.0, 1.0).sqrt()
    bad = (n < MIN_OVERLAP * S * S)[:, None]
    return (torch.where(bad, -1.0, ncc).numpy(), torch.where(bad, -1.0, quad).numpy())


def fine_blurs(query_blurs, factor: int) -> tuple[float, ...]:
    """Query blurs (px) tried on the fine grid, ``factor`` = fine / coarse side: the coarse ones as
    they are and scaled to the fine grid (a blur of sigma coarse px is sigma * factor fine px), with 0."""
    if factor == 1:
        return tuple(float(b) for b in query_blurs)
    return tuple(sorted({0.0, *(float(b) for b in query_blurs), *(float(b) * factor for b in query_blurs)}))


def register_one(q, cands, angles_deg, *, qc=None, cc=None, refine: bool = True, refine_top: int | None = None,
                 iters: int = DEFAULT_ECC_ITERS, eps: float = DEFAULT_ECC_EPS, blur: int = DEFAULT_ECC_BLUR,
                 max_shift: float = DEFAULT_MAX_SHIFT, query_blurs=DEFAULT_QUERY_BLURS, coarse_blurs=None):
    """One query against K candidates: the cascade.

    q float32 [S, S], cands [K, S, S] (torch, zero-mean unit-norm: the artifact's grid); qc [C, C],
    cc [K, C, C] the same pooled to the coarse grid (None: C = S, no fine stage).  Coarse
    (:func:`_coarse`, all K): exhaustive blur x angle x shift NCC at C px.  Refinement (``refine``),
    for the ``refine_top`` best coarse candidates (None: all K): on the S px grid, the coarse pose
    scaled to it, the query blur chosen there (C = S: the coarse one; else the best pose NCC over
    :func:`fine_blurs`), then ECC from that pose (kept when it improves the NCC and stays in the
    searched range).  Returns (ncc float64 [K], overlap int64 [K] coarse-grid pixels, transforms
    float64 [K, 2, 3] query -> candidate pixels of the S px frame, refined bool [K])."""
    import torch

    S = q.shape[-1]
    fine = qc is not None and qc.shape[-1] != S
    qc, cc = (qc, cc) if fine else (q, cands)
    C = qc.shape[-1]
    f = S // C
    K = cands.shape[0]
    cb = tuple(query_blurs if coarse_blurs is None else coarse_blurs)
    ncc, ov, bi, ang, sh = _coarse(qc, cc, angles_deg, cb, max_shift)
    ncc = ncc.double().numpy()
    ov = ov.numpy().astype(np.int64)
    bi, ang, sh = bi.numpy(), ang.numpy(), sh.numpy() * f
    trans = np.stack([transform_matrix(ang[k], sh[k, 0], sh[k, 1], S) for k in range(K)]) if K else np.zeros((0, 2, 3))
    refined = np.zeros(K, bool)
    if not refine or K == 0:
        return ncc, ov, trans, refined
    R = K if refine_top is None else min(int(refine_top), K)
    top = np.argsort(-ncc, kind="stable")[:R]
    refined[top] = True
    max_angle = float(np.abs(angles_deg).max()) if len(angles_deg) else 0.0
    blurs = fine_blurs(query_blurs, f)
    qstack = _query_stack(q, blurs)  # [B, 2, S, S]
    ct = cands[torch.as_tensor(top)]
    # the blur ECC works with: the best at the coarse pose (C = S: the coarse stage's own choice)
    lin, _ = _pose_scores(qstack, ct, trans[top])
    pick = lin.argmax(1) if fine else np.array([blurs.index(float(cb[bi[k]])) if float(cb[bi[k]]) in blurs
                                                else int(lin[i].argmax()) for i, k in enumerate(top)])
    cn = cands.numpy().astype(np.float32)
    for i, k in enumerate(top):
        r = _ecc(np.ascontiguousarray(cn[k]), np.ascontiguousarray(qstack[pick[i], 0].numpy()), trans[k], iters, eps, blur)
        if r is not None and r[0] > lin[i, pick[i]] and _plausible(r[1], S, max_angle, max_shift):
            trans[k] = r[1]
    # the refined score: NCC under a quadratic contrast model, best over the blurs, at the pose (on
    # the S px grid and another model: the unrefined candidates' coarse NCC is on another scale)
    _, quad = _pose_scores(qstack, ct, trans[top])
    ncc[top] = quad.max(1)
    if R < K:  # unrefined candidates rank below the refined ones (their coarse NCC, capped)
        rest = ~refined
        ncc[rest] = np.minimum(ncc[rest], ncc[top].min())
    return ncc, ov, trans, refined


def _query_stack(q, blurs):
    """q float32 [S, S] -> [B, 2, S, S]: per sigma of ``blurs`` (px), the smoothed query (renormalised,
    as :func:`_blurred`) and its smoothed square (the quadratic contrast term)."""
    import cv2
    import torch

    qn = np.ascontiguousarray(q.numpy(), dtype=np.float32)
    out = []
    for s in blurs:
        q2 = qn * qn
        if s > 0:
            q2 = cv2.GaussianBlur(q2, (0, 0), float(s), borderType=cv2.BORDER_REPLICATE)
        out.append(np.stack([_blurred(q, s).numpy(), q2]))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out), dtype=np.float32))


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


def coarse_size_for(size: int, coarse_size: int | None = None) -> int:
    """The coarse grid (px) for an artifact of ``size`` px grids: ``coarse_size``, or by default the
    grid itself up to DEFAULT_COARSE_SIZE, above it the largest divisor of ``size`` that is at most
    DEFAULT_COARSE_SIZE (and at least half of it; else the grid itself: no cascade of grids).  It must
    divide ``size``: the coarse grid is the fine one area-pooled by an integer factor."""
    if coarse_size is None:
        c = size
        if size > DEFAULT_COARSE_SIZE:
            d = next((d for d in range(2, size + 1) if size % d == 0 and size // d <= DEFAULT_COARSE_SIZE), size)
            c = size // d if size // d >= DEFAULT_COARSE_SIZE // 2 else size
    else:
        c = coarse_size
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 4 or c > size or size % c:
        raise GanprintError(f"registration coarse grid {c!r} px: must be an integer >= 4 that divides the {size} px "
                            "grids (e.g. 16 or 32 for 64 px grids)")
    return int(c)


def pool_grids(images, size: int):
    """float32 [N, S, S] -> [N, size, size]: area pooling by S / size, then zero mean, unit norm
    (as ``embed --backbone pixels --image-size size`` of the same images, up to rounding)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images, dtype=torch.float32)
    if x.shape[-1] == size:
        return x
    x = F.avg_pool2d(x.unsqueeze(1), x.shape[-1] // size).squeeze(1)
    x = x - x.mean((-2, -1), keepdim=True)
    return x / x.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None]


def _check_options(refine_top, query_blurs, blur: int) -> None:
    if blur < 1 or blur % 2 == 0:
        raise GanprintError(f"ECC blur {blur}: must be an odd number of pixels >= 1")
    if refine_top is not None and (isinstance(refine_top, bool) or not isinstance(refine_top, (int, np.integer))
                                   or refine_top < 1):
        raise GanprintError(f"registration refine_top {refine_top!r}: must be an integer >= 1 (None: refine all)")
    if len(query_blurs) == 0 or any(not (math.isfinite(float(b)) and b >= 0) for b in query_blurs):
        raise GanprintError(f"registration query blurs {tuple(query_blurs)}: need at least one sigma, each >= 0 (0: none)")


def register_candidates(queries: GridSet, keys: GridSet, candidates, *, max_angle: float = DEFAULT_MAX_ANGLE,
                        angle_step: float = DEFAULT_ANGLE_STEP, refine: bool = True, blur: int = DEFAULT_ECC_BLUR,
                        query_blurs=DEFAULT_QUERY_BLURS, refine_top: int | None = DEFAULT_REFINE_TOP,
                        coarse_size: int | None = None, coarse_blurs=DEFAULT_COARSE_BLURS, attribute: bool = True,
                        threads: int | None = None,
                        on_query=None) -> dict:
    """Re-score each query's candidate list by registration (the cascade of :func:`register_one`).

    candidates int64 [Q, K] (indices into ``keys``; -1 = none); grids [N, S, S]; the coarse stage
    runs on them pooled to :func:`coarse_size_for` (S, coarse_size).  Returns numpy arrays:
    ``values`` float32 [Q, K] scores (:func:`score_of` the aligned NCC), descending; ``indices``
    int64 [Q, K] in that order (-1: padding); ``matches`` int32 [Q, K] overlap pixels of the coarse
    alignment (coarse grid); ``transform`` float32 [Q, 2, 3] query -> candidate pixels (S x S frame)
    of each best pair; ``refined`` bool [Q, K] whether the pair reached the refinement stage.
    ``attribute``: a candidate refined for several queries counts as a copy of the one it registers
    best to (:func:`_attribution`); in any other query's list it scores no higher than that query's
    own best candidate when it exceeds that by less than ATTRIBUTE_MARGIN (both copy-level fits), so
    a query's top-1 is its own copy where there is one; a foreign copy far above keeps its score.
    Queries run in ``threads`` threads (torch and OpenCV release the GIL)."""
    import torch

    if queries.images.shape[1:] != keys.images.shape[1:]:
        raise ArtifactError(f"{queries.source} and {keys.source}: image grids of different sizes "
                            f"({queries.images.shape[-1]} vs {keys.images.shape[-1]} px); embed both with the same --image-size")
    _check_options(refine_top, query_blurs, blur)
    if coarse_blurs is not None:
        _check_options(refine_top, coarse_blurs, blur)
    cand = np.asarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != len(queries):
        raise GanprintError(f"candidates must be [Q={len(queries)}, K], got {cand.shape}")
    S = int(queries.images.shape[-1])
    C = coarse_size_for(S, coarse_size)
    Q, K = cand.shape
    ang = angles_grid(max_angle, angle_step)
    qimg = torch.as_tensor(np.asarray(queries.images, dtype=np.float32))
    kimg = torch.as_tensor(np.asarray(keys.images, dtype=np.float32))
    values = np.zeros((Q, K), np.float32)
    indices = np.full((Q, K), -1, np.int64)
    matches = np.zeros((Q, K), np.int32)
    refined = np.zeros((Q, K), bool)
    transform = np.full((Q, 2, 3), np.nan, np.float32)
    used = np.unique(cand[cand >= 0])
    pos = np.full(len(keys), -1, np.int64)
    pos[used] = np.arange(len(used))
    fine = C != S
    qc = pool_grids(qimg, C) if fine else None
    kc = pool_grids(kimg[torch.as_tensor(used)], C) if fine and len(used) else None  # each candidate once

    raw: list = [None] * Q

    def one(q: int) -> None:
        cq = cand[q][cand[q] >= 0]
        if len(cq):
            ci = torch.as_tensor(cq)
            raw[q] = (cq, *register_one(qimg[q], kimg[ci], ang, qc=None if qc is None else qc[q],
                                        cc=None if kc is None else kc[torch.as_tensor(pos[cq])],
                                        refine=refine, refine_top=refine_top, blur=blur,
                                        query_blurs=tuple(query_blurs), coarse_blurs=coarse_blurs))
        if on_query is not None:
            on_query()

    map_queries(one, Q, threads)
    own = _attribution(raw, len(keys)) if attribute else [None] * Q
    for q, r in enumerate(raw):
        if r is None:
            continue
        cq, ncc, ov, tr, rf = r
        s = score_of(torch.as_tensor(ncc)).numpy()
        mine = np.ones(len(cq), bool) if own[q] is None else own[q]
        if own[q] is not None and mine.any():  # another query's copy ranks below this query's own best,
            top_own = s[mine].max()  # when that is a copy-level fit too (within ATTRIBUTE_MARGIN of it)
            s = np.where(mine | (s > top_own + ATTRIBUTE_MARGIN), s, np.minimum(s, top_own))
        m = len(cq)
        order = np.lexsort((np.arange(m), ~rf, ~mine, -s))  # score; ties: own, refined, shortlist order
        values[q, :m], indices[q, :m], matches[q, :m] = s[order], cq[order], ov[order]
        refined[q, :m] = rf[order]
        transform[q] = tr[order[0]]
    return {"values": values, "indices": indices, "matches": matches, "transform": transform, "refined": refined}


def _attribution(raw, n_keys: int) -> list:
    """Which refined pairs are their candidate's best: per query, bool [K_q] (None: no refined pair).

    A candidate refined for several queries (a copy of one slice is also close to its neighbouring
    slice, another query) belongs to the query it registers best to: the pair residuals of one
    candidate share that candidate's noise, so comparing them across queries isolates the content
    difference, which comparing candidates of one query (each with its own noise) cannot."""
    best = np.full(n_keys, -np.inf)
    for r in raw:
        if r is not None:
            cq, ncc, _, _, rf = r
            np.maximum.at(best, cq[rf], ncc[rf])
    return [None if r is None or not r[4].any() else (r[4] & (r[1] >= best[r[0]])) for r in raw]


def describe(size: int) -> dict:
    """The cascade's parameters for ``size`` px grids (the ``verify.registration`` provenance of a
    similarity artifact): what :func:`register_candidates` runs with its defaults."""
    c = coarse_size_for(size)
    return {"angles": [-DEFAULT_MAX_ANGLE, DEFAULT_MAX_ANGLE, DEFAULT_ANGLE_STEP],
            "shift": "exhaustive integer shifts (coarse grid)", "max_shift": DEFAULT_MAX_SHIFT,
            "min_overlap": MIN_OVERLAP, "coarse_size": c, "coarse_blurs": list(DEFAULT_COARSE_BLURS),
            "refine_top": DEFAULT_REFINE_TOP, "fine_size": int(size),
            "refine": "cv2.findTransformECC (euclidean)", "ecc_iters": DEFAULT_ECC_ITERS, "ecc_blur": DEFAULT_ECC_BLUR,
            "query_blurs": list(DEFAULT_QUERY_BLURS), "fine_query_blurs": list(fine_blurs(DEFAULT_QUERY_BLURS, size // c)),
            "contrast": "quadratic", "attribution_margin": ATTRIBUTE_MARGIN}


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
    """Call ``one(q)`` for q in range(n), on ``threads`` threads (default torch's count): parallel
    over queries, torch and OpenCV held at one thread each meanwhile (both release the GIL; one
    thread per query also keeps the BLAS sums, hence the results, independent of ``threads``),
    their thread counts restored afterwards."""
    import cv2
    import torch

    nthreads = threads or torch.get_num_threads()
    prev, prev_cv = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        if nthreads <= 1 or n <= 1:
            for q in range(n):
                one(q)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            list(pool.map(one, range(n)))
    finally:
        torch.set_num_threads(prev)
        cv2.setNumThreads(prev_cv)
