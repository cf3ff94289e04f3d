"""Candidate scores for automatic selection, and known non-members scored the same way.

A *feature space* is one pair of similarity artifacts of the same backbone / weights / checkpoint:
the images to label (``test``) and labelled dev images (``dev``).  Every feature space of one
``predict --attack auto`` run must describe the same real images (checked by image id and, where
the embeddings are at hand, by content sha256); a dev artifact is paired with the test artifact of
the same feature space, whatever the order on the command line.

Candidates come from *candidate sources*, a registry (:data:`CANDIDATE_SOURCES`,
:func:`register_candidate_source`): a source is ``fn(space: FeatureSpace) -> list[CandidateScores]``
(ganprint.select).  The default source ``attacks`` turns every attack registered in
``ganprint.attacks.ATTACKS`` into one candidate per feature space, so a new attack (e.g. a copy
verification score) becomes a candidate without any change here or in ganprint.select.  An attack
that cannot run on an artifact (a tensor it needs is missing...) is skipped and reported.

Null scores (for conformal p-values, :func:`null_scores`) must be computed *exactly* like the
scores of the images tested, or the p-values are not valid.  The reliable way: put the known
non-members among the scored real images (``ganprint embed TEST DEV/real_not_used``): the rows of
subset ``real_not_used`` with label 0 are the null, scored in the same context as the test images
(same generated set, same reference = the other real images, same Monte Carlo radius), each one
left out of its own comparison; :func:`output_rows` then keeps them out of the predictions and the
submission.  On a labelled dev artifact the null is its non-members (leave-one-out).  With a
separate ``simmatrix --reference`` set, the reference images are scored against the same
generated set, but only for attacks that do not use the reference set: a reference image's own
reference set would contain its near-duplicates (neighbouring slices of one patient), a test
image's would not, and its null scores would be too low.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ganprint.errors import ArtifactError, GanprintError


@dataclass
class NullScores:
    """``scores`` float64 [K] of known non-members; ``self_index`` int64 [R]: the null row that is
    scored image r (left out of its comparison), -1 none; ``ids`` [K]; ``source`` reference | label0."""

    scores: Any
    self_index: Any
    ids: list[str]
    source: str

    def info(self) -> dict[str, Any]:
        import numpy as np

        return {"null": self.source, "n_null": int(len(self.scores)),
                "n_left_out": int((np.asarray(self.self_index) >= 0).sum())}


def reference_context(ctx):
    """An AttackContext whose *real* images are ``ctx``'s reference images, against the same
    generated set, with the reference set itself as reference (each image left out of its own)."""
    import numpy as np
    import torch

    from ganprint.attacks import AttackContext

    if "_refctx" in ctx._cache:
        return ctx._cache["_refctx"]
    gen, ref = ctx.embeddings("gen"), ctx.embeddings("ref")
    m = int(ref.shape[0])
    if m < 2:
        raise GanprintError(f"{ctx.source}: the reference set has {m} image(s); p-values need at least 2")
    rc = AttackContext.from_embeddings(gen, ref, ref=ref, metric=ctx.metric, k=ctx.k, ref_exclude=np.arange(m),
                                       full="matrix" in ctx.tensors)
    rc.tensors["realref_exclude"] = torch.arange(m)
    rc.source = f"{ctx.source} (reference images)"
    ctx._cache["_refctx"] = rc
    return rc


def _reference_ids(art) -> list[str]:
    from ganprint.artifacts import read_artifact

    info = art.provenance.get("reference") or {}
    ref = read_artifact(info["path"], kind="embeddings")
    rows = art.tensors["ref_rows"].numpy() if "ref_rows" in art.tensors else range(len(ref.table))
    return [str(ref.table["image_id"].iloc[int(r)]) for r in rows]


def _labels(table):
    import numpy as np

    if table is None or "label" not in table.columns:
        return None
    lab = table["label"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return lab if np.isfinite(lab).any() else None


def _null_mask(table):
    """bool [R]: known non-members among the real rows (label 0; subset real_not_used when the
    table has subsets), or None."""
    import numpy as np

    lab = _labels(table)
    if lab is None:
        return None
    zero = lab == 0
    if "subset" in table.columns:
        zero &= (table["subset"].astype("string").fillna("") == "real_not_used").to_numpy(dtype=bool)
    return zero if zero.sum() >= 2 else None


def output_rows(table):
    """int64 rows to predict: every row, except the known non-members added to a test artifact as
    the null (rows of subset real_not_used when other rows are not dev subsets)."""
    import numpy as np

    n = len(table)
    null = _null_mask(table)
    if null is None or "subset" not in table.columns:
        return np.arange(n)
    sub = table["subset"].astype("string").fillna("")
    dev_like = sub.isin(["real_used", "real_not_used"]).to_numpy(dtype=bool)
    if dev_like.all():
        return np.arange(n)  # a dev artifact: every image is predicted, its non-members are the null too
    return np.flatnonzero(~null)


def null_scores(art, ctx, attack: str, params: Mapping[str, Any] | None, scores) -> NullScores | None:
    """Known non-members of ``art`` scored like its real images (None when it has none)."""
    import numpy as np

    from ganprint.attacks import get_attack, run_attack

    mask = _null_mask(art.table)
    if mask is None and art.provenance.get("reference"):
        if get_attack(attack).uses_reference:
            raise GanprintError(f"{art.base}.safetensors: no p-values for '{attack}' against a separate --reference "
                                "set (its images' own reference sets would hold their near-duplicates); embed the "
                                "known non-members with the test images instead (ganprint embed TEST DEV/real_not_used)")
        rc = reference_context(ctx)
        ns = run_attack(attack, rc, params)
        return NullScores(ns, np.asarray(ctx.ref_exclude(), dtype=np.int64), _reference_ids(art), "reference")
    if mask is None:
        return None
    zero = np.flatnonzero(mask)
    self_index = np.full(len(mask), -1, dtype=np.int64)
    self_index[zero] = np.arange(len(zero))
    ids = [str(i) for i in art.table["image_id"].to_numpy()[zero]]
    return NullScores(np.asarray(scores, dtype=np.float64)[zero], self_index, ids, "label0")


# ---------------------------------------------------------------------------------------------
# feature spaces


@dataclass
class FeatureSpace:
    """One feature space: test and dev similarity artifacts (ganprint.artifacts.Artifact) and their
    attack contexts; ``test_ids`` / ``dev_ids``: real image ids in the run's common order, and
    ``test_order`` / ``dev_order``: this artifact's row of each of them."""

    name: str
    test: Any
    dev: Any
    test_order: Any
    dev_order: Any
    _ctx: dict[str, Any] = field(default_factory=dict)

    def context(self, which: str):
        from ganprint.attacks import AttackContext

        if which not in self._ctx:
            self._ctx[which] = AttackContext.from_artifact(self.test if which == "test" else self.dev)
        return self._ctx[which]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "test": str(self.test.base), "dev": str(self.dev.base),
                "backbone": self.test.provenance.get("backbone")}


