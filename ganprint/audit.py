"""``ganprint audit``: the whole membership audit in one call, ending in a report.

Stages (each timed; the costly ones cached under ``RUN/cache`` by a key of their inputs' digests
and options, so a rerun reuses them):

1. ``inputs``      resolve the layout, list every image, check it is an image (no work yet);
2. ``embed``       every role folder with every feature space (``ganprint.embed.run_embed``);
3. ``similarity``  per feature space and generated set: real x generated top-k and real x the
                   other real images of the same split (self excluded), as ``ganprint simmatrix``
                   does without ``--reference`` (why not the known non-members: see _candidates);
                   with SIFT, each real image's top-k generated images re-scored by verification;
4. ``attacks``     every registered attack on every feature space = the candidates, one score per
                   real image each;
5. ``selection``   candidates ranked by repeated stratified k-fold CV on the labelled images; the
                   chosen procedure's honest AUC / kappa by nested CV (``ganprint.select`` when
                   present, else the out-of-fold rule of :func:`select_fallback`);
6. ``pvalues``     conformal p-values against the known non-members' scores (leave-one-out for the
                   non-members themselves), Benjamini-Hochberg flags at ``fdr``;
7. ``datacopy``    dataset-level verdicts (Meehan et al. 2020's C_T test) and aligned-copy evidence: each
                   real image's candidate generated images aligned onto it (ECC), its best correlation
                   tested against the known non-members' (verified copies, BH), the exact copying
                   test and the memorisation rate built on it (ganprint.datacopy);
8. ``report``      scores.parquet, submission.csv, report.json, figures and report.html.

Nothing is written until the inputs are checked; the run is built in a hidden sibling folder
``.RUN.partial`` and renamed to ``RUN`` at the end, so a failed run leaves no partial report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ganprint.errors import GanprintError

AUDIT_FORMAT = 1
DEFAULT_BACKBONES = ("pixels", "efficientnet_lite0")
ROLES = ("generated", "members", "non_members", "test_generated", "unknown")
REAL_ROLES = ("members", "non_members", "unknown")
ROLE_LABEL = {"members": 1, "non_members": 0, "unknown": None}


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class AuditInputs:
    """Folders by role. ``test_generated`` None: the unknown images are scored against
    ``generated`` (an owner auditing one release); set for an ImageCLEF root (``test/generated``)."""

    generated: Path
    members: Path | None
    non_members: Path | None
    unknown: Path | None = None
    test_generated: Path | None = None
    layout: str = "folders"  # imageclef | folders
    root: Path | None = None
    records: dict[str, list] = field(default_factory=dict)

    def folders(self) -> dict[str, Path]:
        return {r: getattr(self, r) for r in ROLES if getattr(self, r) is not None}


def _check_folder(path: Path, role: str) -> Path:
    if not path.exists():
        raise GanprintError(f"{path}: no such folder ({role}); check the path")
    if not path.is_dir():
        raise GanprintError(f"{path}: not a folder ({role}); pass a folder of images")
    return path


def resolve_inputs(data: str | os.PathLike | None = None, *, generated=None, members=None, non_members=None,
                   unknown=None) -> AuditInputs:
    """An ImageCLEF root (``dev/`` + optional ``test/``, or a single split folder holding
    ``generated/`` and ``real_*`` folders) or explicit folders. Raises a one-line error for a
    missing or unusable layout; reads no image."""
    explicit = [x for x in (generated, members, non_members, unknown) if x is not None]
    if data is not None and explicit:
        raise GanprintError("give either DATA (an ImageCLEF root) or --generated/--members/--non-members/--unknown, "
                            "not both")
    if data is None:
        if generated is None:
            raise GanprintError("no input: pass DATA (an ImageCLEF root with dev/ and test/) or --generated G "
                                "--members M --non-members N [--unknown U]")
        inp = AuditInputs(_check_folder(Path(generated), "--generated"),
                          None if members is None else _check_folder(Path(members), "--members"),
                          None if non_members is None else _check_folder(Path(non_members), "--non-members"),
                          None if unknown is None else _check_folder(Path(unknown), "--unknown"))
        where = "--members/--non-members"
    else:
        root = _check_folder(Path(data), "DATA")
        dev = root / "dev" if (root / "dev").is_dir() else root
        if not (dev / "generated").is_dir():
            raise GanprintError(f"{root}: not an ImageCLEF layout (no dev/generated/ or generated/ folder); "
                                "pass a root with dev/{generated,real_used,real_not_used}/ or use --generated/--members/"
                                "--non-members")
        test = root / "test" if (root / "test").is_dir() and dev != root else None
        opt = lambda p: p if p.is_dir() else None  # noqa: E731
        unk = opt(test / "real_unknown") if test is not None else opt(dev / "real_unknown")
        tgen = opt(test / "generated") if test is not None else None
        if test is not None and unk is not None and tgen is None:
            raise GanprintError(f"{test}: has real_unknown/ but no generated/; the test images need the test "
                                "generator's images")
        inp = AuditInputs(dev / "generated", opt(dev / "real_used"), opt(dev / "real_not_used"), unk, tgen,
                          "imageclef", root)
        where = f"{dev}/real_used/ and {dev}/real_not_used/"
    if inp.non_members is None:
        raise GanprintError(f"{inp.root or inp.generated}: no labels and no reference: the audit needs known "
                            f"non-members (and members, to choose and judge the attack); provide {where}")
    if inp.members is None:
        raise GanprintError(f"{inp.root or inp.generated}: no known members: the audit needs labelled members to "
                            f"choose the attack and estimate its accuracy; provide {where}")
    return inp


def list_images(inp: AuditInputs) -> AuditInputs:
    """Discover every role's images (sorted) and check each is a readable image header.

    Fails on the first empty folder, non-image file or unreadable image: nothing has been written yet."""
    from ganprint.data import discover

    for role, folder in inp.folders().items():
        records, _ = discover([str(folder)])
        for r in records:
            _check_header(r.path)
        inp.records[role] = records
    seen: dict[str, str] = {}
    for role in REAL_ROLES:
        for r in inp.records.get(role, []):
            if r.image_id in seen and seen[r.image_id] != role:
                raise GanprintError(f"{r.path}: image id '{r.image_id}' is also a {seen[r.image_id]} image; "
                                    "real image ids must be unique across members, non-members and unknown")
            seen[r.image_id] = role
    return inp


def _check_header(path: str) -> None:
    """A cheap check that the file decodes as what its name says (header only, no pixels)."""
    from ganprint.data import DICOM_SUFFIXES, _is_dicom_file
    from ganprint.errors import BadImageError

    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES or _is_dicom_file(p):
        return  # DICOM: decoded (and checked) by embed
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as img:
            img.size  # noqa: B018
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(str(p), f"not a readable image ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# run folder, stage cache


class RunDir:
    """The run is built in ``.NAME.partial`` beside ``RUN`` and swapped in by :meth:`commit`.

    The previous run's ``cache/`` is hard-linked into the partial folder (copied where links
    fail), so a rerun reuses finished stages while a failure leaves ``RUN`` untouched."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.final = Path(out).absolute()
        parent = self.final.parent
        if not parent.is_dir():
            raise GanprintError(f"{parent}: folder does not exist; create it or choose another --out")
        if not os.access(parent, os.W_OK):
            raise GanprintError(f"{parent}: not writable; choose another --out")
        if self.final.exists():
            if not self.final.is_dir():
                raise GanprintError(f"{self.final}: exists and is not a folder; choose another --out")
            if any(self.final.iterdir()) and not (self.final / "report.json").exists() and \
                    not (self.final / "cache").is_dir():
                raise GanprintError(f"{self.final}: exists and is not an audit run; choose an empty or new --out")
        self.path = parent / f".{self.final.name}.partial"
        self.cache = self.path / "cache"

    def open(self) -> "RunDir":
        if self.path.exists():  # a failed run: keep its cache, drop the rest
            for child in self.path.iterdir():
                if child.name != "cache":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.cache.mkdir(parents=True, exist_ok=True)
        old = self.final / "cache"
        if old.is_dir():
            for f in old.rglob("*"):
                dst = self.cache / f.relative_to(old)
                if f.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                elif not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(f, dst)
                    except OSError:
                        shutil.copy2(f, dst)
        return self

    def commit(self) -> Path:
        old = self.final.parent / f".{self.final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def _digest(obj: Any) -> str:
    from ganprint.artifacts import digest_json

    return digest_json(obj)


