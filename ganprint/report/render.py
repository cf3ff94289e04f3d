"""report.json + figures + report.html of an audit run (one self-contained HTML file: images
inlined as base64, CSS inline, no network)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

from ganprint.errors import GanprintError

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f23;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
.verdict{font-size:18px;padding:14px 18px;border-radius:6px;background:#fff;border-left:6px solid #999}
.verdict.sig{border-color:#c0392b} .verdict.null{border-color:#2e86c1}
.muted{color:#5f6b76;font-size:12.5px}
.grid{display:flex;flex-wrap:wrap;gap:12px} .grid figure{margin:0;background:#fff;padding:6px;border-radius:6px}
.grid figure img{width:340px;display:block}
table{border-collapse:collapse;background:#fff;font-size:13px} th,td{padding:4px 8px;border-bottom:1px solid #e3e7eb;text-align:left}
th{cursor:pointer;background:#eef1f4;user-select:none} tr.chosen td{background:#fff6d6;font-weight:600}
.card{background:#fff;border-radius:6px;padding:10px;margin:0 0 12px;display:flex;gap:14px;align-items:flex-start}
.card .head{width:170px;font-size:12.5px} .card img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccd}
.match{display:flex;gap:4px;flex-direction:column;font-size:11.5px;text-align:center}
.pair{display:flex;gap:4px} .flag{color:#c0392b;font-weight:700}
.badge{display:inline-block;padding:1px 6px;border-radius:3px;font-weight:700;font-size:12px;margin:2px 0}
.badge.copy{background:#c0392b;color:#fff} .badge.cand{background:#f5cba7;color:#6e2c00} .badge.flagged{background:#fadbd8;color:#922b21} .kv td:first-child{color:#5f6b76}
code{font-size:12px;background:#eef1f4;padding:1px 4px;border-radius:3px}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){th.addEventListener('click', function(){
 var tb=th.closest('table').tBodies[0], rows=Array.from(tb.rows), asc=th.dataset.asc!=='1'; th.dataset.asc=asc?'1':'0';
 rows.sort(function(a,b){var x=a.cells[col].dataset.v||a.cells[col].textContent, y=b.cells[col].dataset.v||b.cells[col].textContent;
  var nx=parseFloat(x), ny=parseFloat(y); var c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny; return asc?c:-c;});
 rows.forEach(function(r){tb.appendChild(r);});});});
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _f(v, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{nd}f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _img(path: Path, alt: str, cls: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _angle_scale(t):
    a, b, tx, c, d, ty = t
    return math.degrees(math.atan2(-c, a)), math.hypot(a, c), tx, ty  # ganprint.verify's angle convention


def _transform_text(m: dict) -> str:
    """The recovered transform (real -> generated pixels) and the alignment used for the difference."""
    parts = []
    t = m.get("transform")
    if m.get("inliers") is None and not m.get("alignment"):
        return "no verification available (unaligned difference)"
    if m.get("inliers") is None:
        pass
    elif t:
        ang, sc, tx, ty = _angle_scale(t)
        parts.append(f"verified fit: rotation {ang:+.1f}°, scale {sc:.2f}, shift ({tx:+.1f}, {ty:+.1f}) px of "
                     f"{m.get('frame')} px")
    else:
        parts.append("no verified fit")
    al = m.get("alignment")
    if al:
        ang, _, tx, ty = _angle_scale(al["warp"])
        f = float(al.get("frame") or 128)
        parts.append(f"aligned (ECC from {al['from']}): rotation {ang:+.1f}°, shift "
                     f"({100 * tx / f:+.1f}%, {100 * ty / f:+.1f}%)")
    return "; ".join(parts)


def draw_figures(run: Path, report: dict[str, Any]) -> dict[str, str]:
    import numpy as np
    import pandas as pd

    import ganprint.report.figures as F

    df = pd.read_parquet(run / "scores.parquet")
    fig = run / "figures"
    fig.mkdir(exist_ok=True)
    # labelled images with an out-of-fold score: the ones selection used (held-out calibration
    # non-members have none)
    lab = (df["label"].notna() & df["oof_score"].notna()).to_numpy()
    nested = report["selection"]["nested"]
    opts = report.get("options", {})
    F.roc_band(fig / "roc.png", df["label"][lab].astype(int).to_numpy(), df["oof_score"][lab].to_numpy(),
               bootstrap=min(int(opts.get("bootstrap", 200)), 300), seed=int(opts.get("seed", 0)),
               auc=nested.get("auc"), auc_ci=nested.get("auc_ci"))
    F.score_hist(fig / "scores.png", df["score"].to_numpy(), df["role"].to_numpy(),
                 title=f"scores of {report['selection']['chosen']}")
    F.pvalue_hist(fig / "pvalues.png", df["p_value"].to_numpy(dtype=np.float64), df["role"].to_numpy(),
                  report["flags"]["q"])
    return {"roc": "figures/roc.png", "scores": "figures/scores.png", "pvalues": "figures/pvalues.png"}


def _badge(c: dict, q: float | None) -> str:
    ev = c.get("evidence")
    if ev == "verified copy":
        return (f'<span class="badge copy">verified copy</span><br>copy p {_f(c.get("copy_p"), 4)}, '
                f'BH q {_f(c.get("copy_q"), 4)} ≤ {q:g}')
    if ev == "copy candidate":
        return (f'<span class="badge cand">copy candidate</span><br>aligned better than every known non-member '
                f'(copy p {_f(c.get("copy_p"), 4)}), not significant after BH (q {_f(c.get("copy_q"), 3)})')
    if ev == "flagged":
        return '<span class="badge flagged">flagged member</span>'
    if c.get("copy_p") is not None:
        return f'copy p {_f(c.get("copy_p"), 3)}: no copy shown'
    return ""


def _gallery_html(run: Path, cards: list[dict], q: float = 0.1) -> str:
    if not cards:
        return '<p class="muted">No image to show.</p>'
    g = run / "figures" / "gallery"
    out = []
    for c in cards:
        flag = '<span class="flag">flagged</span>' if c["flag"] else "not flagged"
        truth = "" if c.get("label") is None else f"<br>truth: {'member' if c['label'] else 'non-member'}"
        stat = "" if c.get("copy_stat") is None else f"<br>best aligned correlation {_f(c['copy_stat'], 4)}"
        head = (f'<div class="head"><b>{_e(c["image_id"])}</b><br>{_badge(c, q)}<br>{_e(c["role"])}, {flag}'
                f'<br>score {_f(c["score"])}<br>p {_f(c["p_value"], 4)}, q {_f(c["q_value"], 4)}{stat}{truth}</div>')
        cells = [f'<div class="match">{_img(g / c["real"], "real " + c["image_id"], "gallery")}<span>real</span></div>']
        for m in c["matches"]:
            inl = "—" if m.get("inliers") is None else str(m["inliers"])
            cells.append(
                f'<div class="match"><div class="pair">{_img(g / m["img"], "generated " + m["generated"], "gallery")}'
                f'{_img(g / m["diff"], "difference " + m["generated"], "gallery")}</div>'
                f'<span>{_e(m["generated"])}: {_e(m.get("value_name", "sim"))} {_f(m.get("value", m.get("similarity")))}, '
                f'inliers {inl}</span><span class="muted">{_e(_transform_text(m))}</span></div>')
        cls = " copy" if c.get("evidence") == "verified copy" else ""
        out.append(f'<div class="card{cls}" data-evidence="{_e(c.get("evidence") or "")}">{head}{"".join(cells)}</div>')
    return "\n".join(out)


def _copies_sentence(dc: dict) -> str:
    """The aligned-copy findings: the dataset-level copying test and the per-image verified copies."""
    ct, cp = dc.get("copy_test"), dc.get("copies")
    if ct is None or cp is None:
        return ""
    unit = "near-duplicate groups" if ct["unit"] != "image" else "images"
    verdict = "the generator copies its training images" if ct["p"] < 0.01 else "no significant copying"
    n1 = cp["n_null"] + 1
    limit = ""
    if cp["n_verified"] == 0 and cp["n_above_every_non_member"]:
        need = math.ceil(cp["n_tested"] * cp["min_p"] / cp["q"])
        limit = (f" With {cp['n_null']} known non-members the smallest copy p-value is 1/{n1}, so BH at {cp['q']:g} "
                 f"needs at least {need} such images: more known non-members would make them provable.")
    return (f"<br>aligned-copy test: {ct['k']} of {ct['m']} member {unit} have a generated image aligned onto them "
            f"(ECC, rotation + shift) better than any of the {ct['n']} known non-member {unit} has "
            f"(correlation &gt; {ct['cut']:.4f}; exact p = {ct['p']:.2g}): {verdict}."
            f"<br>per image: {cp['n_verified']} of {cp['n_tested']} {_e(cp['set'])} images are <b>verified copies</b> "
            f"(copy p-value vs the known non-members, BH at {cp['q']:g}); {cp['n_above_every_non_member']} are aligned "
            f"better than every known non-member (p = 1/{n1}).{limit}")


def _selection_html(sel: dict) -> str:
    rows = []
    # the window (ganprint.select) averages several candidates: every one of them is marked
    chosen = set((sel.get("procedure") or {}).get("inputs") or [sel["chosen"]])
    for r in sorted(sel["candidates"], key=lambda r: -(r["cv_auc"] if r["cv_auc"] == r["cv_auc"] else -1)):
        cls = ' class="chosen"' if r["name"] in chosen else ""
        rows.append(f'<tr{cls}><td>{_e(r["name"])}</td><td data-v="{r["cv_auc"]}">{_f(r["cv_auc"])}</td>'
                    f'<td>{_f(r.get("cv_auc_sd"))}</td><td>{_f(r.get("cv_kappa"))}</td><td>{_f(r.get("auc_all"))}</td>'
                    f'<td>{r.get("picked_in_folds", "—")}</td></tr>')
    return ('<table class="sortable"><thead><tr><th>candidate (features/attack)</th><th>CV AUC</th><th>sd over folds</th>'
            '<th>out-of-fold κ</th><th>AUC, all labelled (in-sample)</th><th>picked in outer folds</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _kv(d: dict) -> str:
    return '<table class="kv">' + "".join(
        f"<tr><td>{_e(k)}</td><td><code>{_e(v if isinstance(v, str) else json.dumps(v, default=str))}</code></td></tr>"
        for k, v in d.items()) + "</table>"


def render_html(run: Path, report: dict[str, Any]) -> str:
    sel, nested, fl, dc = report["selection"], report["selection"]["nested"], report["flags"], report["datacopy"]
    ct, mem = dc["ct"], dc["memorisation"]
    figs = report.get("figures", {})
    fig_html = "".join(f'<figure>{_img(run / p, name)}<figcaption class="muted">{_e(cap)}</figcaption></figure>'
                       for name, p, cap in (
                           ("roc", figs.get("roc"), "ROC of the chosen procedure's out-of-fold scores (nested CV), 95% bootstrap band"),
                           ("scores", figs.get("scores"), "scores of the chosen candidate by class"),
                           ("pvalues", figs.get("pvalues"), "conformal p-values (non-members: leave-one-out, uniform under the null)"))
                       if p and (run / p).exists())
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    ct_sentence = (f"data-copying test (Meehan et al. 2020): C<sub>T</sub> = {_f(ct['ct'], 2)}{_ci(ct.get('ct_ci'))}, "
                   f"z = {_f(ct['z'], 2)}, p = {ct['p']:.3g} over {len(ct['cells_used'])} of {ct['cells']} k-means cells "
                   f"({'generated images are closer to the training images than held-out real images are: data copying' if ct['p'] < 0.05 and ct['z'] < 0 else 'no evidence of data copying'}).")
    null = "" if mem.get("rate_under_null") is None else f" (≈ {mem['rate_under_null']:.0%} expected without copying)"
    mci = mem.get("ci")
    mem_sentence = (f"memorisation rate: {mem['rate']:.1%}{f' [{mci[0]:.1%}, {mci[1]:.1%}]' if mci else ''} "
                    f"of {mem['n_generated']} generated images ({mem['copies']} copies){null}; a copy = {_e(mem['rule'])}.")
    if report.get("copying") and not (ct["p"] < 0.05 and ct["z"] < 0):
        ct_sentence += (" C<sub>T</sub> weighs every generated image's nearest-neighbour distance in the global feature "
                        "space: a generator that copies some training images while the rest of its output lies far "
                        "from them passes it; the aligned-copy test below looks at the copies themselves.")
    stages = report.get("stages_seconds", {})
    stage_txt = ", ".join(f"{k} {v:.1f}s" + (" (cached)" if report.get("stages_cached", {}).get(k) else "")
                          for k, v in stages.items())
    prov = report.get("provenance", {})
    verdict_cls = "sig" if report.get("significant") or report.get("copying") else "null"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ganprint audit report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><main>
<h1>Membership audit</h1>
<p class="muted">{_e(counts)} · layout {_e(report['layout'])} · ganprint {_e(prov.get('versions', {}).get('ganprint', '?'))}</p>
<p id="verdict" class="verdict {verdict_cls}">{_e(report['verdict'])}</p>
<p>Chosen procedure: <b>{_e(sel['chosen'])}</b> ({_e(sel.get('method', ''))}); nested {nested.get('repeats')}×{nested.get('folds')}-fold CV over
{nested.get('n')} labelled images: AUC {_f(nested.get('auc'))}{_ci(nested.get('auc_ci'))}, κ {_f(nested.get('kappa'))}{_ci(nested.get('kappa_ci'))},
TPR@1%FPR {_f(nested.get('tpr_at_1fpr'))}. Flags: {_e(fl['method'])}, FDR {fl['q']:g}: {fl['n_flagged']} of {fl['n_tested']} {_e(fl['set'])} images{'; ' + _e(fl['note']) if fl.get('note') else ''}.
{'Submission: <code>submission.csv</code> (' + _e(report['decision']['rule']) + ' rule).' if report.get('submission') else ''}</p>
<h2>Dataset-level verdicts</h2>
<p id="datacopy">{ct_sentence}<br>{mem_sentence}{_copies_sentence(dc)}</p>
<h2>Figures</h2><div class="grid">{fig_html}</div>
<h2>Evidence gallery</h2>
<p class="muted">Each card: the real image, then its best-aligned candidate generated images (left) with the absolute difference
after alignment (right; dark = different) and the recovered transform. Order: <b>verified copies</b> first (the image's best
aligned correlation is significant against the same statistic of the known non-members, Benjamini–Hochberg at FDR {fl['q']:g}),
then images flagged by the membership attack, then copy candidates (aligned better than every known non-member, not significant
after BH), then the rest by membership p-value.</p>
<div id="gallery">{_gallery_html(run, report.get('gallery', []), fl['q'])}</div>
<h2>Selection (every candidate's cross-validated result)</h2>{_selection_html(sel)}
{('<p class="muted">' + _e('; '.join(report.get('candidate_notes', []))) + '</p>') if report.get('candidate_notes') else ''}
<h2>Provenance</h2>{_kv({'command': prov.get('command'), 'seed': prov.get('seed'), 'versions': prov.get('versions'),
                      'backbones': prov.get('backbones'), 'inputs': report.get('inputs'), 'inputs_hash': prov.get('inputs_hash'),
                      'stages': stage_txt, 'total seconds': report.get('seconds_total')})}
</main><script>{SORT_JS}</script></body></html>
"""


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_run(run: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Draw the figures, write report.json and report.html into ``run``; returns the HTML path."""
    run = Path(run)
    report["figures"] = draw_figures(run, report)
    _write_text(run / "report.json", json.dumps(report, indent=2, sort_keys=True, default=float))
    out = run / "report.html"
    _write_text(out, render_html(run, report))
    return out


def render_report(run: str | os.PathLike) -> Path:
    """``ganprint report RUN/``: re-render from RUN/report.json, RUN/scores.parquet and the gallery PNGs."""
    run = Path(run)
    rj = run / "report.json"
    if not run.is_dir():
        raise GanprintError(f"{run}: no such folder; pass the --out folder of `ganprint audit`")
    if not rj.exists() or not (run / "scores.parquet").exists():
        raise GanprintError(f"{run}: not an audit run (no report.json / scores.parquet); run `ganprint audit ... --out {run}`")
    try:
        report = json.loads(rj.read_text())
    except ValueError as exc:
        raise GanprintError(f"{rj}: not valid JSON ({exc}); rerun `ganprint audit`") from None
    missing = [c for c in report.get("gallery", []) if not (run / "figures" / "gallery" / c["real"]).exists()]
    if missing:
        raise GanprintError(f"{run / 'figures' / 'gallery'}: gallery images missing (e.g. {missing[0]['real']}); "
                            "rerun `ganprint audit`")
    return render_run(run, report)
