"""predict --attack auto: candidates over feature spaces, honest selection, p-values, FDR."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_similarity import make_emb  # same folder, pytest puts it on sys.path
from typer.testing import CliRunner

from ganprint.artifacts import read_artifact
from ganprint.cli.main import app
from ganprint.errors import ArtifactError, GanprintError
from ganprint.predict import predict, predict_auto, run_predict
from ganprint.select import SelectConfig
from ganprint.similarity import run_simmatrix

FAST = SelectConfig(folds=3, repeats=1, outer_folds=3, outer_repeats=1)
N_GEN, N_POS, D = 50, 16, 6


def _arrays(split, rng, informative: bool, n_pos=N_POS, prefix=None):
    """One split in one feature space: (x, ids, subsets, labels); in the informative space members
    are near-copies of generated images.  Dev holds 3x as many non-members as members: conformal
    p-values cannot go below 1 / (non-members + 1)."""
    n_neg = 3 * n_pos if split == "dev" else n_pos
    gen = rng.normal(size=(N_GEN, D))
    members = gen[:n_pos] + 0.25 * rng.normal(size=(n_pos, D)) if informative else rng.normal(size=(n_pos, D))
    x = np.concatenate([gen, members, rng.normal(size=(n_neg, D))])
    prefix = prefix or split
    ids = [f"g{prefix}_{i:03d}" for i in range(N_GEN)] + [f"{prefix}_{i:03d}" for i in range(n_pos + n_neg)]
    if split == "dev":
        subsets = ["generated"] * N_GEN + ["real_used"] * n_pos + ["real_not_used"] * n_neg
        labels = [None] * N_GEN + [1] * n_pos + [0] * n_neg
    else:
        subsets = ["generated"] * N_GEN + ["real_unknown"] * (2 * n_pos)
        labels = [None] * N_GEN + [1] * n_pos + [0] * n_pos  # truth stored, as synth's test_truth would give
    return x, ids, subsets, labels


def _write(tmp_path, name, backbone, parts):
    x = np.concatenate([p[0] for p in parts])
    ids, subsets, labels = (sum((list(p[i]) for p in parts), []) for i in (1, 2, 3))
    return make_emb(tmp_path / name, x, subsets, labels=labels, ids=ids, backbone=backbone,
                    weights_digest=f"w_{backbone}")


def _split(tmp_path, split, rng, informative: bool, backbone: str, n_pos=N_POS, prefix=None):
    a = _arrays(split, rng, informative, n_pos, prefix)
    return _write(tmp_path, f"{backbone}_{prefix or split}_emb", backbone, [a])


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    out = {}
    for bb, informative in (("test_resnet", False), ("pixels", True)):
        rng = np.random.default_rng(0 if informative else 1)
        dev_a = _arrays("dev", rng, informative)
        test_a = _arrays("test", rng, informative)
        dev = _write(tmp, f"{bb}_dev_emb", bb, [dev_a])
        test = _write(tmp, f"{bb}_test_emb", bb, [test_a])
        # the recommended shape for p-values: the dev non-members embedded with the test images
        neg = [i for i, sub in enumerate(dev_a[2]) if sub == "real_not_used"]
        null_part = (dev_a[0][neg], [dev_a[1][i] for i in neg], ["real_not_used"] * len(neg), [0] * len(neg))
        test_null = _write(tmp, f"{bb}_testnull_emb", bb, [test_a, null_part])
        out[bb] = {
            "dev": run_simmatrix(tmp / f"{bb}_dev_sim", dataset=dev, k=5, device="cpu").base,
            "test": run_simmatrix(tmp / f"{bb}_test_sim", dataset=test, k=5, device="cpu").base,
            "test_null": run_simmatrix(tmp / f"{bb}_testnull_sim", dataset=test_null, k=5, device="cpu").base,
            "test_ref": run_simmatrix(tmp / f"{bb}_test_refsim", dataset=test, reference=dev, k=5, device="cpu").base,
            "dev_ref": run_simmatrix(tmp / f"{bb}_dev_refsim", dataset=dev, reference=dev, k=5, device="cpu").base,
            "dev_emb": dev,
        }
    out["tmp"] = tmp
    return out


def test_auto_chooses_the_informative_space_and_records_everything(spaces, tmp_path):
    res = run_predict([spaces["test_resnet"]["test"], spaces["pixels"]["test"]], tmp_path / "auto", "auto",
                      calibrate=[spaces["pixels"]["dev"], spaces["test_resnet"]["dev"]], config=FAST)
    pred = res.prediction
    sel = pred.selection
    # one informative score, or the window of several (all of the informative space), or a combination
    used = sel["procedure"].get("inputs") or [sel["chosen"]]
    assert sel["chosen"].startswith(("mean(", "stack(")) or all(n.startswith("pixels/") for n in used), sel["reason"]
    names = [c["name"] for c in sel["candidates"]]
    assert any(n.startswith("test_resnet/") for n in names) and any(n.startswith("pixels/") for n in names)
    assert all("auc_mean" in c and "kappa_mean" in c for c in sel["candidates"])
    assert sel["nested"]["auc_mean"] > 0.7 and len(sel["nested"]["chosen"]) == 3
    art = read_artifact(res.base, kind="scores")
    assert art.provenance["attack"] == "auto"
    assert art.provenance["selection"]["chosen"] == sel["chosen"]
    assert len(art.provenance["sources"]) == 2
    from sklearn.metrics import roc_auc_score

    t = art.table
    assert roc_auc_score(t["label"].astype(int), t["score"]) > 0.8
    # the stored labels are the truth of the test images (synth-like): never a null for p-values
    assert "pvalue" not in t.columns


def test_auto_deterministic(spaces, tmp_path):
    args = ([spaces["test_resnet"]["test"], spaces["pixels"]["test"]],
            [spaces["pixels"]["dev"], spaces["test_resnet"]["dev"]])
    a = predict_auto(*args, config=FAST)
    b = predict_auto(*args, config=FAST)
    assert a.selection == b.selection
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_pvalues_from_added_non_members_and_fdr_rule(spaces, tmp_path):
    sim = spaces["pixels"]["test_null"]
    pred = predict(sim, "gan_leaks_cal", fdr=0.1)
    assert pred.pvalue_info["null"] == "label0" and pred.pvalue_info["n_null"] == 3 * N_POS
    # the added non-members are the null: not predicted, not in the submission
    assert len(pred.image_ids) == 2 * N_POS and all(i.startswith("test_") for i in pred.image_ids)
    assert pred.decision.rule == "fdr"
    p = pred.pvalues
    y = pred.truth.astype(int)
    assert p[y == 1].mean() < p[y == 0].mean()
    flagged = pred.labels.astype(bool)
    assert flagged.sum() > 0
    assert (y[flagged] == 0).mean() <= 0.25  # a few false discoveries at most on 32 images
    # auto: p-values of the chosen procedure, BH flags over the test images only
    auto = predict_auto([spaces["pixels"]["test_null"], spaces["test_resnet"]["test_null"]],
                        [spaces["pixels"]["dev"], spaces["test_resnet"]["dev"]], config=FAST, fdr=0.1)
    assert auto.pvalue_info["null"] == "label0" and auto.decision.rule == "fdr"
    assert len(auto.image_ids) == 2 * N_POS and auto.labels.sum() > 0


def test_separate_reference_gives_pvalues_only_for_reference_free_attacks(spaces):
    pred = predict(spaces["pixels"]["test_ref"], "gan_leaks", fdr=0.1)
    assert pred.pvalue_info["null"] == "reference" and pred.pvalue_info["n_null"] == 3 * N_POS
    assert predict(spaces["pixels"]["test_ref"], "gan_leaks_cal", balanced=True).pvalues is None
    with pytest.raises(GanprintError, match="near-duplicates"):
        predict(spaces["pixels"]["test_ref"], "gan_leaks_cal", fdr=0.1)


def test_dev_with_its_own_non_members_as_reference_is_refused(spaces):
    """Reference-based attacks would see the labels (dev kappa 1.0 that means nothing)."""
    with pytest.raises(ArtifactError, match="own --reference"):
        predict(spaces["pixels"]["test"], "gan_leaks_cal", calibrate=spaces["pixels"]["dev_ref"])
    with pytest.raises(ArtifactError, match="own --reference"):
        predict_auto([spaces["pixels"]["test"]], [spaces["pixels"]["dev_ref"]], config=FAST)


def test_fdr_needs_known_non_members(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 4))
    emb = make_emb(tmp_path / "e", x, ["generated"] * 12 + ["real_unknown"] * 8)
    sim = run_simmatrix(tmp_path / "s", dataset=emb, k=3, device="cpu").base
    pred = predict(sim, "max_sim", balanced=True)
    assert pred.pvalues is None
    with pytest.raises(GanprintError, match="--reference"):
        predict(sim, "max_sim", fdr=0.1)
    with pytest.raises(GanprintError, match="--fdr"):
        predict(spaces_dummy := sim, "max_sim", fdr=2.0)  # noqa: F841


def test_mismatched_real_images_refused(spaces, tmp_path):
    rng = np.random.default_rng(5)
    other = _split(spaces["tmp"], "test", rng, True, "pixels", prefix="other")
    other_sim = run_simmatrix(tmp_path / "other_sim", dataset=other, k=5, device="cpu").base
    with pytest.raises(ArtifactError, match="different real images"):
        predict_auto([spaces["test_resnet"]["test"], other_sim],
                     [spaces["pixels"]["dev"], spaces["test_resnet"]["dev"]], config=FAST)
    with pytest.raises(ArtifactError, match="no --calibrate artifact"):
        predict_auto([spaces["test_resnet"]["test"], spaces["pixels"]["test"]], [spaces["pixels"]["dev"]],
                     config=FAST)
    with pytest.raises(ArtifactError, match="same feature space"):
        predict_auto([spaces["pixels"]["test"], spaces["pixels"]["test_null"]], [spaces["pixels"]["dev"]],
                     config=FAST)
    # CLI: one line on stderr, exit != 0, nothing written
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["predict", str(spaces["test_resnet"]["test"]), str(other_sim), "--attack", "auto",
                                   "--calibrate", str(spaces["pixels"]["dev"]), "--calibrate",
                                   str(spaces["test_resnet"]["dev"]), "--out", str(out)])
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "different real images" in lines[0]
    assert not list(tmp_path.glob("never*"))


def test_cli_auto_json_and_score_reports_realised_fdr(spaces, tmp_path):
    runner = CliRunner()
    out = tmp_path / "auto"
    res = runner.invoke(app, ["predict", str(spaces["pixels"]["test_null"]), str(spaces["test_resnet"]["test_null"]),
                              "--attack", "auto", "--calibrate", str(spaces["pixels"]["dev"]),
                              "--calibrate", str(spaces["test_resnet"]["dev"]), "--fdr", "0.1", "--out", str(out),
                              "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["rule"] == "fdr" and summary["fdr"] == 0.1
    assert summary["selection"]["nested"]["auc_ci"] is not None
    assert {c["name"] for c in summary["selection"]["candidates"]} >= {"pixels/max_sim", "test_resnet/max_sim"}
    sc = runner.invoke(app, ["score", str(out), "--json", "--bootstrap", "0"])
    assert sc.exit_code == 0, sc.stderr
    m = json.loads(sc.stdout)
    assert m["fdr_target"] == 0.1
    assert m["fdr_realised"] == pytest.approx(1 - m["precision"]) if m["n_pred_pos"] else m["fdr_realised"] == 0.0
    # is there signal at all: in the artifact, in score's report, and in the human log line
    p = summary["selection"]["nested"]["signal_p"]
    assert 0.0 <= p <= 1.0 and m["nested"]["signal_p"] == p and m["nested"]["signal"] == (p < 0.01)
    table = runner.invoke(app, ["score", str(out), "--bootstrap", "0"])
    assert table.exit_code == 0 and "dev membership signal" in table.stdout
    log = runner.invoke(app, ["predict", str(spaces["pixels"]["test_null"]), "--attack", "auto", "--calibrate",
                              str(spaces["pixels"]["dev"]), "--out", str(tmp_path / "auto_log")])
    assert log.exit_code == 0, log.stderr
    assert "membership signal on the labelled images: " in log.stderr
    # non-auto with several artifacts is refused
    bad = runner.invoke(app, ["predict", str(spaces["pixels"]["test"]), str(spaces["test_resnet"]["test"]),
                              "--balanced", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--attack auto" in bad.stderr


def test_candidate_sources_are_pluggable(spaces):
    """A new source (e.g. copy verification) joins the candidates without touching select.py."""
    from ganprint.candidates import CANDIDATE_SOURCES, register_candidate_source
    from ganprint.select import CandidateScores

    def oracle(space):
        # a score that knows the dev labels' pattern in the informative space: it must win
        dev_y = space.dev.table["label"].astype(float).to_numpy()[space.dev_order]
        test_y = space.test.table["label"].astype(float).to_numpy()[space.test_order]
        return [CandidateScores(f"{space.name}/oracle", dev_y, test_y, info={"space": space.name})]

    register_candidate_source("oracle_test", oracle)
    try:
        pred = predict_auto([spaces["pixels"]["test"]], [spaces["pixels"]["dev"]], config=FAST, attacks=["max_sim"])
        names = [c["name"] for c in pred.selection["candidates"]]
        assert "pixels/oracle" in names and "pixels/max_sim" in names
        assert pred.selection["chosen"] in ("pixels/oracle", "pixels/max_sim", "window(2)")
        assert "pixels/oracle" in (pred.selection["procedure"].get("inputs") or [pred.selection["chosen"]])
        with pytest.raises(ValueError):
            register_candidate_source("oracle_test", oracle)
    finally:
        CANDIDATE_SOURCES.pop("oracle_test", None)


def test_auto_keeps_near_duplicate_dev_images_in_one_cv_group(tmp_path):
    """Neighbouring slices of one patient (here: each dev real image twice, with tiny noise) are one
    group for selection's CV; independent images stay alone (ganprint.groups)."""
    rng = np.random.default_rng(3)
    x, ids, subsets, labels = _arrays("dev", rng, informative=True, n_pos=8)
    real = [i for i, s in enumerate(subsets) if s != "generated"]
    twin = x[real] + 1e-4 * rng.normal(size=(len(real), D))
    dup = (twin, [f"twin_{ids[i]}" for i in real], [subsets[i] for i in real], [labels[i] for i in real])
    dev = _write(tmp_path, "pix_dev_emb", "pixels", [(x, ids, subsets, labels), dup])
    test = _split(tmp_path, "test", rng, True, "pixels")
    dsim = run_simmatrix(tmp_path / "dsim", dataset=dev, k=5, device="cpu").base
    tsim = run_simmatrix(tmp_path / "tsim", dataset=test, k=5, device="cpu").base
    pred = predict_auto([tsim], [dsim], config=FAST)
    g = pred.selection["groups"]
    # each twin pair is one group: at most len(real) groups
    assert g["n"] == 2 * len(real) and g["n_groups"] <= len(real) and g["groups_per_class"][1] >= 2

    alone = predict_auto([tsim], [run_simmatrix(tmp_path / "dsim1", dataset=_split(tmp_path, "dev", rng, True,
                                                "pixels", n_pos=8, prefix="d1"), k=5, device="cpu").base],
                         config=FAST)
    ga = alone.selection["groups"]
    # no twins: far more groups than half the images (in 6 dimensions some independent images
    # still fall that close, so not every image is alone)
    assert ga["n_groups"] > ga["n"] / 2


