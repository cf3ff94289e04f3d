"""Near-duplicate groups of real images, derived from their similarity alone (no patient ids).

Real medical sets (ImageCLEF: CT slices) and ``ganprint synth`` hold several neighbouring slices of
one patient, and a patient is all member or all non-member.  Such slices are not independent
evidence: cross-validation that splits them leaks, and a rank test over images counts one patient
several times.  :func:`near_duplicate_groups` recovers them from the real x real cosine distance:

    i ~ j  iff  d(i, j) < ratio * median over images of the distance to the ``k``-th neighbour

in any of the given feature spaces, and groups are the connected components of "~".  Why this
rule: neighbouring slices sit an order of magnitude closer than typical neighbours (synth
generalize, pixels: sibling slice distance <= 0.006, nearest other patient >= 0.05, median
10th-neighbour distance 0.12), and the median k-th-neighbour distance is a scale of "typical
neighbours" that near-duplicates cannot shift (each image has far fewer than k of them).

Public API: ``near_duplicate_groups(embs, k=10, ratio=0.25) -> int64 [R]`` (group id per image,
0..G-1, numbered by first appearance).
"""

from __future__ import annotations

from typing import Any, Iterable


def near_duplicate_groups(embs: Iterable[Any], k: int = 10, ratio: float = 0.25, block: int = 2048):
    """embs: feature matrices [R, D_b] of the same R images (torch or numpy) -> int64 [R]."""
    import numpy as np
    import torch
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols, R = [], [], None
    for x in embs:
        x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(x, dtype=np.float32)), dim=1)
        R = len(x)
        if R < 2:
            continue
        kk = min(k, R - 1)
        kth, pairs = [], []
        for a in range(0, R, block):
            d = 1.0 - x[a:a + block] @ x.T  # [b, R] cosine distance
            idx = torch.arange(a, min(a + block, R))
            d[torch.arange(len(idx)), idx] = float("inf")
            kth.append(torch.kthvalue(d, kk, dim=1).values)
            pairs.append(d)
        scale = float(torch.cat(kth).median())
        thr = ratio * scale
        for a, d in zip(range(0, R, block), pairs):
            i, j = torch.nonzero(d < thr, as_tuple=True)
            rows.append((i + a).numpy())
            cols.append(j.numpy())
    if R is None:
        raise ValueError("near_duplicate_groups: no feature space given")
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(R, R))
    _, lab = connected_components(graph, directed=False)
    # renumber by first appearance so the ids do not depend on scipy's numbering
    _, first = np.unique(lab, return_index=True)
    order = np.argsort(np.argsort(first))
    return order[lab].astype(np.int64)
