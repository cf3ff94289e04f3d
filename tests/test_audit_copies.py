"""Aligned-copy evidence: the exact copying test, per-image verified copies (conformal p-values vs
the known non-members + BH), and an audit of a copying generator whose gallery shows the verified
copies first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ganprint.datacopy import copy_evidence, members_copy_test
from ganprint.report.gallery import gallery_order


def test_members_copy_test_is_exact_and_counts_groups_once():
    # 3 member images above every non-member: C(5, 3) / C(9, 3) = 10 / 84
    res = members_copy_test([0.99, 0.98, 0.97, 0.5, 0.4], [0.9, 0.6, 0.5, 0.3])
    assert res["k"] == 3 and res["p"] == pytest.approx(10 / 84)
    # the same three as one near-duplicate group: one unit, C(3, 1) / C(7, 1)
    g = members_copy_test([0.99, 0.98, 0.97, 0.5, 0.4], [0.9, 0.6, 0.5, 0.3], [0, 0, 0, 1, 2], [0, 1, 2, 3])
    assert g["k"] == 1 and g["m"] == 3 and g["p"] == pytest.approx(3 / 7)
    assert members_copy_test([0.1, 0.2], [0.9, 0.3])["p"] == 1.0


def test_members_copy_test_is_calibrated_under_exchangeability():
    rng = np.random.default_rng(0)
    ps = np.array([members_copy_test(rng.normal(size=30), rng.normal(size=30))["p"] for _ in range(2000)])
    for a in (0.01, 0.05, 0.2):
        assert np.mean(ps <= a) <= a + 0.015


def test_copy_evidence_flags_only_copies_with_bh():
    rng = np.random.default_rng(1)
    null = rng.uniform(0.80, 0.93, size=(40, 3))  # 40 known non-members, 3 candidates each
    target = rng.uniform(0.80, 0.93, size=(20, 3))
    target[:8, 1] = 0.99  # 8 copies
    cc = np.vstack([null, target])
    cc[45, 2] = np.nan  # a missing candidate is ignored
    ev = copy_evidence(cc, np.arange(40), np.arange(40, 60), 0.1)
    assert ev["copy"][40:48].all() and not ev["copy"][48:].any() and not ev["copy"][:40].any()
    assert ev["p"][40] == pytest.approx(1 / 41) and ev["min_p"] == pytest.approx(1 / 41)
    assert np.isnan(ev["q"][:40]).all()


def test_gallery_order_puts_verified_copies_first():
    df = pd.DataFrame({"role": ["unknown"] * 6 + ["members"], "flag": [True, False, False, False, False, False, True],
                       "p_value": [0.01, 0.5, 0.4, 0.3, 0.2, 0.9, 0.0], "score": [9, 1, 2, 3, 4, 0, 9]})
    copies = {"p": np.array([0.5, 0.02, 0.02, 0.02, 0.6, 0.7, 0.02]),
              "stat": np.array([0.8, 0.97, 0.99, 0.98, 0.7, 0.6, 1.0]),
              "copy": np.array([0, 1, 1, 0, 0, 0, 1], dtype=bool)}
    order, tiers = gallery_order(df, "unknown", copies, min_p=0.02)
    # verified copies (by p, then aligned correlation), the flagged image, the copy candidate, the rest by p
    assert order == [2, 1, 0, 3, 4, 5] and tiers == [0, 0, 1, 2, 3, 3]
    order, tiers = gallery_order(df, "unknown")  # no copy evidence: flags first, then by p-value
    assert order == [0, 4, 3, 2, 1, 5]


def _report(copy_p, k=2):
    return {"selection": {"nested": {"auc": 0.55, "auc_ci": [0.4, 0.7], "p_value": 0.3}},
            "flags": {"set": "unknown", "n_flagged": 0, "n_tested": 40, "q": 0.1},
            "datacopy": {"copy_test": {"k": k, "m": 30, "n": 30, "p": copy_p, "unit": "near-duplicate group"},
                         "copies": {"n_verified": 0},
                         "memorisation": {"rate": 0.01, "ci": [0.0, 0.05], "n_generated": 300}}}


def test_verdict_names_copying_apart_from_membership():
    from ganprint.audit import copying_significant, verdict_sentence

    null, sig = verdict_sentence(_report(0.24))
    assert not sig and not copying_significant(_report(0.24))
    assert null.startswith("no significant membership signal: AUC 0.55") and "no significant data copying: 2 of 30" in null
    leak, sig = verdict_sentence(_report(0.004, k=7))
    assert not sig and copying_significant(_report(0.004, k=7))
    assert leak.startswith("data copying: 7 of 30 member groups") and "; no significant membership signal" in leak


def test_audit_of_a_copying_generator_shows_verified_copies_first(tmp_path):
    pytest.importorskip("cv2")
    from tests.audit_data import make_audit_folders

    from ganprint.audit import AuditOptions, resolve_inputs, run_audit

    # 20 known non-members: the smallest copy p-value is 1/21, so BH at 10% can prove 4 of 8
    f = make_audit_folders(tmp_path / "d", copying=True, n_known=20, n_unknown=8, n_generated=32, size=24)
    inp = resolve_inputs(generated=f["generated"], members=f["members"], non_members=f["non_members"],
                         unknown=f["unknown"])
    rep = run_audit(tmp_path / "run", inp, AuditOptions(backbones=("pixels",), bootstrap=0, repeats=1, folds=3,
                                                        gallery=6), progress=False).report
    cards = rep["gallery"]
    html = (tmp_path / "run" / "report.html").read_text()
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    # the four copied unknown images are verified copies and lead the gallery; the tiers never go back
    assert [c["evidence"] for c in cards[:4]] == ["verified copy"] * 4
    assert sorted(c["image_id"] for c in cards[:4]) == [f"u_in{i:03d}" for i in range(4)]
    assert [c["tier"] for c in cards] == sorted(c["tier"] for c in cards)
    top = cards[0]["matches"][0]
    assert top["value_name"] == "aligned correlation" and top["value"] > 0.95 and top["alignment"]
    assert rep["copying"] and rep["verdict"].startswith("data copying:")
    assert rep["datacopy"]["memorisation"]["copies"] >= 20  # every member is copied once
    n_verified = int(scores.verified_copy.sum())
    assert html.count('data-evidence="verified copy"') == min(n_verified, 6) and n_verified <= 5
    assert {f"u_in{i:03d}" for i in range(4)} <= set(scores.loc[scores.verified_copy, "image_id"])


def test_aligned_correlations_find_a_shifted_copy_and_ignore_threads(tmp_path):
    pytest.importorskip("cv2")
    from scipy.ndimage import shift

    from ganprint.datacopy import aligned_correlations
    from tests.audit_data import _save, _smooth

    rng = np.random.default_rng(3)
    real = _smooth(rng, 64)
    _save(real, tmp_path / "real.png")
    _save(shift(real, (3, -4), mode="nearest"), tmp_path / "copy.png")  # a shifted copy
    for i in range(3):
        _save(_smooth(rng, 64), tmp_path / f"other{i}.png")
    gens = [str(tmp_path / n) for n in ("other0.png", "copy.png", "other1.png", "other2.png")]
    cand = np.array([[0, 1, 2, 3, -1], [1, 2, 3, -1, -1], [0, 2, -1, -1, -1]])
    reals = [str(tmp_path / "real.png"), gens[0], gens[3]]
    cc1, w1 = aligned_correlations(reals, [gens] * 3, cand, threads=1)
    cc2, w2 = aligned_correlations(reals, [gens] * 3, cand, threads=2)
    assert np.array_equal(cc1, cc2, equal_nan=True) and np.array_equal(w1, w2, equal_nan=True)
    assert np.nanargmax(cc1[0]) == 1 and cc1[0, 1] > 0.97 and np.isnan(cc1[0, 4])
    assert abs(abs(w1[0, 1, 2]) - 4) < 1 and abs(abs(w1[0, 1, 5]) - 3) < 1  # the shift, in pixels
