"""Positive pools: for each generated image, the real training images that may be its source.

Pool of generated image g = the real_used images with similarity >= ``threshold``, topped up to
``min_pos`` by similarity rank when fewer pass (and capped to the ``max_pool`` most similar when
``max_pool`` > 0).  Written against plain tensors:

- :func:`build_pools` from per-row candidates sorted by decreasing similarity
  (``values`` [G, k], ``indices`` [G, k] into the real set, ``valid`` [G, k] bool);
- :func:`pools_from_matrix` from a full similarity matrix [G, R];
- :func:`cosine_matrix` for features [G, D] x [R, D];
- :func:`pools_from_similarity_artifact`: the adapter that reads a ``similarity`` artifact
  (tensors ``gen_topk_values/indices`` [G, k'], ``gen_rows``, ``real_rows``, optional ``matrix``)
  and maps its rows onto this run's images by content hash.

A pool is a LongTensor of indices into the real_used list, most similar first.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ganprint.errors import GanprintError


def build_pools(values: torch.Tensor, indices: torch.Tensor, threshold: float, min_pos: int,
                max_pool: int = 0, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``values``/``indices`` [G, k] sorted by decreasing similarity per row -> G pools.

    Entries with ``valid`` False (e.g. real images that are not in real_used, or padding) are
    skipped before thresholding and top-up."""
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [G, k]")
    if valid is None:
        valid = torch.ones_like(indices, dtype=torch.bool)
    pools = []
    for v, i, ok in zip(values, indices, valid):
        v, i = v[ok], i[ok]
        order = torch.argsort(v, descending=True, stable=True)  # do not trust the caller's order
        v, i = v[order], i[order]
        n = max(int((v >= threshold).sum()), min(min_pos, int(i.numel())))
        if max_pool > 0:
            n = min(n, max_pool)
        pools.append(i[:n].clone().long())
    return pools