def _space_key(prov: Mapping[str, Any]) -> str:
    import json

    from ganprint.similarity import comparable_key

    return json.dumps({**comparable_key(dict(prov)), "metric": prov.get("metric"), "verify": _verify_key(prov)},
                      sort_keys=True, default=str)


def _verify_key(prov: Mapping[str, Any]) -> dict[str, Any] | None:
    """What makes a ``simmatrix --verify`` artifact its own feature space: the method and its
    parameters (not its input paths, which differ between dev and test)."""
    v = prov.get("verify")
    if not isinstance(v, Mapping):
        return None
    return {k: v.get(k) for k in ("method", "local", "registration", "k_requested", "ratio", "reproj", "score")}


def _space_name(prov: Mapping[str, Any]) -> str:
    ck = prov.get("checkpoint")
    digest = ck.get("digest") if isinstance(ck, dict) else ck
    name = str(prov.get("backbone") or "features")
    if digest:
        name += f"+ckpt:{str(digest)[:8]}"
    if prov.get("metric") not in (None, "cosine"):
        name += f"[{prov.get('metric')}]"
    v = _verify_key(prov)
    if v:
        local = v.get("local") or {}
        name += f"+verify({v.get('method') or local.get('detector')}{local.get('size') or ''})"
    return name


def _real_content(art) -> dict[str, str] | None:
    """{image_id: sha256} of the artifact's real images, from its real embeddings (None if absent)."""
    from pathlib import Path

    from ganprint.artifacts import read_artifact

    info = art.provenance.get("real") or {}
    path = info.get("path")
    if not path or not Path(str(path) + ".safetensors").exists():
        return None
    emb = read_artifact(path, kind="embeddings")
    if emb.table is None or "sha256" not in emb.table.columns or "emb_row" not in art.table.columns:
        return None
    sha = emb.table["sha256"].astype(str).to_numpy()
    return {str(i): str(sha[int(r)]) for i, r in zip(art.table["image_id"], art.table["emb_row"])}


