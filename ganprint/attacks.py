"""Membership-inference attacks: per-real-image scores, HIGHER = more likely a training member.

Every attack is a function ``fn(ctx: AttackContext, **params) -> float64 [R]`` registered with
:func:`register_attack`; the CLI and the benchmark look attacks up by name in :data:`ATTACKS`.
The context holds a similarity artifact's tensors and loads the embeddings themselves only when
an attack asks for them (DOMIAS always; Monte Carlo only for rows whose top-k is not enough).

Distances come from the similarity metric: cosine d = 1 - s, L2 d = -s (the artifact stores
negative distances), so "nearest" is always "largest similarity".

Registered attacks (see :data:`ATTACKS` for parameters):

- ``max_sim``        max_g s(x, g)  (the seed's rule);
- ``topk_mean``      mean of the k largest s(x, g);
- ``monte_carlo``    Hilprecht et al. 2019: fraction of generated g with d(x, g) <= eps,
                     eps = median over the real images of their nearest-generated distance;
- ``gan_leaks``      Chen et al. 2020: -min_g d(x, g);
- ``gan_leaks_cal``  calibrated: -(min_g d(x, g) - min_r d(x, r)), r over the reference set
                     (known non-members, or the other real images);
- ``domias``         van Breugel et al. 2023: log p_gen(x) - log p_ref(x), Gaussian KDEs
                     (scipy's Scott bandwidth) after a PCA fitted on generated + reference;
- ``dist_ratio``     Carlini et al. 2023: -d(x, nearest g) / mean of d(x, its n nearest reals).
- ``verify_max``     geometric verification (``simmatrix --verify``, ganprint.verify): the most
                     RANSAC inliers of x against any of its shortlisted generated images;
- ``verify_cal``     calibrated: log(1 + inliers vs generated) - log(1 + inliers vs reference).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ganprint.errors import ArtifactError, GanprintError

# ---------------------------------------------------------------------------------------------
# context


class AttackContext:
    """What an attack may read: the similarity tensors and, lazily, the embeddings.

    ``tensors`` follow docs/ARTIFACTS.md (``real_topk_values`` [R, k] ... ``matrix`` [G, R]);
    ``loaders`` maps ``gen`` / ``real`` / ``ref`` to zero-argument callables returning float32
    embeddings [G, D] / [R, D] / [M, D] (``ref`` absent: the reference set is the real set).
    """

    def __init__(
        self,
        tensors: Mapping[str, Any],
        metric: str = "cosine",
        loaders: Mapping[str, Callable[[], Any]] | None = None,
        provenance: Mapping[str, Any] | None = None,
        table: Any = None,
        source: str = "<memory>",
    ) -> None:
        if metric not in ("cosine", "l2"):
            raise GanprintError(f"{source}: unknown similarity metric '{metric}'")
        self.tensors = dict(tensors)
        self.metric = metric
        self.provenance = dict(provenance or {})
        self.table = table
        self.source = source
        self._loaders = dict(loaders or {})
        self._cache: dict[str, Any] = {}
        for name in ("real_topk_values", "real_topk_indices"):
            if name not in self.tensors:
                raise ArtifactError(f"{source}: no tensor '{name}'; pass the output of `ganprint simmatrix`")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_artifact(cls, art) -> "AttackContext":
        """A similarity :class:`~ganprint.artifacts.Artifact`; embeddings load from the paths in
        its provenance (refused if those artifacts changed since)."""
        prov = art.provenance
        if prov.get("kind") != "similarity":
            raise ArtifactError(f"{art.base}.safetensors: is a '{prov.get('kind')}' artifact, expected "
                                "'similarity'; pass the output of `ganprint simmatrix`")
        src = f"{art.base}.safetensors"
        loaders: dict[str, Callable[[], Any]] = {
            "gen": lambda: _load_rows(prov.get("generated"), art.tensors["gen_rows"], src, "generated"),
            "real": lambda: _load_rows(prov.get("real"), art.tensors["real_rows"], src, "real"),
        }
        if prov.get("reference"):
            loaders["ref"] = lambda: _load_rows(prov["reference"], art.tensors["ref_rows"], src, "reference")
        return cls(art.tensors, prov.get("metric", "cosine"), loaders, prov, art.table, src)

    @classmethod
    def from_embeddings(cls, gen, real, ref=None, *, metric: str = "cosine", k: int = 10, **kwargs) -> "AttackContext":
        """Compute the similarity in memory (gen [G, D], real [R, D], ref [M, D] or None)."""
        import torch

        from ganprint.similarity import compute_similarity

        gen, real = torch.as_tensor(gen).float(), torch.as_tensor(real).float()
        ref_t = None if ref is None else torch.as_tensor(ref).float()
        tensors = compute_similarity(gen, real, ref=ref_t, metric=metric, k=k, **kwargs)
        loaders = {"gen": lambda: gen, "real": lambda: real}
        if ref_t is not None:
            loaders["ref"] = lambda: ref_t
        return cls(tensors, metric, loaders, {"metric": metric, "k": int(tensors["real_topk_values"].shape[1])})

    # -- views ----------------------------------------------------------------------------------

    @property
    def n_real(self) -> int:
        return int(self.tensors["real_topk_values"].shape[0])

    @property
    def n_gen(self) -> int:
        if "gen_topk_values" in self.tensors:
            return int(self.tensors["gen_topk_values"].shape[0])
        if "matrix" in self.tensors:
            return int(self.tensors["matrix"].shape[0])
        return int(self.embeddings("gen").shape[0])

    @property
    def n_ref(self) -> int:
        """Size of the reference set (the real set without a separate one)."""
        if "ref_rows" in self.tensors:
            return int(self.tensors["ref_rows"].shape[0])
        return int(self.embeddings("ref").shape[0]) if self.has_reference else self.n_real

    @property
    def k(self) -> int:
        return int(self.tensors["real_topk_values"].shape[1])

    @property
    def has_reference(self) -> bool:
        """True when a separate reference set (known non-members) was given to simmatrix."""
        return "ref" in self._loaders

    def array(self, name: str):
        """A tensor as float64 / int64 numpy."""
        import numpy as np

        if name not in self.tensors:
            raise ArtifactError(f"{self.source}: no tensor '{name}'; re-run `ganprint simmatrix` (it stores it by default)")
        t = self.tensors[name]
        a = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
        return a.astype(np.float64) if a.dtype.kind == "f" else a.astype(np.int64)

    def real_topk(self):
        """(values float64 [R, k] descending, indices int64 [R, k] into the generated set)."""
        return self.array("real_topk_values"), self.array("real_topk_indices")

    def realref_topk(self):
        """(values [R, k''], indices): nearest reference (or other real) images of each real image."""
        if "realref_topk_values" not in self.tensors:
            raise ArtifactError(f"{self.source}: no real x reference top-k; re-run `ganprint simmatrix` without "
                                "--no-realref (and with at least two real images)")
        return self.array("realref_topk_values"), self.array("realref_topk_indices")

    def matrix(self):
        """float64 [G, R] when the full matrix was stored, else None."""
        return self.array("matrix") if "matrix" in self.tensors else None

    def distance(self, sim):
        """Similarity -> distance for this metric (cosine: 1 - s; l2: -s)."""
        import numpy as np

        sim = np.asarray(sim, dtype=np.float64)
        # float32 rounding can push a duplicate's cosine past 1: distances stay >= 0
        return np.maximum(1.0 - sim if self.metric == "cosine" else -sim, 0.0)

    def embeddings(self, which: str):
        """float32 [N, D] embeddings of ``gen``, ``real`` or ``ref`` (= ``real`` without a reference)."""
        if which == "ref" and "ref" not in self._loaders:
            which = "real"
        if which not in self._cache:
            if which not in self._loaders:
                raise GanprintError(f"{self.source}: the {which} embeddings are not available to this attack")
            self._cache[which] = self._loaders[which]()
        return self._cache[which]

    def ref_exclude(self):
        """int64 [R]: the reference row that is the same image as real row r, or -1 (none).

        Without a separate reference set the reference *is* the real set: r excludes itself."""
        import numpy as np

        if not self.has_reference:
            return np.arange(self.n_real)
        if "realref_exclude" in self.tensors:
            return self.array("realref_exclude")
        return np.full(self.n_real, -1, dtype=np.int64)


def _load_rows(info: Mapping[str, Any] | None, rows, src: str, role: str):
    from ganprint.artifacts import read_artifact

    if not info or not info.get("path"):
        raise ArtifactError(f"{src}: does not record where its {role} embeddings are; re-run `ganprint simmatrix`")
    path = info["path"]
    if not Path(path + ".safetensors").exists():
        raise ArtifactError(f"{path}.safetensors: {role} embeddings (needed by this attack) not found; "
                            "keep the embeddings artifacts that simmatrix read, or re-run it")
    art = read_artifact(path, kind="embeddings", with_table=False)
    if art.provenance.get("pair_id") != info.get("pair_id"):
        raise ArtifactError(f"{path}.safetensors: changed since {src} was computed; re-run `ganprint simmatrix`")
    return art.tensor("embeddings")[rows]


# ---------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class AttackSpec:
    """An attack: ``fn(ctx, **params) -> float64 [R]``; ``params`` are the defaults (JSON scalars)."""

    name: str
    fn: Callable[..., Any]
    description: str
    params: Mapping[str, Any] = field(default_factory=dict)
    citation: str = ""
    needs_embeddings: bool = False
    uses_reference: bool = False
    requires: tuple[str, ...] = ()  # similarity tensors beyond the default ones (e.g. verify_*)


ATTACKS: dict[str, AttackSpec] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register_attack(spec: AttackSpec, *, replace: bool = False) -> AttackSpec:
    """Add ``spec`` to :data:`ATTACKS` after checking its name, function and parameters."""
    if not isinstance(spec, AttackSpec):
        raise TypeError("register_attack takes an AttackSpec")
    if not _NAME_RE.match(spec.name):
        raise ValueError(f"attack name {spec.name!r}: use lower-case letters, digits and _")
    if spec.name in ATTACKS and not replace:
        raise ValueError(f"attack {spec.name!r} is already registered")
    if not callable(spec.fn):
        raise TypeError(f"attack {spec.name!r}: fn is not callable")
    sig = inspect.signature(spec.fn)
    names = list(sig.parameters)
    if not names:
        raise TypeError(f"attack {spec.name!r}: fn must take the context as first argument")
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for key, val in spec.params.items():
        if not isinstance(val, (bool, int, float, str)):
            raise TypeError(f"attack {spec.name!r}: default of {key!r} must be a bool, int, float or str")
        if key not in names[1:] and not takes_kwargs:
            raise TypeError(f"attack {spec.name!r}: fn does not accept parameter {key!r}")
    ATTACKS[spec.name] = spec
    return spec


def attack_names(available=None) -> list[str]:
    """All attack names; with ``available`` (tensor names of a similarity artifact) only those
    whose ``requires`` it has."""
    if available is None:
        return list(ATTACKS)
    have = set(available)
    return [n for n, s in ATTACKS.items() if set(s.requires) <= have]


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise GanprintError(f"--attack {name}: unknown attack; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def parse_params(name: str, items: list[str] | None) -> dict[str, Any]:
    """``["k=5", "dim=8"]`` -> typed params of attack ``name`` (typed like its defaults)."""
    spec = get_attack(name)
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GanprintError(f"--param {item!r}: use KEY=VALUE")
        if key not in spec.params:
            allowed = ", ".join(spec.params) or "none"
            raise GanprintError(f"--param {key}: attack '{name}' has no such parameter (has: {allowed})")
        default = spec.params[key]
        raw = raw.strip()
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                out[key] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                out[key] = int(raw)
            elif isinstance(default, float):
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise GanprintError(f"--param {key}={raw}: expected a {type(default).__name__}") from None
    return out


def resolved_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    spec = get_attack(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        allowed = ", ".join(spec.params) or "none"
        raise GanprintError(f"attack '{name}': unknown parameter(s) {', '.join(unknown)} (has: {allowed})")
    return {**spec.params, **params}


def run_attack(name: str, ctx: AttackContext, params: Mapping[str, Any] | None = None):
    """Scores float64 [R] of attack ``name`` on ``ctx`` (higher = more likely member)."""
    import numpy as np

    spec = get_attack(name)
    full = resolved_params(name, params)
    scores = np.asarray(spec.fn(ctx, **full), dtype=np.float64)
    if scores.shape != (ctx.n_real,):
        raise RuntimeError(f"attack {name!r} returned shape {scores.shape}, expected ({ctx.n_real},)")
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise GanprintError(f"attack '{name}' gave {bad} non-finite score(s) on {ctx.source}; "
                            "check the embeddings (constant or duplicated vectors?)")
    return scores


# ---------------------------------------------------------------------------------------------
# attacks


def _check_k(ctx: AttackContext, k: int, what: str = "k") -> None:
    if k < 1:
        raise GanprintError(f"--param {what}={k}: must be at least 1")


def max_sim(ctx: AttackContext):
    """s_max(x) = max_g s(x, g)."""
    v, _ = ctx.real_topk()
    return v[:, 0]


def topk_mean(ctx: AttackContext, k: int = 5):
    """Mean of the k largest s(x, g) (k <= the artifact's k)."""
    _check_k(ctx, k)
    if k > ctx.k and ctx.k < ctx.n_gen:
        raise GanprintError(f"--param k={k}: {ctx.source} keeps only the top {ctx.k}; re-run simmatrix with --k {k}")
    v, _ = ctx.real_topk()
    return v[:, :k].mean(1)  # k > G: all generated images


def monte_carlo(ctx: AttackContext, quantile: float = 0.5):
    """Hilprecht et al. 2019: |{g : d(x, g) <= eps}| / G with eps = the ``quantile`` (median)
    of the real images' nearest-generated distances."""
    import numpy as np

    if not 0.0 <= quantile <= 1.0:
        raise GanprintError(f"--param quantile={quantile}: must be in [0, 1]")
    v, _ = ctx.real_topk()
    # in similarity units: d <= eps  <=>  s >= tau, and the q-quantile of d is the (1-q)-quantile of s
    tau = float(np.quantile(v[:, 0], 1.0 - quantile))
    # float noise must not drop the image that *defines* eps: compare with a tiny tolerance
    tol = 1e-6 * max(1.0, abs(tau))
    mat = ctx.matrix()
    if mat is not None:
        counts = (mat >= tau - tol).sum(0)
    else:
        counts = (v >= tau - tol).sum(1)
        # rows whose k-th neighbour is still within eps may have more: count them exactly
        more = np.flatnonzero(v[:, -1] >= tau - tol)
        if len(more) and ctx.k < ctx.n_gen:
            from ganprint.similarity import count_at_least

            real = ctx.embeddings("real")[more]
            counts[more] = count_at_least(real, ctx.embeddings("gen"), np.full(len(more), tau - tol, np.float32),
                                          metric=ctx.metric).numpy()
    return counts.astype(np.float64) / ctx.n_gen


def gan_leaks(ctx: AttackContext):
    """Chen et al. 2020 (full black-box): -min_g d(x, g)."""
    v, _ = ctx.real_topk()
    return -ctx.distance(v[:, 0])


def gan_leaks_cal(ctx: AttackContext):
    """Calibrated GAN-Leaks: -(min_g d(x, g) - min_r d(x, r)), r in the reference set."""
    v, _ = ctx.real_topk()
    rv, _ = ctx.realref_topk()
    return -(ctx.distance(v[:, 0]) - ctx.distance(rv[:, 0]))


def dist_ratio(ctx: AttackContext, n: int = 5, eps: float = 1e-12):
    """Carlini et al. 2023: -d(x, nearest g) / mean_{r in n nearest reals} d(x, r); the reals are
    the reference set (or the other real images), n at most their number."""
    _check_k(ctx, n, "n")
    rv, _ = ctx.realref_topk()
    n_avail = (ctx.n_ref if ctx.has_reference else ctx.n_real - 1)
    if n > rv.shape[1] and rv.shape[1] < n_avail:
        raise GanprintError(f"--param n={n}: {ctx.source} keeps only {rv.shape[1]} real neighbours; "
                            f"re-run simmatrix with --k {n} (and enough real images)")
    v, _ = ctx.real_topk()
    den = ctx.distance(rv[:, :n]).mean(1)
    return -ctx.distance(v[:, 0]) / (den + eps)


def kde_logpdf(points, data, exclude=None):
    """Gaussian KDE log-density (scipy's ``gaussian_kde`` bandwidth: Scott's rule, full covariance).

    points [P, d], data [N, d]; ``exclude`` int64 [P]: a data row left out for point p (-1: none),
    i.e. a leave-one-out density where a point is itself in the data.  Returns float64 [P].
    """
    import numpy as np
    from scipy.linalg import cho_factor, solve_triangular
    from scipy.special import logsumexp
    from scipy.stats import gaussian_kde

    points = np.asarray(points, dtype=np.float64)
    data = np.asarray(data, dtype=np.float64)
    n, d = data.shape
    try:
        cov = np.atleast_2d(gaussian_kde(data.T).covariance)
        chol, _ = cho_factor(cov, lower=True)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise GanprintError(f"KDE: the data covariance is singular ({exc}); use a smaller --param dim "
                            "or more images") from None
    chol = np.tril(chol)
    logdet = 2.0 * np.log(np.diag(chol)).sum()
    # whiten once: the Mahalanobis distance becomes Euclidean
    pw = solve_triangular(chol, points.T, lower=True).T
    dw = solve_triangular(chol, data.T, lower=True).T
    dsq = (dw * dw).sum(1)
    out = np.empty(len(points))
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    step = max(1, (1 << 22) // max(n, 1))  # bound the [step, N] block to ~32 MiB
    for s in range(0, len(points), step):
        p = pw[s:s + step]
        m = (p * p).sum(1)[:, None] + dsq[None, :] - 2.0 * p @ dw.T
        np.maximum(m, 0.0, out=m)
        logk = -0.5 * m
        cnt = np.full(len(p), float(n))
        if ex is not None:
            e = ex[s:s + step]
            rows = np.flatnonzero(e >= 0)
            logk[rows, e[rows]] = -np.inf
            cnt[rows] -= 1.0
        out[s:s + step] = logsumexp(logk, axis=1) - np.log(cnt)
    return out - 0.5 * (d * math.log(2.0 * math.pi) + logdet)


def domias(ctx: AttackContext, dim: int = 5):
    """van Breugel et al. 2023 (DOMIAS): log p_gen(x) - log p_ref(x).

    PCA (sklearn, fitted on generated + reference embeddings; unit-normalised first for the
    cosine metric) to ``dim`` components, then Gaussian KDEs of the generated and of the
    reference set; a real image that is itself in the reference set is left out of p_ref.
    """
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    gen = ctx.embeddings("gen").float()
    real = ctx.embeddings("real").float()
    ref = ctx.embeddings("ref").float()
    if ctx.metric == "cosine":
        gen, real, ref = (torch.nn.functional.normalize(t, dim=1) for t in (gen, real, ref))
    gen, real, ref = (t.numpy().astype(np.float64) for t in (gen, real, ref))
    excl = ctx.ref_exclude()
    n_ref = len(ref) - (1 if (excl >= 0).any() else 0)
    max_dim = min(gen.shape[1], len(gen) - 1, n_ref - 1)
    if dim < 1:
        raise GanprintError(f"--param dim={dim}: must be at least 1")
    if max_dim < 1:
        raise GanprintError(f"domias: needs at least 3 generated and 3 reference images, got {len(gen)} and {len(ref)}")
    dim = min(dim, max_dim)
    pca = PCA(n_components=dim, random_state=0).fit(np.concatenate([gen, ref]))
    zg, zr, zx = pca.transform(gen), pca.transform(ref), pca.transform(real)
    return kde_logpdf(zx, zg) - kde_logpdf(zx, zr, exclude=excl)


for _spec in (
    AttackSpec("max_sim", max_sim, "max similarity to any generated image (the seed's rule)"),
    AttackSpec("topk_mean", topk_mean, "mean of the k largest similarities to generated images", {"k": 5}),
    AttackSpec("monte_carlo", monte_carlo, "fraction of generated images within eps (median NN distance)",
               {"quantile": 0.5}, "Hilprecht et al. 2019", needs_embeddings=True),
    AttackSpec("gan_leaks", gan_leaks, "minus the distance to the nearest generated image", {},
               "Chen et al. 2020"),
    AttackSpec("gan_leaks_cal", gan_leaks_cal, "GAN-Leaks calibrated by the nearest reference distance", {},
               "Chen et al. 2020", uses_reference=True),
    AttackSpec("domias", domias, "density ratio p_gen/p_ref (PCA + Gaussian KDE), as a log", {"dim": 5},
               "van Breugel et al. 2023", needs_embeddings=True, uses_reference=True),
    AttackSpec("dist_ratio", dist_ratio, "minus nearest-generated distance over mean distance to n nearest reals",
               {"n": 5, "eps": 1e-12}, "Carlini et al. 2023", uses_reference=True),
):
    register_attack(_spec)


# ---------------------------------------------------------------------------------------------
# verified scores (``simmatrix --verify``): RANSAC inlier counts from ganprint.verify

VERIFY_TENSORS = ("verify_real_values",)


def _verified(ctx: AttackContext, name: str):
    if name not in ctx.tensors:
        raise ArtifactError(f"{ctx.source}: no verified scores ('{name}'); re-run `ganprint simmatrix` with "
                            "--verify LOCAL (local features from `ganprint embed --backbone sift`)")
    return ctx.array(name)


def verify_max(ctx: AttackContext):
    """Most RANSAC inliers of x against any of its verified generated candidates."""
    return _verified(ctx, "verify_real_values")[:, 0]


def verify_cal(ctx: AttackContext):
    """log(1 + inliers vs generated) - log(1 + inliers vs the nearest reference image): a real
    image that matches generic anatomy (many inliers with other reals too) is discounted."""
    import numpy as np

    g = _verified(ctx, "verify_real_values")[:, 0]
    r = _verified(ctx, "verify_realref_values")[:, 0]
    return np.log1p(g) - np.log1p(r)


for _spec in (
    AttackSpec("verify_max", verify_max, "most RANSAC inliers against a shortlisted generated image (--verify)",
               {}, "geometric verification (Lowe 2004; SSCD-style shortlist)", requires=VERIFY_TENSORS),
    AttackSpec("verify_cal", verify_cal, "verified inliers vs generated over inliers vs reference, as a log ratio",
               {}, "geometric verification, calibrated", uses_reference=True,
               requires=VERIFY_TENSORS + ("verify_realref_values",)),
):
    register_attack(_spec)