def test_calibration_non_members_never_reach_selection(spaces, monkeypatch):
    """The known non-members whose scores are the null take no part in selection (its CV, the
    choice, the fitted cut): a column that is each dev image's index shows which rows selection got."""
    import ganprint.select as S
    from ganprint.candidates import CANDIDATE_SOURCES, register_candidate_source
    from ganprint.conformal import conformal_pvalues

    def index_source(space):
        ids = [str(i) for i in space.dev.table["image_id"].to_numpy()[space.dev_order]]
        # a seeded permutation of the row index: carries no label information, names each row
        seen["perm"] = np.random.default_rng(0).permutation(len(ids))
        seen["dev_ids"] = ids
        return [S.CandidateScores(f"{space.name}/index", seen["perm"].astype(float),
                                  np.zeros(len(space.test_order)), info={"space": space.name})]

    seen: dict = {}
    real_select = S.select

    def spy(X, y, names, *a, **k):
        seen["index"] = np.asarray(X)[:, list(names).index("pixels/index")].astype(int)
        return real_select(X, y, names, *a, **k)

    register_candidate_source("index_test", index_source)
    monkeypatch.setattr(S, "select", spy)
    try:
        pred = predict_auto([spaces["pixels"]["test_null"]], [spaces["pixels"]["dev"]], config=FAST, fdr=0.1,
                            attacks=["gan_leaks_cal"])
    finally:
        CANDIDATE_SOURCES.pop("index_test", None)
    split = pred.selection["calibration_split"]
    cal = set(split["calibration_ids"])
    row_of = np.argsort(seen["perm"])
    in_selection = {seen["dev_ids"][row_of[v]] for v in seen["index"]}
    assert cal and not cal & in_selection
    assert split["n_calibration"] == len(cal) == pred.pvalue_info["n_null"] == 3 * N_POS // 2
    # (a held-out near-duplicate group may take a non-null image along: at most 4N - |cal| remain)
    assert pred.selection["n"] == len(in_selection) == split["n_selection"] <= 4 * N_POS - len(cal)
    # the p-values are against the calibration images only, scored like the test images
    assert pred.selection["chosen"] == "pixels/gan_leaks_cal"
    from ganprint.candidates import FeatureSpace, attack_candidates, load_spaces

    sp, _, _ = load_spaces([spaces["pixels"]["test_null"]], [spaces["pixels"]["dev"]])
    c = attack_candidates(sp[0], ["gan_leaks_cal"])[0]
    rows = [r for r, i in enumerate(c.null.ids) if i in cal]
    keep = [n for n, i in enumerate(sp[0].test.table["image_id"].to_numpy()[sp[0].test_order])
            if str(i).startswith("test_")]
    np.testing.assert_allclose(pred.pvalues, conformal_pvalues(c.test[keep], c.null.scores[rows]))
    assert isinstance(sp[0], FeatureSpace)