def check_same_reals(arts: Sequence[Any], role: str) -> list[str]:
    """The common real image ids (first artifact's order); one-line ArtifactError naming both
    files when two artifacts describe different real images."""
    first = arts[0]
    ids = [str(i) for i in first.table["image_id"]]
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{first.base}.safetensors: real image ids repeat; re-run simmatrix on uniquely named images")
    content0 = _real_content(first)
    for art in arts[1:]:
        other = [str(i) for i in art.table["image_id"]]
        a, b = set(ids), set(other)
        if a != b:
            only = sorted(a - b)[:1] or sorted(b - a)[:1]
            raise ArtifactError(f"{first.base}.safetensors and {art.base}.safetensors: {role} similarity artifacts of "
                                f"different real images ({len(a ^ b)} differ, e.g. {only[0]}); pass one artifact per "
                                "feature space, all of the same real images")
        content = _real_content(art)
        if content0 is not None and content is not None:
            bad = [i for i in ids if content0.get(i) != content.get(i)]
            if bad:
                raise ArtifactError(f"{first.base}.safetensors and {art.base}.safetensors: real image {bad[0]} has "
                                    f"different content in the two ({len(bad)} differ); embed the same files for "
                                    "every feature space")
    return ids


def check_no_label_leak(art) -> None:
    """Refuse a labelled artifact whose own known non-members are its --reference set: reference-
    based attacks would then see the labels (a non-member's near-duplicates, e.g. neighbouring
    slices, are in its reference set, a member's are not: dev kappa 1.0 that means nothing)."""
    import numpy as np

    if not art.provenance.get("reference") or "realref_exclude" not in art.tensors:
        return
    inside = np.asarray(art.tensors["realref_exclude"]) >= 0
    lab = _labels(art.table)
    if lab is not None and inside.any() and np.isfinite(lab[inside]).any():
        raise ArtifactError(f"{art.base}.safetensors: its labelled real images are in its own --reference set, so "
                            "reference-based attacks see the labels; run simmatrix on labelled data without "
                            "--reference (the other real images are the reference)")


def check_dev_pair(test_prov: Mapping[str, Any], dev_prov: Mapping[str, Any], test_name: str, dev_name: str) -> None:
    """Refuse a dev similarity artifact of another feature space or metric than the test one."""
    from ganprint.similarity import check_comparable

    check_comparable(dict(test_prov.get("generated") or test_prov), test_name,
                     dict(dev_prov.get("generated") or dev_prov), dev_name)
    if test_prov.get("metric") != dev_prov.get("metric"):
        raise ArtifactError(f"{test_name} and {dev_name}: metrics differ ({test_prov.get('metric')} vs "
                            f"{dev_prov.get('metric')}); run simmatrix with the same --metric")


def load_spaces(test_sims: Sequence[Any], dev_sims: Sequence[Any]) -> tuple[list[FeatureSpace], list[str], list[str]]:
    """Pair test and dev similarity artifacts (paths or Artifacts) by feature space.

    Returns (spaces, test_ids, dev_ids).  Refuses: a non-similarity artifact, two artifacts of the
    same feature space, a test space without its dev artifact (or the reverse), artifacts whose
    real images differ, dev and test of one space whose generated-side features differ."""
    import numpy as np

    from ganprint.artifacts import Artifact, read_artifact

    def load(x):
        return x if isinstance(x, Artifact) else read_artifact(x, kind="similarity")

    tests = [load(s) for s in test_sims]
    devs = [load(s) for s in dev_sims]
    if not tests:
        raise GanprintError("no similarity artifact given; pass one per feature space")
    if not devs:
        raise GanprintError("--attack auto needs labelled dev data: pass --calibrate DEV_SIM once per feature space")
    for role, arts in (("test", tests), ("dev", devs)):
        seen: dict[str, Any] = {}
        for art in arts:
            key = _space_key(art.provenance)
            if key in seen:
                raise ArtifactError(f"{seen[key].base}.safetensors and {art.base}.safetensors: the same feature space "
                                    f"({_space_name(art.provenance)}) twice among the {role} artifacts; pass each once")
            seen[key] = art
    for d in devs:
        check_no_label_leak(d)
    test_ids = check_same_reals(tests, "test")
    dev_ids = check_same_reals(devs, "dev")
    by_key = {_space_key(d.provenance): d for d in devs}
    spaces, names = [], []
    for t in tests:
        key = _space_key(t.provenance)
        d = by_key.pop(key, None)
        if d is None:
            raise ArtifactError(f"{t.base}.safetensors: no --calibrate artifact of its feature space "
                                f"({_space_name(t.provenance)}); pass the dev similarity of every feature space")
        check_dev_pair(t.provenance, d.provenance, f"{t.base}.safetensors", f"{d.base}.safetensors")
        name = _space_name(t.provenance)
        if name in names:
            name = f"{name}#{len(names) + 1}"
        names.append(name)
        pos_t = {str(i): n for n, i in enumerate(t.table["image_id"])}
        pos_d = {str(i): n for n, i in enumerate(d.table["image_id"])}
        spaces.append(FeatureSpace(name, t, d, np.asarray([pos_t[i] for i in test_ids]),
                                   np.asarray([pos_d[i] for i in dev_ids])))
    if by_key:
        extra = next(iter(by_key.values()))
        raise ArtifactError(f"{extra.base}.safetensors: a --calibrate artifact with no test artifact of its feature "
                            f"space ({_space_name(extra.provenance)}); pass both or neither")
    return spaces, test_ids, dev_ids