def pools_from_matrix(matrix: torch.Tensor, threshold: float, min_pos: int, max_pool: int = 0,
                      real_valid: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Full similarity ``matrix`` [G, R] -> G pools of column indices (``real_valid`` [R] bool)."""
    values, indices = torch.sort(matrix.float(), dim=1, descending=True, stable=True)
    valid = None if real_valid is None else real_valid[indices]
    return build_pools(values, indices, threshold, min_pos, max_pool, valid)


def cosine_matrix(gen: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [G, R] of feature rows."""
    g = torch.nn.functional.normalize(gen.float(), dim=1)
    r = torch.nn.functional.normalize(real.float(), dim=1)
    return g @ r.t()


def pool_summary(pools: Sequence[torch.Tensor]) -> dict[str, Any]:
    sizes = torch.tensor([len(p) for p in pools], dtype=torch.float32)
    if not len(pools):
        return {"anchors": 0}
    return {"anchors": len(pools), "empty": int((sizes == 0).sum()), "mean": round(float(sizes.mean()), 3),
            "min": int(sizes.min()), "max": int(sizes.max())}


def sample_positives(pools: Sequence[torch.Tensor], anchors: torch.Tensor, n: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``n`` distinct pool members per anchor -> (idx [B, n] long, valid [B, n] bool).

    Pools smaller than ``n`` give all their members; missing slots are padding (index 0,
    valid False)."""
    b = anchors.numel()
    idx = torch.zeros(b, n, dtype=torch.long)
    ok = torch.zeros(b, n, dtype=torch.bool)
    for row, a in enumerate(anchors.tolist()):
        pool = pools[a]
        m = int(pool.numel())
        if m == 0 or n == 0:
            continue
        pick = pool if m <= n else pool[torch.randperm(m, generator=generator)[:n]]
        idx[row, : pick.numel()] = pick
        ok[row, : pick.numel()] = True
    return idx, ok


def sample_negatives(n_pool: int, b: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct indices in [0, n_pool) per anchor (with repeats only when n > n_pool) -> [b, n]."""
    if n_pool == 0 or n == 0:
        return torch.zeros(b, 0, dtype=torch.long)
    if n <= n_pool:
        return torch.argsort(torch.rand(b, n_pool, generator=generator), dim=1)[:, :n]
    return torch.randint(n_pool, (b, n), generator=generator)


# ---------------------------------------------------------------------------------------------
# adapter for similarity artifacts (written by ganprint.similarity / `ganprint simmatrix`)


def _source_path(side: Any) -> str | None:
    if isinstance(side, str):
        return side
    if isinstance(side, dict):
        for key in ("artifact", "path", "base"):
            if side.get(key):
                return str(side[key])
    return None


def _manifest_hashes(path: str, sim_path: str, side: str) -> list[str]:
    from ganprint.artifacts import read_artifact

    try:
        art = read_artifact(path, kind="embeddings")
    except GanprintError as exc:
        raise GanprintError(f"{sim_path}: its {side} embeddings {path} cannot be read ({exc}); "
                            "re-run simmatrix, or omit --similarity to compute the pools here") from None
    if art.table is None or "sha256" not in art.table:
        raise GanprintError(f"{path}: manifest has no sha256 column; re-run embed")
    return [str(h) for h in art.table["sha256"].tolist()]


def pools_from_similarity_artifact(path: str, gen_hashes: Sequence[str], real_used_hashes: Sequence[str],
                                   threshold: float, min_pos: int, max_pool: int = 0
                                   ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Pools for this run's generated images (by position in ``gen_hashes``) over its real_used
    images (positions in ``real_used_hashes``), read from a similarity artifact.

    Rows are matched by image content (sha256 in the embeddings manifests), so the artifact may
    have been computed on a copy of the data or on a superset (real_not_used columns are
    ignored).  Returns (pools, info)."""
    from ganprint.artifacts import read_artifact

    art = read_artifact(path, kind="similarity", with_table=False)
    prov = art.provenance
    metric = prov.get("metric", "cosine")
    if metric != "cosine":
        raise GanprintError(f"{path}: similarity metric is '{metric}' but sim_threshold is a cosine similarity; "
                            "recompute it with --metric cosine or omit --similarity")
    gsrc, rsrc = _source_path(prov.get("generated")), _source_path(prov.get("real"))
    if not gsrc or not rsrc:
        raise GanprintError(f"{path}: provenance does not name its embeddings artifacts; re-run simmatrix")
    gman = _manifest_hashes(gsrc, path, "generated")
    rman = gman if rsrc == gsrc else _manifest_hashes(rsrc, path, "real")
    gen_rows = art.tensor("gen_rows").long()
    real_rows = art.tensor("real_rows").long()

    gpos = {h: i for i, h in reversed(list(enumerate(gen_hashes)))}
    rpos = {h: i for i, h in reversed(list(enumerate(real_used_hashes)))}
    g_map = torch.tensor([gpos.get(gman[r], -1) for r in gen_rows.tolist()], dtype=torch.long)  # sim row -> ours
    r_map = torch.tensor([rpos.get(rman[r], -1) for r in real_rows.tolist()], dtype=torch.long)  # sim col -> ours
    if int((g_map >= 0).sum()) == 0 or int((r_map >= 0).sum()) == 0:
        raise GanprintError(f"{path}: computed on other images than the training data (no generated or real_used "
                            "image matches by content); recompute simmatrix on this dataset or omit --similarity")

    if "matrix" in art.tensors:
        values, cols = torch.sort(art.tensor("matrix").float(), dim=1, descending=True, stable=True)
    else:
        values, cols = art.tensor("gen_topk_values").float(), art.tensor("gen_topk_indices").long()
    ok = cols >= 0
    mapped = torch.where(ok, r_map[cols.clamp(min=0)], torch.full_like(cols, -1))
    sim_pools = build_pools(values, mapped, threshold, min_pos, max_pool, valid=mapped >= 0)

    pools: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in gen_hashes]
    for srow, ours in enumerate(g_map.tolist()):
        if ours >= 0 and pools[ours].numel() == 0:
            pools[ours] = sim_pools[srow]
    info = {"source": str(art.base), "stored": "matrix" if "matrix" in art.tensors else f"top-{values.shape[1]}",
            "unmatched_generated": int(sum(1 for p in pools if p.numel() == 0)),
            "pair_id": prov.get("pair_id")}
    return pools, info