def test_null_fraction_option(spaces, tmp_path):
    a = predict_auto([spaces["pixels"]["test_null"]], [spaces["pixels"]["dev"]], config=FAST, null_fraction=0.75)
    assert a.pvalue_info["n_null"] == 36 and a.selection["calibration_split"]["fraction"] == 0.75
    # deterministic for a seed; another seed, another split
    again = predict_auto([spaces["pixels"]["test_null"]], [spaces["pixels"]["dev"]], config=FAST, null_fraction=0.75)
    assert again.selection["calibration_split"] == a.selection["calibration_split"]
    np.testing.assert_array_equal(again.pvalues, a.pvalues)
    other = predict_auto([spaces["pixels"]["test_null"]], [spaces["pixels"]["dev"]], null_fraction=0.75,
                         config=SelectConfig(folds=3, repeats=1, outer_folds=3, outer_repeats=1, seed=1))
    assert other.selection["calibration_split"]["calibration_ids"] != a.selection["calibration_split"]["calibration_ids"]
    res = CliRunner().invoke(app, ["predict", str(spaces["pixels"]["test_null"]), "--attack", "auto", "--calibrate",
                                   str(spaces["pixels"]["dev"]), "--null-fraction", "1.5", "--out",
                                   str(tmp_path / "x")])
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "--null-fraction" in lines[0]
    assert not list(tmp_path.glob("x*"))