# ---------------------------------------------------------------------------------------------
# sources


CandidateSource = Callable[[FeatureSpace], list]
CANDIDATE_SOURCES: dict[str, CandidateSource] = {}


def register_candidate_source(name: str, fn: CandidateSource, *, replace: bool = False) -> None:
    """Add a candidate source ``fn(space) -> list[CandidateScores]`` (dev/test aligned to the
    space's ``dev_order`` / ``test_order``); it must record skipped candidates itself."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"candidate source name {name!r}: use letters, digits and _")
    if name in CANDIDATE_SOURCES and not replace:
        raise ValueError(f"candidate source {name!r} is already registered")
    if not callable(fn):
        raise TypeError(f"candidate source {name!r}: not callable")
    CANDIDATE_SOURCES[name] = fn


def attack_candidates(space: FeatureSpace, attacks: Sequence[str] | None = None, skipped: list | None = None) -> list:
    """One candidate per registered attack (default parameters) on ``space``; null scores when the
    test artifact has known non-members."""
    from ganprint.attacks import attack_names, resolved_params, run_attack
    from ganprint.select import CandidateScores

    out = []
    for attack in attacks or attack_names():
        name = f"{space.name}/{attack}"
        try:
            params = resolved_params(attack)
            ts = run_attack(attack, space.context("test"), params)
            ds = run_attack(attack, space.context("dev"), params)
        except GanprintError as exc:
            if skipped is not None:
                skipped.append({"candidate": name, "reason": str(exc)})
            continue
        null = None
        try:
            null = null_scores(space.test, space.context("test"), attack, params, ts)
        except GanprintError as exc:
            if skipped is not None:
                skipped.append({"candidate": name, "reason": f"no p-values: {exc}"})
        if null is not None:
            # self_index is per test row: reorder it like the test scores
            null = NullScores(null.scores, null.self_index[space.test_order], null.ids, null.source)
        out.append(CandidateScores(name, ds[space.dev_order], ts[space.test_order], null,
                                   info={"space": space.name, "attack": attack, "params": params,
                                         "test": str(space.test.base), "dev": str(space.dev.base)}))
    return out


register_candidate_source("attacks", lambda space: attack_candidates(space))


def collect(spaces: Sequence[FeatureSpace], *, attacks: Sequence[str] | None = None,
            sources: Sequence[str] | None = None) -> tuple[list, list[dict[str, Any]]]:
    """Every candidate of every space from the chosen sources (default: all registered);
    ``attacks`` restricts the ``attacks`` source.  Returns (candidates, skipped)."""
    skipped: list[dict[str, Any]] = []
    names = list(sources) if sources else list(CANDIDATE_SOURCES)
    unknown = [n for n in names if n not in CANDIDATE_SOURCES]
    if unknown:
        raise GanprintError(f"candidate source '{unknown[0]}': unknown; choose from {', '.join(CANDIDATE_SOURCES)}")
    cands = []
    for space in spaces:
        for src in names:
            if src == "attacks":
                cands += attack_candidates(space, attacks, skipped)
            else:
                cands += CANDIDATE_SOURCES[src](space)
    if not cands:
        reasons = "; ".join(s["reason"] for s in skipped[:2])
        raise GanprintError(f"no candidate score could be computed ({reasons})")
    return cands, skipped
