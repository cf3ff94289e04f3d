"""``ganprint demo``: runnable showcases on data that ships with the dependencies.

``dicom_neighbours``: embed real CT/MR/X-ray DICOM files bundled by pydicom-data, plus a
horizontally flipped copy of each, with the offline ImageNet backbone; each original's nearest
neighbour should be its own flip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ganprint.errors import GanprintError

DICOM_DEMO_FILES = (
    "693_UNCI.dcm", "MR2_UNCI.dcm", "RG1_UNCI.dcm", "RG3_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "JPEG2000_UNC.dcm", "vlut_04.dcm", "CT_small.dcm",
)


def pydicom_data_dir() -> Path:
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        raise GanprintError("the demo needs the package pydicom-data; pip install pydicom-data")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def dicom_neighbours(out: Path, backbone: str = "efficientnet_lite0", progress: bool = True) -> list[dict]:
    """Write originals + flips as DICOM under ``out/dicom``, embed, and return one row per original:
    ``{image, modality, nearest, cosine, flip_rank}`` (flip_rank 1 = its flip is the nearest)."""
    import numpy as np
    import pydicom
    import pydicom.data
    import torch

    from ganprint.artifacts import read_artifact
    from ganprint.embed import run_embed

    src = pydicom_data_dir()
    folder = out / "dicom"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)  # the demo's own folder: stale files would join the embedding
    folder.mkdir(parents=True)
    modality = {}
    for name in DICOM_DEMO_FILES:
        f = src / name
        if not f.exists():
            f = Path(pydicom.data.get_testdata_file(name, download=False) or "")
        if not f.is_file():
            continue
        ds = pydicom.dcmread(f)
        modality[f.stem] = str(ds.get("Modality", "?"))
        (folder / f.name).write_bytes(f.read_bytes())
        arr = ds.pixel_array
        ds.PixelData = np.ascontiguousarray(arr[..., ::-1]).tobytes()
        ds.save_as(folder / f"{f.stem}_flip.dcm")
    res = run_embed([str(folder)], out / "dicom_emb", backbone=backbone, progress=progress)
    art = read_artifact(res.base)
    x = torch.nn.functional.normalize(art.tensor("embeddings"), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    ids = list(art.table.image_id)
    rows = []
    for i, name in enumerate(ids):
        if name.endswith("_flip"):
            continue
        j = int(sim[i].argmax())
        order = sim[i].argsort(descending=True).tolist()
        rows.append({
            "image": name, "modality": modality.get(name, "?"), "nearest": ids[j],
            "cosine": round(float(sim[i, j]), 4), "flip_rank": order.index(ids.index(name + "_flip")) + 1,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# the full pipeline on a synthetic benchmark

DEMO_SYNTH = {"regime": "memorize", "dev_generated": 300, "test_generated": 300}
DEMO_BACKBONES = ("efficientnet_lite0", "pixels")


def _synth_once(root: Path, overrides: dict, progress: bool) -> None:
    """Build the demo dataset unless ``root`` already holds one made with the same parameters."""
    import json

    from ganprint.synth.dataset import resolve_config, run_synth

    cfg = resolve_config(**overrides)
    meta = root / "synth.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except ValueError:
            old = {}
        from dataclasses import asdict

        if old.get("config") == json.loads(json.dumps(asdict(cfg))):
            return
    run_synth(root, cfg, force=True, progress=progress)


def full_demo(out: Path, backbones=DEMO_BACKBONES, synth: dict | None = None, bootstrap: int = 500,
              progress: bool = True, log=None, moe_steps: int | None = None, audit: bool = True) -> dict:
    """synth (small, memorize) -> embed with each backbone -> simmatrix -> every attack calibrated
    on dev -> predict on test -> score; plus the seed's fixed cut, stacking and the MoE fusion;
    then (``audit``) ``ganprint audit`` of the same benchmark, its test labels scored against the truth.

    Returns ``{"rows": [...], "plot": path, "best": row, "audit": AuditResult | None,
    "audit_test": metrics of the audit's test scores | None}``; artifacts stay under ``out``."""
    import json

    from ganprint import benchmark as B
    from ganprint.metrics import plot_scores

    say = log or (lambda m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root, work = out / "data", out / "work"
    say("1/6 synth: DCGAN trained on known members (memorize regime)")
    _synth_once(root, {**DEMO_SYNTH, **(synth or {})}, progress)
    truth = B.read_truth(root)
    sets, rows = [], []
    for bb in backbones:
        say(f"2/6 embed + simmatrix: {bb}")
        fs = B.add_similarity(B.embed_split(root, work, bb, bb, progress=progress), work)
        sets.append(fs)
        say(f"3/6 attacks: {bb}")
        rows += B.attack_rows(fs, truth, seed_rule=(bb == backbones[0]), bootstrap=bootstrap,
                              scores_dir=work / "scores")
    if len(sets) >= 2:
        say("4/6 fusion: stacking and mixture of experts")
        rows.append(B.stack_row(sets, truth, work, bootstrap=bootstrap))
        moe = B.add_similarity(B.moe_features(sets, work, steps=moe_steps), work)
        rows += B.attack_rows(moe, truth, ["max_sim", "gan_leaks_cal"], bootstrap=bootstrap)
    say("5/6 score")
    scored = [r for r in rows if r["auc"] is not None]
    best = max(scored, key=lambda r: r["auc"])
    plot = out / "best_roc.png"
    plot_scores(plot, best["_y"], best["_scores"], title=f"{best['features']} / {best['attack']} (test)")
    public = [B.public(r) for r in rows]
    (out / "results.json").write_text(json.dumps(public, indent=2, default=float))
    (out / "results.md").write_text(B.markdown_table(public) + "\n")
    res = {"rows": rows, "plot": plot, "best": best, "audit": None, "audit_test": None}
    if audit:
        say("6/6 audit: `ganprint audit` of the same benchmark (selection, p-values, FDR, report)")
        res["audit"], res["audit_test"] = _audit(root, out / "audit", backbones, truth, bootstrap, progress, log)
    return res


def _audit(root: Path, run: Path, backbones, truth: dict[str, int], bootstrap: int, progress: bool, log):
    """ganprint audit of ``root``; its test scores and labels scored against the benchmark's truth."""
    import numpy as np
    import pandas as pd

    from ganprint.audit import AuditOptions, resolve_inputs, run_audit
    from ganprint.metrics import evaluate

    res = run_audit(run, resolve_inputs(root), AuditOptions(backbones=tuple(backbones), bootstrap=bootstrap),
                    progress=progress, log=log, command=f"ganprint audit {root} --out {run}")
    df = pd.read_parquet(run / "scores.parquet")
    unk = df[(df.role == "unknown") & df.image_id.isin(list(truth))]
    y = np.array([truth[i] for i in unk.image_id])
    m = evaluate(y, unk.label_pred.to_numpy(), unk.score.to_numpy(), bootstrap=bootstrap, seed=0)
    flagged = unk.flag.to_numpy(dtype=bool)
    m["flagged"] = int(flagged.sum())
    m["flagged_members"] = int((flagged & (y == 1)).sum())
    return res, m