class StageCache:
    """name -> (tensors, JSON meta) in ``cache/NAME.safetensors``, valid while the key matches."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get_or_compute(self, name: str, key: str, compute: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, bool]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        path = self.folder / f"{name}.safetensors"
        if path.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(path), "pt") as fh:
                    meta = fh.metadata() or {}
                if meta.get("key") == key:
                    return load_file(str(path)), json.loads(meta.get("meta", "{}")), True
            except (SafetensorError, OSError, ValueError):
                pass
        tensors, meta = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"key": key, "meta": json.dumps(meta, sort_keys=True, default=float)})
        os.replace(tmp, path)
        return tensors, meta, False


# ---------------------------------------------------------------------------------------------
# options and result


@dataclass
class AuditOptions:
    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    fdr: float = 0.1
    folds: int = 5
    repeats: int = 4  # inner CV repeats; the nested (outer) CV uses repeats // 2
    seed: int = 0
    bootstrap: int = 500
    gallery: int = 12
    k: int = 10
    verify: bool = True  # local-feature verification (SIFT + RANSAC) when ganprint.verify and OpenCV exist
    verify_k: int = 50  # shortlist per real image (global similarity) re-scored by verification
    copy_k: int = 10  # nearest generated images per real image and feature space aligned for copy evidence
    local: str = "sift"
    decision: str = "calibrate"  # submission labels: calibrate (kappa cut on the labelled images) | fdr
    # share of the known non-members held out of selection as the unknown images' p-value null
    # (ganprint.conformal.calibration_split); None: auto (0.5: the audit has no pool outside them)
    null_fraction: float | None = None
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    weights: str | None = None

    def check(self) -> None:
        if not 0.0 < self.fdr < 1.0:
            raise GanprintError(f"--fdr {self.fdr}: must be in (0, 1), e.g. 0.1")
        if self.folds < 2:
            raise GanprintError(f"--folds {self.folds}: must be at least 2")
        if self.repeats < 1:
            raise GanprintError(f"--repeats {self.repeats}: must be at least 1")
        if self.bootstrap < 0:
            raise GanprintError(f"--bootstrap {self.bootstrap}: must be >= 0")
        if self.gallery < 0:
            raise GanprintError(f"--gallery {self.gallery}: must be >= 0")
        if self.decision not in ("calibrate", "fdr"):
            raise GanprintError(f"--decision {self.decision}: use calibrate or fdr")
        if self.null_fraction is not None:
            from ganprint.conformal import resolve_fraction

            resolve_fraction(self.null_fraction, 0)
        if not self.global_backbones():
            raise GanprintError("--backbone: give at least one global feature space (e.g. pixels)")
        from ganprint.backbones import get_backbone

        for b in self.global_backbones():
            get_backbone(b)
        if self.verify_k < 1:
            raise GanprintError(f"--verify-k {self.verify_k}: must be at least 1")
        if self.copy_k < 1:
            raise GanprintError(f"--copy-k {self.copy_k}: must be at least 1")

    def global_backbones(self) -> tuple[str, ...]:
        return tuple(b for b in self.backbones if not _is_local(b))

    def local_kind(self) -> str | None:
        """The local-feature kind used for verification, or None (off / unavailable)."""
        locals_ = [b for b in self.backbones if _is_local(b)]
        if not (self.verify or locals_) or not verify_available():
            return None
        return locals_[0] if locals_ else self.local


def _is_local(name: str) -> bool:
    try:
        from ganprint.local_features import is_local
    except ImportError:
        return False
    return is_local(name)


def _cv2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("cv2") is not None


def verify_available() -> bool:
    """ganprint.verify (copy detection) and OpenCV importable."""
    import importlib.util

    return importlib.util.find_spec("ganprint.verify") is not None and importlib.util.find_spec("cv2") is not None


@dataclass
class AuditResult:
    run: Path
    report: dict[str, Any]

    @property
    def html(self) -> Path:
        return self.run / "report.html"


class _Stages:
    """Per-stage timing and cache hits, with one stderr line per stage."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        self.log = log or (lambda m: None)
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self._t = None
        self._n = 0

    def start(self, name: str, what: str) -> None:
        self._n += 1
        self._name = name
        self._t = time.perf_counter()
        self.log(f"[bold]{self._n}/8 {name}[/bold]: {what}")

    def done(self, cached: bool | None = None, note: str = "") -> None:
        dt = time.perf_counter() - self._t
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + dt
        if cached is not None:
            self.cached[self._name] = cached
        tag = " (cached)" if cached else ""
        self.log(f"    {self._name} {dt:.1f}s{tag}{'; ' + note if note else ''}")


# ---------------------------------------------------------------------------------------------
# embeddings and similarity


@dataclass
class RealSet:
    """The real images of the run, in a fixed order: members, non-members, unknown."""

    table: Any  # DataFrame: image_id, role, label (Int8), split (dev|test), path, sha256
    emb: dict[str, Any] = field(default_factory=dict)  # backbone -> float32 [R, D]


@dataclass
class _Reused:
    """An embeddings artifact reused without loading its model (see :func:`_embed_all`)."""

    base: Path
    provenance: dict
    reused: bool = True


