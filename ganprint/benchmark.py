"""Side-by-side evaluation on an ImageCLEF-layout dataset with known test truth.

Used by ``ganprint demo`` and ``bench/quality.py``.  For one dataset root (``dev/`` labelled,
``test/`` + ``test_truth.csv``), each *feature set* (a backbone, optionally a fine-tuned
checkpoint, or a fusion) is embedded for dev and test, turned into similarity artifacts, and every
attack is calibrated on dev (the cut that maximises Cohen's kappa on dev) and applied to test.
The seed's rule (max cosine >= 0.6) is evaluated as its own row.  Rows hold test kappa, AUC,
TPR at 1% FPR and bootstrap CIs, so every claim is a comparison from one run.

Row dict keys: ``features, attack, rule, kappa, kappa_ci, auc, auc_ci, tpr_at_1fpr, accuracy,
dev_kappa, threshold, n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganprint.errors import GanprintError

SEED_THRESHOLD = 0.6


@dataclass
class FeatureSet:
    """Embeddings artifacts of one feature space for the dev and the test split."""

    name: str
    dev: Path
    test: Path
    dev_sim: Path | None = None
    test_sim: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_truth(root: Path) -> dict[str, int]:
    from ganprint.metrics import load_truth

    path = Path(root) / "test_truth.csv"
    if not path.exists():
        raise GanprintError(f"{path}: missing; the benchmark needs test truth (made by `ganprint synth`)")
    ids, labels, _ = load_truth(str(path))
    return {i: int(v) for i, v in zip(ids, labels)}


def embed_split(root: Path, work: Path, name: str, backbone: str, *, image_size: int | None = None,
                weights: str | None = None, checkpoint: str | None = None, batch_size: int = 32,
                progress: bool = True) -> FeatureSet:
    from ganprint.embed import run_embed

    work.mkdir(parents=True, exist_ok=True)
    outs = {}
    for split in ("dev", "test"):
        res = run_embed([str(Path(root) / split)], work / f"{name}_{split}", backbone=backbone, weights=weights,
                        image_size=image_size, checkpoint=checkpoint, batch_size=batch_size, progress=progress)
        outs[split] = res.base
    return FeatureSet(name, outs["dev"], outs["test"])


def add_similarity(fs: FeatureSet, work: Path) -> FeatureSet:
    """simmatrix for dev and test (generated x real, real x real for calibrated attacks)."""
    from ganprint.similarity import run_simmatrix

    fs.dev_sim = run_simmatrix(work / f"{fs.name}_dev_sim", dataset=fs.dev, device="cpu").base
    fs.test_sim = run_simmatrix(work / f"{fs.name}_test_sim", dataset=fs.test, device="cpu").base
    return fs


def add_verified(fs: FeatureSet, root: Path, work: Path, kind: str = "sift", k: int = 50,
                 max_keypoints: int = 400, progress: bool = False,
                 inputs: dict[str, list[str]] | None = None) -> FeatureSet:
    """``fs`` with geometric verification: local features (``embed --backbone kind``) of dev and
    test, and similarity artifacts ``simmatrix --verify`` whose shortlist is ``fs``'s global top-k.

    ``inputs``: the folders ``fs`` embedded per split (``{"dev": [...], "test": [...]}``; default
    ROOT/dev and ROOT/test), so the local artifacts hold the same images."""
    from ganprint.embed import run_embed
    from ganprint.similarity import run_simmatrix

    # "register" / "register16": registration on raw-pixel grids (default 32 px); else local features
    how = ({"backbone": "pixels", "image_size": int(kind[8:] or 32)} if kind.startswith("register")
           else {"backbone": kind, "max_keypoints": max_keypoints})
    dirs = inputs or {split: [str(Path(root) / split)] for split in ("dev", "test")}
    local = {split: run_embed(list(dirs[split]), work / f"{kind}_{split}", **how, progress=progress).base
             for split in ("dev", "test")}
    name = f"{fs.name}+verify({kind})"
    out = FeatureSet(name, fs.dev, fs.test, extra={"local": local})
    tag = name.replace("(", "_").replace(")", "").replace("+", "_")
    out.dev_sim = run_simmatrix(work / f"{tag}_dev_sim", dataset=fs.dev, device="cpu", verify=[str(local["dev"])],
                                verify_k=k).base
    out.test_sim = run_simmatrix(work / f"{tag}_test_sim", dataset=fs.test, device="cpu",
                                 verify=[str(local["test"])], verify_k=k).base
    return out


def _row(fs_name: str, attack: str, rule: str, pred, truth: dict[str, int], bootstrap: int) -> dict[str, Any]:
    import numpy as np

    from ganprint.metrics import evaluate

    keep = [i for i, x in enumerate(pred.image_ids) if x in truth]
    if not keep:
        raise GanprintError("no test image id matches test_truth.csv; the dataset and its truth disagree")
    y = np.array([truth[pred.image_ids[i]] for i in keep])
    m = evaluate(y, np.asarray(pred.labels)[keep], np.asarray(pred.scores)[keep], bootstrap=bootstrap, seed=0)
    d = pred.decision
    return {
        "features": fs_name, "attack": attack, "rule": rule, "n": m["n"],
        "kappa": m["kappa"], "kappa_ci": m.get("kappa_ci"), "auc": m["auc"], "auc_ci": m.get("auc_ci"),
        "tpr_at_1fpr": m["tpr_at_fpr"], "accuracy": m["accuracy"],
        "dev_kappa": d.dev_kappa, "threshold": d.threshold,
        "_y": y, "_scores": np.asarray(pred.scores)[keep],  # for plots; not serialised
    }


def attack_rows(fs: FeatureSet, truth: dict[str, int], attacks: list[str] | None = None, *,
                seed_rule: bool = False, bootstrap: int = 500, scores_dir: Path | None = None) -> list[dict]:
    """Every attack calibrated on dev, applied to test; plus the seed's fixed-cut row if asked.

    With ``scores_dir``, dev and test scores artifacts are written there (for stacking)."""
    from ganprint.attacks import attack_names
    from ganprint.predict import predict, write_scores

    if fs.dev_sim is None or fs.test_sim is None:
        raise GanprintError(f"{fs.name}: similarity artifacts missing; call add_similarity first")
    rows = []
    if not attacks:  # every attack whose tensors the artifacts have (verify_* only with --verify)
        from ganprint.artifacts import read_artifact

        attacks = attack_names(read_artifact(fs.test_sim, with_table=False).tensors)
    for attack in attacks:
        pred = predict(fs.test_sim, attack, calibrate=fs.dev_sim)
        rows.append(_row(fs.name, attack, "dev-calibrated", pred, truth, bootstrap))
        if scores_dir is not None:
            scores_dir.mkdir(parents=True, exist_ok=True)
            dev_pred = predict(fs.dev_sim, attack, balanced=True)
            fs.extra.setdefault("scores", []).append((
                write_scores(dev_pred, scores_dir / f"{fs.name}_{attack}_dev"),
                write_scores(pred, scores_dir / f"{fs.name}_{attack}_test"),
            ))
    if seed_rule:
        pred = predict(fs.test_sim, "max_sim", threshold=SEED_THRESHOLD)
        rows.append(_row(fs.name, "max_sim", f"seed: cut {SEED_THRESHOLD}", pred, truth, bootstrap))
    return rows


def stack_row(feature_sets: list[FeatureSet], truth: dict[str, int], work: Path, *, bootstrap: int = 500) -> dict:
    """Logistic-regression stacking over every (feature set, attack) score written by attack_rows."""
    import numpy as np

    from ganprint.artifacts import read_artifact
    from ganprint.fusion import stack_scores
    from ganprint.metrics import evaluate

    pairs = [p for fs in feature_sets for p in fs.extra.get("scores", [])]
    if len(pairs) < 2:
        raise GanprintError("stacking needs at least two score sets; run attack_rows with scores_dir")
    res = stack_scores([d for d, _ in pairs], [t for _, t in pairs], work / "stack_test", rule="kappa")
    art = read_artifact(work / "stack_test", kind="scores")
    ids = [str(i) for i in art.table["image_id"]]
    keep = [i for i, x in enumerate(ids) if x in truth]
    y = np.array([truth[ids[i]] for i in keep])
    m = evaluate(y, art.table["label_pred"].to_numpy()[keep], art.table["score"].to_numpy()[keep],
                 bootstrap=bootstrap, seed=0)
    return {
        "features": "stack(" + "+".join(fs.name for fs in feature_sets) + ")", "attack": "logistic regression",
        "rule": "dev-calibrated (CV)", "n": m["n"], "kappa": m["kappa"],
        "kappa_ci": m.get("kappa_ci"), "auc": m["auc"], "auc_ci": m.get("auc_ci"),
        "tpr_at_1fpr": m["tpr_at_fpr"], "accuracy": m["accuracy"], "dev_kappa": getattr(res, "dev_cv_kappa", None),
        "threshold": getattr(res, "threshold", None),
    }


def moe_features(feature_sets: list[FeatureSet], work: Path, *, steps: int | None = None, seed: int = 0,
                 progress: bool = False, threads: int = 1) -> FeatureSet:
    """Train the MoE fusion on the dev embeddings of ``feature_sets``, apply it to test.

    One thread by default: the fusion model is small, and on 2 cores a second torch thread
    slowed its training down several-fold."""
    from ganprint.fusion import apply_moe, train_moe

    name = "moe(" + "+".join(fs.name for fs in feature_sets) + ")"
    overrides: dict[str, Any] = {"seed": seed}
    if steps is not None:
        overrides["steps"] = steps
    tr = train_moe([fs.dev for fs in feature_sets], work / "moe_weights.safetensors", out=work / "moe_dev",
                   progress=progress, threads=threads, **overrides)
    ap = apply_moe(tr.weights, [fs.test for fs in feature_sets], work / "moe_test")
    return FeatureSet(name, Path(tr.fused), Path(ap.fused), extra={"mean_gate": tr.mean_gate})


def public(row: dict) -> dict:
    """A row without its private arrays (JSON-able)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def format_table(rows: list[dict], title: str | None = None):
    """A rich Table of rows (kappa with CI, AUC with CI, TPR@1%FPR)."""
    from rich.table import Table

    def f(v, nd=3):
        return "—" if v is None else f"{v:.{nd}f}"

    def ci(v):
        return "" if not v or v[0] is None else f" [{v[0]:.2f}, {v[1]:.2f}]"

    t = Table("features", "attack", "rule", "κ test [95% CI]", "AUC test [95% CI]", "TPR@1%FPR", "dev κ", title=title)
    for r in rows:
        t.add_row(r["features"], r["attack"], r["rule"], f(r["kappa"]) + ci(r.get("kappa_ci")),
                  f(r["auc"]) + ci(r.get("auc_ci")), f(r["tpr_at_1fpr"]), f(r.get("dev_kappa")))
    return t


def markdown_table(rows: list[dict]) -> str:
    def f(v):
        return "—" if v is None else f"{v:.3f}"

    def ci(v):
        return "" if not v or v[0] is None else f" [{v[0]:.2f}, {v[1]:.2f}]"

    lines = ["| regime | features | attack | rule | κ test [95% CI] | AUC test [95% CI] | TPR@1%FPR | dev κ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('regime', '')} | {r['features']} | {r['attack']} | {r['rule']} | {f(r['kappa'])}{ci(r.get('kappa_ci'))} "
                     f"| {f(r['auc'])}{ci(r.get('auc_ci'))} | {f(r['tpr_at_1fpr'])} | {f(r.get('dev_kappa'))} |")
    return "\n".join(lines)