def test_reference_pool_is_the_null_and_selection_keeps_every_dev_image(spaces, tmp_path):
    """Known non-members outside the dev set (a reference pool embedded with the test images):
    under --null-fraction auto they alone calibrate and every labelled dev image enters selection."""
    rng = np.random.default_rng(5)
    dev_a = _arrays("dev", np.random.default_rng(0), True)  # the fixture's pixels dev split, rebuilt
    test_a = _arrays("test", np.random.default_rng(0), True)
    pool = (rng.normal(size=(40, D)), [f"reference_{i:04d}" for i in range(40)], ["real_not_used"] * 40, [0] * 40)
    neg = [i for i, sub in enumerate(dev_a[2]) if sub == "real_not_used"]
    dev_null = (dev_a[0][neg], [dev_a[1][i] for i in neg], ["real_not_used"] * len(neg), [0] * len(neg))
    emb = _write(tmp_path, "pool_emb", "pixels", [test_a, dev_null, pool])
    sim = run_simmatrix(tmp_path / "pool_sim", dataset=emb, k=5, device="cpu").base
    dev = _write(tmp_path, "pool_dev_emb", "pixels", [dev_a])
    dev_sim = run_simmatrix(tmp_path / "pool_dev_sim", dataset=dev, k=5, device="cpu").base
    pred = predict_auto([sim], [dev_sim], config=FAST)
    split = pred.selection["calibration_split"]
    assert split["fraction"] == 0.0 and split["n_null_outside_dev"] == 40
    assert split["calibration_ids"] == sorted(pool[1]) and pred.pvalue_info["n_null"] == 40
    assert pred.selection["n"] == len(dev_a[1]) - N_GEN  # every labelled dev image
    assert pred.pvalues.min() == pytest.approx(1 / 41)
    # neither the pool nor the dev non-members are predicted
    assert all(i.startswith("test_") for i in pred.image_ids) and len(pred.image_ids) == 2 * N_POS
    # an explicit share still holds dev non-members out, and the pool still calibrates
    half = predict_auto([sim], [dev_sim], config=FAST, null_fraction=0.5)
    hs = half.selection["calibration_split"]
    assert hs["n_calibration"] > 40 and set(pool[1]) <= set(hs["calibration_ids"])
    assert half.selection["n"] < pred.selection["n"]


def test_verified_artifacts_are_their_own_feature_space():
    from ganprint.candidates import _space_key, _space_name

    base = {"backbone": "pixels", "metric": "cosine", "weights_digest": "w", "preprocess": {"size": 32}}
    ver = {"method": "register", "local": {"detector": "register", "size": 16}, "k_requested": 50,
           "registration": {"angles": [-12, 12, 4]}, "artifacts": [{"path": "/a/dev.safetensors"}]}
    plain, v16 = _space_key(base), _space_key({**base, "verify": ver})
    # the same verification of another split (other input paths) is the same space
    other_split = _space_key({**base, "verify": {**ver, "artifacts": [{"path": "/a/test.safetensors"}]}})
    v32 = _space_key({**base, "verify": {**ver, "local": {"detector": "register", "size": 32}}})
    assert len({plain, v16, v32}) == 3 and other_split == v16
    assert _space_name({**base, "verify": ver}) == "pixels+verify(register16)"