def _embed_all(inp: AuditInputs, opts: AuditOptions, run: RunDir, progress: bool):
    """{backbone: {role: EmbedOutcome}}. run_embed caches each artifact by its own key, but checks
    it only after loading the model; a rerun first compares the inputs' digest and the options with
    what ``cache/emb/index.json`` recorded for the artifact, and skips run_embed when all agree."""
    from ganprint.artifacts import read_provenance
    from ganprint.embed import hash_records, inputs_digest, run_embed

    index_path = run.cache / "emb" / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    digests = {role: inputs_digest(recs, hash_records(recs)) for role, recs in inp.records.items()}
    sig = {"weights": opts.weights, "versions": _versions()}
    out: dict[str, dict[str, Any]] = {}
    kinds = list(opts.global_backbones()) + ([opts.local_kind()] if opts.local_kind() else [])
    for bb in kinds:
        folder = run.cache / "emb" / bb
        folder.mkdir(parents=True, exist_ok=True)
        out[bb] = {}
        for role, path in inp.folders().items():
            key = f"{bb}/{role}"
            rec = index.get(key)
            if rec and rec.get("inputs") == digests[role] and rec.get("sig") == sig:
                try:
                    prov = read_provenance(folder / role)
                except GanprintError:
                    prov = {}
                if prov.get("cache_key") == rec.get("cache_key"):
                    out[bb][role] = _Reused(folder / role, prov)
                    continue
            o = run_embed([str(path)], folder / role, backbone=bb, weights=None if _is_local(bb) else opts.weights,
                          device=opts.device, batch_size=opts.batch_size, workers=opts.workers, progress=progress)
            out[bb][role] = o
            index[key] = {"inputs": digests[role], "sig": sig, "cache_key": o.provenance.get("cache_key")}
    tmp = index_path.with_name(".index.json.tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, index_path)
    return out


def _load_embeddings(outcome) -> tuple[Any, Any]:
    from ganprint.artifacts import read_artifact

    art = read_artifact(outcome.base, kind="embeddings")
    return art.tensor("embeddings").float(), art.table


def _real_set(embs: dict[str, dict[str, Any]], inp: AuditInputs) -> tuple[RealSet, dict[str, dict[str, Any]]]:
    """RealSet + {backbone: {"generated": [G, D], "test_generated": [G', D]}}."""
    import pandas as pd
    import torch

    tables, gens, real_emb = [], {}, {}
    first = next(b for b in embs if not _is_local(b))
    for bb, roles in embs.items():
        if _is_local(bb):
            continue
        parts = []
        gens[bb] = {}
        for role in ("generated", "test_generated"):
            if role in roles:
                gens[bb][role] = _load_embeddings(roles[role])[0]
        for role in REAL_ROLES:
            if role not in roles:
                continue
            x, t = _load_embeddings(roles[role])
            parts.append(x)
            if bb == first:
                tables.append(pd.DataFrame({
                    "image_id": t["image_id"].astype(str).to_numpy(), "role": role,
                    "label": pd.array([ROLE_LABEL[role]] * len(t), dtype="Int8"),
                    "split": "test" if role == "unknown" and inp.test_generated is not None else "dev",
                    "path": t["path"].astype(str).to_numpy(), "sha256": t["sha256"].astype(str).to_numpy(),
                }))
        real_emb[bb] = torch.cat(parts)
    table = pd.concat(tables, ignore_index=True)
    for bb, x in real_emb.items():
        if len(x) != len(table):
            raise GanprintError(f"feature space {bb}: {len(x)} real embeddings for {len(table)} real images; "
                                "rerun with --force")
    return RealSet(table, real_emb), gens


def _generated_for(realset: RealSet, inp: AuditInputs) -> list[tuple[str, Any]]:
    """[(generated role, boolean mask [R] of the real images scored against it)]."""
    import numpy as np

    split = realset.table["split"].to_numpy()
    if inp.test_generated is None:
        return [("generated", np.ones(len(split), dtype=bool))]
    return [("generated", split == "dev"), ("test_generated", split == "test")]


def similarity_tensors(gen, real, k: int) -> dict[str, Any]:
    """Similarity tensors (docs/ARTIFACTS.md names) of real [R, D] vs gen [G, D], and real x the
    other real images (self excluded) for the calibrated attacks."""
    from ganprint.similarity import compute_similarity

    return compute_similarity(gen, real, metric="cosine", k=k, device="cpu")


def attack_context(tensors: dict, gen, real):
    """An AttackContext over in-memory tensors; the reference set is the real set itself."""
    from ganprint.attacks import AttackContext

    return AttackContext(tensors, "cosine", {"gen": lambda: gen, "real": lambda: real},
                         {"metric": "cosine", "k": int(tensors["real_topk_values"].shape[1])})


# ---------------------------------------------------------------------------------------------
# selection (fallback: ganprint.select takes over when it exists)


def _fold_auc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def select_fallback(scores, y, names: list[str], *, folds: int = 5, repeats: int = 3, seed: int = 0,
                    bootstrap: int = 500) -> dict[str, Any]:
    """Choose one candidate by CV AUC; estimate the *procedure* by nested CV.

    scores float64 [C, n] (candidate x labelled image, higher = member), y int [n].
    Each outer fold picks the candidate with the best AUC on its training part and a kappa cut
    there (calibrate_threshold), then scores its held-out part; held-out scores are mapped to the
    share of training non-members below them so folds are comparable, and pooled (repeat 0) for
    the ROC and the bootstrap CIs. The held-out labels never enter a choice.

    Returns ``{chosen, chosen_index, nested: {auc, auc_ci, kappa, kappa_ci, auc_folds_mean, ...},
    candidates: [{name, cv_auc, cv_auc_sd, cv_kappa, auc_all}], oof_score [n], oof_label [n]}``.
    """
    import numpy as np
    from sklearn.model_selection import RepeatedStratifiedKFold

    from ganprint.metrics import evaluate
    from ganprint.predict import calibrate_threshold

    S = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n_min = int(min(y.sum(), (1 - y).sum()))
    if n_min < 2:
        raise GanprintError(f"selection needs at least 2 members and 2 non-members, got {int(y.sum())} and "
                            f"{int((1 - y).sum())}")
    k = min(folds, n_min)
    cv = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    C, n = S.shape
    cand_auc = [[] for _ in range(C)]
    cand_kappa_pred = [np.zeros(n, dtype=np.int64) for _ in range(C)]
    nested_aucs, picks = [], []
    oof_score = np.full(n, np.nan)
    oof_label = np.zeros(n, dtype=np.int64)
    for f, (tr, te) in enumerate(cv.split(np.zeros(n), y)):
        rep = f // k
        tr_auc = np.array([_fold_auc(y[tr], S[c, tr]) for c in range(C)])
        for c in range(C):
            cand_auc[c].append(_fold_auc(y[te], S[c, te]))
            if rep == 0:
                thr, _ = calibrate_threshold(S[c, tr], y[tr])
                cand_kappa_pred[c][te] = (S[c, te] >= thr).astype(np.int64)
        best = int(np.nanargmax(np.where(np.isfinite(tr_auc), tr_auc, -np.inf)))
        picks.append(best)
        nested_aucs.append(_fold_auc(y[te], S[best, te]))
        if rep == 0:
            thr, _ = calibrate_threshold(S[best, tr], y[tr])
            neg = np.sort(S[best, tr][y[tr] == 0])
            oof_score[te] = np.searchsorted(neg, S[best, te], side="left") / max(len(neg), 1) \
                + 1e-6 * _rank01(S[best, te])  # ties inside a fold keep their order
            oof_label[te] = (S[best, te] >= thr).astype(np.int64)
    m = evaluate(y, oof_label, oof_score, bootstrap=bootstrap, seed=seed)
    rows = []
    for c in range(C):
        a = np.array(cand_auc[c], dtype=np.float64)
        kap = evaluate(y, cand_kappa_pred[c], None, bootstrap=0)["kappa"]
        rows.append({"name": names[c], "cv_auc": float(np.nanmean(a)), "cv_auc_sd": float(np.nanstd(a)),
                     "cv_kappa": kap, "auc_all": _fold_auc(y, S[c]),
                     "picked_in_folds": int(sum(p == c for p in picks))})
    chosen = int(np.nanargmax([r["cv_auc"] if np.isfinite(r["cv_auc"]) else -np.inf for r in rows]))
    return {
        "method": "fallback: best CV AUC (ganprint.audit.select_fallback)",
        "chosen": names[chosen], "chosen_index": chosen,
        "nested": {"auc": m["auc"], "auc_ci": m["auc_ci"], "kappa": m["kappa"], "kappa_ci": m["kappa_ci"],
                   "auc_folds_mean": float(np.nanmean(nested_aucs)), "folds": k, "repeats": repeats,
                   "n": int(n), "n_pos": int(y.sum()), "tpr_at_1fpr": m["tpr_at_fpr"]},
        "candidates": rows, "oof_score": oof_score, "oof_label": oof_label,
    }


def _rank01(s):
    import numpy as np

    r = np.argsort(np.argsort(s, kind="stable"), kind="stable").astype(np.float64)
    return r / max(len(s) - 1, 1)


# ---------------------------------------------------------------------------------------------
# p-values and FDR


def conformal_pvalues(scores, ref_scores, self_in_ref=None):
    """p_i = (1 + #{j: ref_j >= s_i}) / (n_ref + 1), the image itself left out of the reference
    where ``self_in_ref[i] >= 0`` (ganprint.conformal). float64 [R]."""
    from ganprint.conformal import conformal_pvalues as _cp

    return _cp(scores, ref_scores, self_in_ref)


def bh_flags(pvalues, q: float):
    """(BH-adjusted p-values float64 [n], flags bool [n] at level q) (ganprint.conformal, scipy)."""
    from ganprint.conformal import bh_adjust, check_q

    adj = bh_adjust(pvalues)
    return adj, adj <= check_q(q)


# ---------------------------------------------------------------------------------------------
# candidates


def _local_sets(embs: dict, kind: str) -> dict[str, Any]:
    from ganprint.local_features import load_local

    return {role: load_local(o.base) for role, o in embs[kind].items()}


def _candidates(realset: RealSet, gens: dict, inp: AuditInputs, opts: AuditOptions, embs: dict):
    """Every (feature space, attack) score on every real image.

    Returns (scores float64 [C, R], names [C], nn {space: (idx int64 [R, 3], val [R, 3])} with
    indices into the generated set of each real image's split (for ``sift``: the verified
    matches, val = inliers), verify_info, notes)."""
    import numpy as np
    import torch

    from ganprint.attacks import attack_names, run_attack

    t = realset.table
    R = len(t)
    # The reference of the calibrated attacks (gan_leaks_cal, dist_ratio, domias, verify_cal) is
    # the *other real images of the same split*, self excluded (what `ganprint simmatrix` does
    # without --reference), not the known non-members: real images come in near-duplicate groups
    # (neighbouring slices of one patient, kept on one side of the split), so a non-members-only
    # reference holds close relatives of every non-member and of no member, and the calibrated
    # scores then separate "has a relative in the reference" instead of membership (on the synth
    # copies benchmark: nested-CV AUC 0.999 on dev, AUC 0.64 on test, 118 of 120 test images
    # flagged). Here every image's reference holds its relatives alike.
    kind = opts.local_kind()
    glob = opts.global_backbones()
    shortlist = glob[-1]  # verification re-scores the shortlist of this global space
    local = None
    if kind is not None:
        from ganprint.verify import VerifyInputs, lookup

        local = _local_sets(embs, kind)
        sets = [local[r] for r in REAL_ROLES if r in local]
        real_local = lookup(sets, t, np.arange(R), "real", "audit")
    names: list[str] = []
    rows: list[Any] = []
    notes: list[str] = []
    nn: dict[str, tuple[Any, Any]] = {}
    verify_info: dict[str, Any] = {}
    for bb in glob:
        real = realset.emb[bb]
        per_attack: dict[str, Any] = {}
        space = {}
        idx = np.full((R, 3), -1, dtype=np.int64)
        val = np.full((R, 3), np.nan)
        vidx = np.full((R, 3), -1, dtype=np.int64)
        vval = np.full((R, 3), np.nan)
        for role, mask in _generated_for(realset, inp):
            rows_ = np.flatnonzero(mask)
            if len(rows_) == 0:
                continue
            gen = gens[bb][role]
            sub_real = real[torch.as_tensor(rows_)]
            tens = similarity_tensors(gen, sub_real, opts.k)
            if local is not None and bb == shortlist:
                from ganprint.similarity import topk_search
                from ganprint.verify import verify_for_similarity

                gen_local = lookup([local[role]], _load_embeddings(embs[bb][role])[1], np.arange(len(gen)), "generated",
                                   str(embs[bb][role].base))
                vin = VerifyInputs(gen_local, real_local.subset(rows_), None, [local[role]])
                vt, vprov = verify_for_similarity(vin, gen_emb=gen, real_emb=sub_real, k=opts.verify_k,
                                                  search=topk_search)
                tens.update({k: torch.as_tensor(np.asarray(v)) for k, v in vt.items()})
                verify_info[role] = {k: vprov.get(k) for k in ("detector", "k", "ratio", "reproj", "pairs", "score",
                                                               "shortlist")}
                verify_info[role]["shortlist_space"] = bb
                kv = min(3, vt["verify_real_indices"].shape[1])
                vidx[rows_, :kv] = np.asarray(vt["verify_real_indices"])[:, :kv]
                vval[rows_, :kv] = np.asarray(vt["verify_real_values"])[:, :kv]
            ctx = attack_context(tens, gen, sub_real)
            kk = min(3, tens["real_topk_indices"].shape[1])
            idx[rows_, :kk] = tens["real_topk_indices"][:, :kk].numpy()
            val[rows_, :kk] = tens["real_topk_values"][:, :kk].numpy()
            for a in attack_names(tens.keys()):
                prefix = kind if a.startswith("verify") else bb
                key = f"{prefix}/{a}"
                if key in space and space[key] is None:
                    continue
                try:
                    sc = np.asarray(run_attack(a, ctx), dtype=np.float64)
                except GanprintError as exc:
                    notes.append(f"{key} left out: {exc}")
                    space[key] = None
                    continue
                space.setdefault(key, np.full(R, np.nan))[rows_] = sc
        nn[bb] = (idx, val)
        if local is not None and bb == shortlist:
            nn[kind] = (vidx, vval)
        for key, sc in space.items():
            if sc is None:
                continue
            if not np.isfinite(sc).all():
                notes.append(f"{key} left out: non-finite scores")
                continue
            names.append(key)
            rows.append(sc)
        del per_attack
    if not rows:
        raise GanprintError("no attack produced scores; check the inputs (too few images?)")
    return np.stack(rows), names, nn, verify_info, notes


def _copy_candidates(realset: RealSet, gens: dict, inp: AuditInputs, opts: AuditOptions, extra=None):
    """int64 [R, C]: each real image's candidate generated images (indices into its split's
    generated set, -1 = none): its ``opts.copy_k`` nearest by cosine in every global feature
    space, plus ``extra`` [R, c] (the verified matches), duplicates removed."""
    import numpy as np
    import torch

    from ganprint.similarity import topk_search

    R = len(realset.table)
    cols = []
    for bb in opts.global_backbones():
        idx = np.full((R, opts.copy_k), -1, dtype=np.int64)
        for role, mask in _generated_for(realset, inp):
            rows_ = np.flatnonzero(mask)
            gen = gens[bb][role]
            kk = min(opts.copy_k, len(gen))
            if len(rows_) == 0 or kk == 0:
                continue
            res, _, _ = topk_search(realset.emb[bb][torch.as_tensor(rows_)], gen, kk, metric="cosine", device="cpu")
            idx[rows_, :kk] = res.indices.numpy()
        cols.append(idx)
    if extra is not None:
        cols.append(np.asarray(extra, dtype=np.int64))
    cand = np.concatenate(cols, axis=1)
    out = np.full_like(cand, -1)
    for i in range(R):
        u = list(dict.fromkeys(int(c) for c in cand[i] if c >= 0))
        out[i, :len(u)] = u
    width = max(1, int((out >= 0).sum(1).max()))
    return out[:, :width]


def _gen_paths(embs: dict, opts: AuditOptions) -> dict[str, list[str]]:
    first = opts.global_backbones()[0]
    return {role: [str(p) for p in _load_embeddings(embs[first][role])[1]["path"]]
            for role in ("generated", "test_generated") if role in embs[first]}


def _copy_stage(realset: RealSet, gens: dict, inp: AuditInputs, opts: AuditOptions, embs: dict, ctens: dict,
                target_role: str, groups):
    """Aligned-copy verification of every real image (see ganprint.datacopy.copy_evidence) and
    the dataset-level copying test and memorisation rate built on it. Returns (tensors, meta)."""
    import numpy as np
    import torch

    from ganprint.datacopy import aligned_correlations, copy_evidence, copy_memorisation_rate, members_copy_test

    tab = realset.table
    kind = opts.local_kind()
    extra = ctens.get(f"nn_idx.{kind}") if kind else None
    cand = _copy_candidates(realset, gens, inp, opts, None if extra is None else extra.numpy())
    gp = _gen_paths(embs, opts)
    role_of = {"dev": "generated", "test": "test_generated" if "test_generated" in gp else "generated"}
    per_row = [gp[role_of[s]] for s in tab["split"]]
    cc, warp = aligned_correlations(tab["path"].tolist(), per_row, cand)
    role = tab["role"].to_numpy()
    mem, non = np.flatnonzero(role == "members"), np.flatnonzero(role == "non_members")
    target = np.flatnonzero(role == target_role)
    ev = copy_evidence(cc, non, target, opts.fdr)
    lab_rows = np.flatnonzero(tab["label"].notna().to_numpy())
    gpos = {int(r): i for i, r in enumerate(lab_rows)}
    g = None if groups is None else np.asarray(groups)
    test = members_copy_test(ev["stat"][mem], ev["stat"][non],
                             None if g is None else g[[gpos[int(r)] for r in mem]],
                             None if g is None else g[[gpos[int(r)] for r in non]])
    dev_gen = len(gp["generated"])
    memo = copy_memorisation_rate(cc[mem], cand[mem], dev_gen, ev["cut"])
    n_t = len(target)
    at_min = int((ev["p"][target] <= ev["min_p"] + 1e-12).sum()) if n_t else 0
    summary = {"set": target_role, "n_tested": int(n_t), "n_verified": int(ev["copy"][target].sum()),
               "n_above_every_non_member": at_min, "q": opts.fdr, "n_null": ev["n_null"], "min_p": ev["min_p"],
               "cut": ev["cut"], "candidates_per_image": int(cand.shape[1]),
               "statistic": "best ECC correlation (rotation + shift) of the image's candidate generated images",
               "method": "conformal p-values vs the known non-members' statistic, Benjamini-Hochberg",
               "note": None if inp.test_generated is None else (
                   "the unknown images are aligned with test/generated, the known non-members with dev/generated: "
                   "their copy p-values assume both generated sets come from the same generator")}
    tens = {"cand": torch.as_tensor(cand), "cc": torch.as_tensor(cc), "warp": torch.as_tensor(warp),
            "stat": torch.as_tensor(ev["stat"]), "p": torch.as_tensor(ev["p"]), "q": torch.as_tensor(ev["q"]),
            "copy": torch.as_tensor(ev["copy"].astype(np.uint8))}
    return tens, {"copy_test": test, "memorisation": memo, "copies": summary}


def _membership_null(tab, lab, y, groups, opts: AuditOptions, unknown: bool):
    """Which labelled rows selection may use, and which known non-members are the unknown images'
    p-value null.  -> (lab_sel bool [R], info dict, null_rows int [K]).

    The null must not have chosen the score (ganprint.conformal): with unknown images to flag, a
    seeded share of the non-members' near-duplicate groups (``opts.null_fraction``, auto 0.5) is held
    out of selection and alone calibrates.  Without unknown images the flags are about members, who
    are not exchangeable with the null anyway, and every labelled image serves both.  When no split
    is possible (too few non-members) every non-member is the null and ``info`` says the p-values
    are optimistic."""
    import numpy as np

    from ganprint.conformal import calibration_split

    nonmem = np.flatnonzero((tab["role"] == "non_members").to_numpy())
    if not unknown:
        return lab.copy(), {"null": "every known non-member (the flags are about members)",
                            "n_null": int(len(nonmem))}, nonmem
    lab_rows = np.flatnonzero(lab)
    ids = [str(i) for i in tab["image_id"].to_numpy()]
    # selection keeps enough near-duplicate groups of each class for its nested CV
    split = calibration_split([ids[r] for r in lab_rows], y, groups, [ids[r] for r in nonmem],
                              opts.null_fraction, opts.seed, min_groups=max(2, opts.folds))
    info = {k: v for k, v in split.info.items() if k != "calibration_ids"}
    if not split.ok:
        info["null"] = ("every known non-member, also used by selection: the unknown images' p-values are "
                        f"optimistic ({split.info.get('reason')})")
        return lab.copy(), info, nonmem
    cal = set(split.calibration_ids)
    lab_sel = lab.copy()
    lab_sel[lab_rows[~np.asarray(split.selection, dtype=bool)]] = False
    info["null"] = "the known non-members held out of selection"
    return lab_sel, info, np.asarray([r for r in nonmem if ids[r] in cal], dtype=np.int64)


def _select(S, lab, y, names, opts: AuditOptions, groups=None):
    """groups: int [n_lab] near-duplicate groups of the labelled images (None: every image alone)."""
    from ganprint.select import oof_rank_pvalue

    res, score, ref, oof_s, oof_l = _select_impl(S, lab, y, names, opts, groups)
    res["nested"]["p_value"] = oof_rank_pvalue(y, oof_s, groups)
    if groups is not None:
        import numpy as np

        res["nested"]["n_groups"] = int(len(np.unique(groups)))
        res["nested"]["p_value_unit"] = "near-duplicate group (mean out-of-fold score)"
    return res, score, ref, oof_s, oof_l


def _select_impl(S, lab, y, names, opts: AuditOptions, groups=None):
    """Selection on the labelled images; ``ganprint.select`` when it exists, else :func:`select_fallback`.

    S float64 [C, R] (every real image), lab bool [R], y int [n_lab]. Returns (JSON-able dict,
    score float64 [R] of the chosen procedure, ref float64 [R] = the score used for p-values (for
    a fitted combination, labelled images get out-of-fold scores so that the known non-members are
    scored like unseen images), oof_score [n_lab], oof_label [n_lab])."""
    import numpy as np

    try:
        from ganprint import select as SEL
    except ImportError:  # selection not merged: the simple nested-CV rule of this module
        SEL = None
    if SEL is None:
        from ganprint.predict import calibrate_threshold

        res = select_fallback(S[:, lab], y, names, folds=opts.folds, repeats=opts.repeats, seed=opts.seed,
                              bootstrap=opts.bootstrap)
        ci = res["chosen_index"]
        thr, kap = calibrate_threshold(S[ci, lab], y)
        res["procedure"] = {"kind": "single", "name": names[ci], "columns": [ci], "threshold": thr,
                            "train_kappa": kap}
        oof_s, oof_l = res.pop("oof_score"), res.pop("oof_label")
        return res, S[ci].copy(), S[ci].copy(), oof_s, oof_l

    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from ganprint.metrics import evaluate

    X = S.T
    Xl = X[lab]
    cfg = SEL.SelectConfig(folds=opts.folds, repeats=opts.repeats, outer_folds=opts.folds,
                           outer_repeats=max(1, opts.repeats // 2), seed=opts.seed)
    sel = SEL.select(Xl, y, names, cfg, nested=True, groups=groups)
    score = sel.score(X)
    # pooled out-of-fold scores of the whole procedure (one outer repeat) for the ROC and TPR@1%FPR
    k = min(opts.folds, int(min(y.sum(), (1 - y).sum())))
    oof_s = np.zeros(len(y))
    oof_l = np.zeros(len(y), dtype=np.int64)
    ref = score.copy()
    fitted = sel.procedure.kind != "single"
    lab_rows = np.flatnonzero(lab)
    if groups is None:
        outer = StratifiedKFold(n_splits=k, shuffle=True, random_state=opts.seed + 1).split(Xl, y)
    else:
        kg = min(opts.folds, *(len(np.unique(groups[y == c])) for c in (0, 1)))
        outer = StratifiedGroupKFold(n_splits=kg, shuffle=True, random_state=opts.seed + 1).split(Xl, y, groups)
    for tr, te in outer:
        gtr = None if groups is None else groups[tr]
        idx, _, _ = SEL.choose(Xl[tr], y[tr], names, cfg, with_kappa=False, groups=gtr)
        proc = SEL.fit_procedure(Xl[tr], y[tr], idx, names, cfg, groups=gtr)
        s_te = proc.score(Xl[te])
        oof_s[te] = SEL.ecdf_position(np.sort(proc.score(Xl[tr])[y[tr] == 0]), s_te)
        oof_l[te] = (s_te >= proc.threshold).astype(np.int64)
        if fitted:  # the chosen combination, refit without the fold
            ref[lab_rows[te]] = SEL.fit_procedure(Xl[tr], y[tr], sel.choice, names, cfg, groups=gtr).score(Xl[te])
    m = evaluate(y, oof_l, oof_s, bootstrap=opts.bootstrap, seed=opts.seed)
    d = sel.to_dict()
    ne = d["nested"]
    counts = ne.get("choice_counts", {})
    auc_all = {n: _fold_auc(y, Xl[:, j]) for j, n in enumerate(names)}
    res = {
        "method": "ganprint.select: repeated stratified CV ranking, one-SE rule, nested CV estimate",
        "chosen": sel.chosen, "reason": sel.reason, "procedure": d["procedure"],
        "nested": {"auc": ne["auc_mean"], "auc_ci": _clip(ne["auc_ci"], 0.0, 1.0), "kappa": ne["kappa_mean"],
                   "kappa_ci": _clip(ne["kappa_ci"], -1.0, 1.0),
                   "folds": ne["folds"], "repeats": ne["repeats"], "n": int(len(y)), "n_pos": int(y.sum()),
                   "tpr_at_1fpr": m["tpr_at_fpr"], "auc_pooled_oof": m["auc"], "auc_pooled_oof_ci": m["auc_ci"],
                   "choice_counts": counts, "ci_method": ne.get("method")},
        "candidates": [{"name": c["name"], "kind": c["kind"], "cv_auc": c["auc_mean"], "cv_auc_sd": c["auc_sd"],
                        "cv_kappa": c["kappa_mean"], "within_noise": c["within_noise"],
                        "auc_all": auc_all.get(c["name"]), "picked_in_folds": counts.get(c["name"], 0)}
                       for c in d["candidates"]],
        "config": d["config"],
    }
    return res, score, ref, oof_s, oof_l


def _clip(ci, lo: float, hi: float):
    return None if ci is None else [max(lo, float(ci[0])), min(hi, float(ci[1]))]


def _feature_space_of(sel: dict, names: list[str]) -> str:
    """The feature space of the chosen procedure's first (best) column."""
    cols = sel.get("procedure", {}).get("columns") or [0]
    return names[int(cols[0])].split("/")[0]


# ---------------------------------------------------------------------------------------------
# the run


def _emb_key(embs) -> dict:
    return {bb: {role: o.provenance.get("cache_key") for role, o in roles.items()}
            for bb, roles in embs.items()}


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    from ganprint import __version__

    out = {"ganprint": __version__, "python": platform.python_version()}
    for pkg in ("torch", "timm", "numpy", "scikit-learn", "scipy", "opencv-python-headless", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def copying_significant(rep: dict[str, Any], alpha: float = 0.01) -> bool:
    """The dataset-level copying test (ganprint.datacopy.members_copy_test) rejects at ``alpha``."""
    ct = (rep.get("datacopy") or {}).get("copy_test")
    return bool(ct is not None and ct["p"] < alpha)


def verdict_sentence(rep: dict[str, Any], alpha: float = 0.01) -> tuple[str, bool]:
    """(one sentence with the numbers, membership significant?). Membership is significant when the
    chosen procedure's pooled out-of-fold scores rank members above non-members (one-sided
    Mann-Whitney p < alpha over near-duplicate groups, see ``ganprint.groups``; each fold's scores
    come from a procedure fitted without that fold's groups, so under no signal the classes are
    exchangeable). The nested-CV AUC and its CI are shown beside it. Flags are reported, not used:
    under no signal BH may still flag an image with probability up to the FDR level.

    Copying is judged apart (:func:`copying_significant`, same ``alpha``): a generator that emits
    copies of some training images leaks them even when the membership of a typical image cannot
    be told; when the copying test rejects, the sentence starts with it."""
    sel = rep["selection"]["nested"]
    fl = rep["flags"]
    auc, ci, p = sel.get("auc"), sel.get("auc_ci"), sel.get("p_value")
    auc_txt = "AUC n/a" if auc is None else f"AUC {auc:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    p_txt = "" if p is None else f" (out-of-fold rank test p = {p:.2g})"
    what = "unknown" if fl["set"] == "unknown" else "member"
    flag_txt = f"{fl['n_flagged']} of {fl['n_tested']} {what} images flagged at FDR {fl['q'] * 100:g}%"
    dc = rep.get("datacopy") or {}
    cp = dc.get("copies")
    if cp is not None:
        flag_txt += f", {cp['n_verified']} verified copies"
    sig = bool(p is not None and p < alpha)
    mem_txt = ("membership signal" if sig else "no significant membership signal") + f": {auc_txt} by nested CV{p_txt}"
    ct = dc.get("copy_test")
    if ct is None:
        return f"{mem_txt}; {flag_txt}.", sig
    unit = "groups" if ct["unit"] != "image" else "images"
    m = dc["memorisation"]
    mci = m.get("ci")
    rate = f"{m['rate']:.1%}" + (f" [{mci[0]:.1%}, {mci[1]:.1%}]" if mci else "")
    copy_facts = (f"{ct['k']} of {ct['m']} member {unit} have a generated copy aligned better than any of the "
                  f"{ct['n']} known non-member {unit} has (exact p = {ct['p']:.2g})")
    if ct["p"] < alpha:
        return (f"data copying: {copy_facts}; memorisation rate {rate} of {m['n_generated']} generated images; "
                f"{mem_txt}; {flag_txt}.", sig)
    return f"{mem_txt}; no significant data copying: {copy_facts}; {flag_txt}.", sig


def run_audit(out: str | os.PathLike, inputs: AuditInputs, opts: AuditOptions | None = None, *,
              progress: bool = True, log: Callable[[str], None] | None = None,
              command: str | None = None) -> AuditResult:
    """Run every stage (see the module docstring) and write the run folder ``out``."""
    import numpy as np
    import pandas as pd

    opts = opts or AuditOptions()
    opts.check()
    st = _Stages(log)
    t_all = time.perf_counter()
    st.start("inputs", "listing and checking images")
    list_images(inputs)
    counts = {role: len(recs) for role, recs in inputs.records.items()}
    run = RunDir(out)  # checks --out before anything is written
    st.done(note=", ".join(f"{r} {n}" for r, n in counts.items()))
    run.open()
    cache = StageCache(run.cache)

    kind = opts.local_kind()
    st.start("embed", f"feature spaces {', '.join(opts.global_backbones())}"
                      + (f" + {kind} local features (verification)" if kind else " (no verification: OpenCV or "
                         "ganprint.verify missing)" if opts.verify else ""))
    embs = _embed_all(inputs, opts, run, progress)
    st.done(cached=all(o.reused for r in embs.values() for o in r.values()))
    realset, gens = _real_set(embs, inputs)
    tab = realset.table
    emb_key = _emb_key(embs)

    st.start("similarity+attacks", "every attack on every feature space (candidates)")
    ckey = _digest({"f": AUDIT_FORMAT + 1, "emb": emb_key, "k": opts.k, "seed": opts.seed, "verify_k": opts.verify_k,
                    "two_generators": inputs.test_generated is not None})

    def compute_candidates():
        import torch

        S, names, nn, vinfo, notes = _candidates(realset, gens, inputs, opts, embs)
        tens = {"scores": torch.as_tensor(S)}
        for bb, (i, v) in nn.items():
            tens[f"nn_idx.{bb}"] = torch.as_tensor(i)
            tens[f"nn_val.{bb}"] = torch.as_tensor(v)
        return tens, {"names": names, "notes": notes, "verify": vinfo}

    ctens, cmeta, hit = cache.get_or_compute("candidates", ckey, compute_candidates)
    S = ctens["scores"].numpy().astype(np.float64)
    names = cmeta["names"]
    st.done(cached=hit, note=f"{len(names)} candidates")

    st.start("selection", f"{opts.repeats}x{opts.folds}-fold CV ranking, nested "
                          f"{max(1, opts.repeats // 2)}x{opts.folds}-fold estimate")
    lab = tab["label"].notna().to_numpy()
    y = tab["label"].to_numpy(dtype="float64", na_value=np.nan)[lab].astype(np.int64)
    import importlib.util

    from ganprint.groups import near_duplicate_groups

    # neighbouring slices of one patient are near-duplicates: CV keeps them together and the
    # verdict's rank test counts each group once (see ganprint.groups)
    groups = near_duplicate_groups([realset.emb[b][np.flatnonzero(lab)].numpy() for b in opts.global_backbones()])
    lab_sel, split_info, null_rows = _membership_null(tab, lab, y, groups, opts, bool(counts.get("unknown")))
    in_sel = lab_sel[np.flatnonzero(lab)]
    skey = _digest({"c": ckey, "select": importlib.util.find_spec("ganprint.select") is not None,
                    "folds": opts.folds, "repeats": opts.repeats, "seed": opts.seed, "bootstrap": opts.bootstrap,
                    "groups": "near_duplicate_groups/v1", "split": split_info})

    def compute_selection():
        import torch

        sel, score, ref, oof_s, oof_l = _select(S, lab_sel, y[in_sel], names, opts,
                                                None if groups is None else np.asarray(groups)[in_sel])
        tens = {"oof_score": torch.as_tensor(np.asarray(oof_s, dtype=np.float64)),
                "oof_label": torch.as_tensor(np.asarray(oof_l, dtype=np.int64)),
                "score": torch.as_tensor(score), "ref": torch.as_tensor(ref)}
        return tens, sel

    stens, sel, hit = cache.get_or_compute("selection", skey, compute_selection)
    sel = {**sel, "calibration_split": split_info}
    auc_txt = "n/a" if sel["nested"]["auc"] is None else f"{sel['nested']['auc']:.3f}"
    st.done(cached=hit, note=f"chosen {sel['chosen']}, nested AUC {auc_txt}")

    st.start("pvalues", f"conformal p-values vs {len(null_rows)} known non-members, BH at {opts.fdr:g}")
    score = stens["score"].numpy().astype(np.float64)
    ref_score = stens["ref"].numpy().astype(np.float64)
    nonmem = np.flatnonzero((tab["role"] == "non_members").to_numpy())
    self_in_ref = np.full(len(tab), -1)
    self_in_ref[null_rows] = np.arange(len(null_rows))
    pvals = np.where(lab, conformal_pvalues(ref_score, ref_score[null_rows], self_in_ref),
                     conformal_pvalues(score, ref_score[null_rows]))
    target_role = "unknown" if counts.get("unknown") else "members"
    target = (tab["role"] == target_role).to_numpy()
    qvals = np.full(len(tab), np.nan)
    flags = np.zeros(len(tab), dtype=bool)
    qvals[target], flags[target] = bh_flags(pvals[target], opts.fdr)
    thr = float(sel["procedure"]["threshold"])
    dev_kappa = sel["procedure"].get("train_kappa")
    label_pred = (score >= thr).astype(np.int64) if opts.decision == "calibrate" else flags.astype(np.int64)
    st.done(note=f"{int(flags.sum())} of {int(target.sum())} {target_role} flagged")

    st.start("datacopy", "Meehan et al. C_T test; aligned-copy verification; copying test, memorisation rate")
    from ganprint.datacopy import data_copying_test, memorisation_rate

    bb0 = _feature_space_of(sel, names)
    if bb0 not in realset.emb:  # a local-feature candidate: its shortlist's global space
        bb0 = opts.global_backbones()[-1]
    aligned = opts.verify and _cv2_available()
    dkey = _digest({"emb": emb_key, "seed": opts.seed, "bootstrap": opts.bootstrap, "bb": bb0, "c": ckey,
                    "copy_k": opts.copy_k, "fdr": opts.fdr, "target": target_role, "aligned": aligned,
                    "groups": "near_duplicate_groups/v1", "v": 2})

    def compute_datacopy():
        import torch

        mem = torch.as_tensor(np.flatnonzero((tab["role"] == "members").to_numpy()))
        x = realset.emb[bb0]
        gen = gens[bb0]["generated"]
        res = {"ct": data_copying_test(x[mem], x[torch.as_tensor(nonmem)], gen, seed=opts.seed,
                                       bootstrap=min(opts.bootstrap, 500))}
        tens = {}
        if aligned:
            tens, extra = _copy_stage(realset, gens, inputs, opts, embs, ctens, target_role, groups)
            res.update(extra)
        else:  # no OpenCV: the global-distance rule
            res["memorisation"] = memorisation_rate(x[mem], x[torch.as_tensor(nonmem)], gen)
        res["feature_space"] = bb0
        return tens, res

    dtens, dcopy, hit = cache.get_or_compute("datacopy", dkey, compute_datacopy)
    ctest = dcopy.get("copy_test")
    st.done(cached=hit, note=f"C_T z {dcopy['ct']['z']:.2f}, p {dcopy['ct']['p']:.3g}; memorisation "
                             f"{dcopy['memorisation']['rate']:.3f}"
                             + ("" if ctest is None else f"; copying test {ctest['k']} of {ctest['m']}, "
                                                         f"p {ctest['p']:.3g}"))

    st.start("report", "scores.parquet, submission.csv, figures, report.json, report.html")
    scores_df = pd.DataFrame({
        "image_id": tab["image_id"], "role": tab["role"], "split": tab["split"], "label": tab["label"],
        "score": score, "p_value": pvals, "q_value": qvals, "flag": flags, "label_pred": label_pred.astype(np.int8),
    })
    oof = np.full(len(tab), np.nan)
    oof[lab_sel] = stens["oof_score"].numpy()
    scores_df["oof_score"] = oof
    for c, name in enumerate(names):
        scores_df[f"cand:{name}"] = S[c]
    submission = None
    if counts.get("unknown"):
        from ganprint.submission import write_submission

        unk = tab["role"] == "unknown"
        ids = tab["image_id"][unk].tolist()
        submission = write_submission(run.path / "submission.csv", ids, label_pred[unk.to_numpy()].tolist(),
                                      expected=ids)
    chosen_bb = _feature_space_of(sel, names)
    nn_idx = ctens.get(f"nn_idx.{chosen_bb}")
    nn_val = ctens.get(f"nn_val.{chosen_bb}")
    if nn_idx is None:
        chosen_bb = opts.global_backbones()[-1]
        nn_idx, nn_val = ctens[f"nn_idx.{chosen_bb}"], ctens[f"nn_val.{chosen_bb}"]
    report: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "layout": inputs.layout,
        "inputs": {r: str(p) for r, p in inputs.folders().items()},
        "counts": counts,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()},
        "selection": sel,
        "candidate_notes": cmeta.get("notes", []),
        "decision": {"rule": opts.decision, "threshold": thr, "labelled_kappa_in_sample": dev_kappa},
        "flags": {"q": opts.fdr, "set": target_role, "n_tested": int(target.sum()), "n_flagged": int(flags.sum()),
                  "method": "conformal p-values vs known non-members, Benjamini-Hochberg (scipy)",
                  "n_null": int(len(null_rows)), "null": split_info.get("null"),
                  "note": None if inputs.test_generated is None else (
                      "the unknown images are scored against test/generated, the known non-members against "
                      "dev/generated: their p-values assume both generated sets come from the same generator")},
        "datacopy": dcopy,
        "submission": None if submission is None else "submission.csv",
        "provenance": {
            "versions": _versions(), "command": command, "seed": opts.seed,
            "backbones": {bb: {k: embs[bb]["generated"].provenance.get(k)
                               for k in ("backbone", "timm_name", "weights", "weights_digest", "preprocess", "local")
                               if embs[bb]["generated"].provenance.get(k) is not None}
                          for bb in embs},
            "verification": cmeta.get("verify") or None,
            "inputs_hash": {bb: {r: o.provenance.get("inputs_hash") for r, o in roles.items()}
                            for bb, roles in embs.items()},
        },
    }
    report["verdict"], report["significant"] = verdict_sentence(report)
    report["copying"] = copying_significant(report)
    from ganprint.report import build_gallery, render_run

    gen_paths = _gen_paths(embs, opts)
    copies = None
    if "stat" in dtens:
        copies = {k: v.numpy() for k, v in dtens.items()}
        scores_df["copy_stat"] = copies["stat"]
        scores_df["copy_p"] = copies["p"]
        scores_df["copy_q"] = copies["q"]
        scores_df["verified_copy"] = copies["copy"].astype(bool)
    report["gallery"] = build_gallery(run.path / "figures" / "gallery", scores_df, tab, gen_paths,
                                      nn_idx.numpy(), nn_val.numpy(), n=opts.gallery, target_role=target_role,
                                      verify_kind=opts.local_kind(),
                                      value_name="inliers" if _is_local(chosen_bb) else "cosine", copies=copies,
                                      copy_min_p=(dcopy.get("copies") or {}).get("min_p"))
    _write_scores(run.path / "scores.parquet", scores_df, report)
    st.done()
    report["stages_seconds"] = {k: round(v, 3) for k, v in st.seconds.items()}
    report["stages_cached"] = st.cached
    report["seconds_total"] = round(time.perf_counter() - t_all, 3)
    render_run(run.path, report)
    final = run.commit()
    return AuditResult(final, report)


def _write_scores(path: Path, df, report: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ganprint.artifacts import base_provenance

    prov = base_provenance("audit_scores", "audit", rows=len(df), chosen=report["selection"]["chosen"],
                           fdr=report["flags"]["q"], decision=report["decision"])
    arrow = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[b"ganprint"] = json.dumps(prov, sort_keys=True, default=float).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(arrow.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)


def summary(result: AuditResult) -> dict[str, Any]:
    """The JSON summary ``ganprint audit --json`` prints."""
    r = result.report
    return {
        "run": str(result.run), "report": str(result.html), "verdict": r["verdict"], "significant": r["significant"],
        "chosen": r["selection"]["chosen"], "nested": r["selection"]["nested"], "flags": r["flags"],
        "copying": r.get("copying"),
        "datacopy": {k: r["datacopy"][k] for k in ("ct", "memorisation", "copy_test", "copies") if k in r["datacopy"]},
        "submission": None if r["submission"] is None else str(result.run / r["submission"]),
        "stages_seconds": r["stages_seconds"], "counts": r["counts"],
    }
