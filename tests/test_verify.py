"""Local features (embed --backbone sift/orb) and geometric verification (simmatrix --verify)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_png
from ganprint.artifacts import read_artifact
from ganprint.cli.main import app


def texture(seed: int, size: int = 128) -> np.ndarray:
    """A CT-like test image: smoothed noise inside a disc, plus a few bright blobs."""
    import cv2

    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 2.0)
    x = (x - x.min()) / (x.max() - x.min())
    yy, xx = np.mgrid[:size, :size]
    disc = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (0.45 * size) ** 2
    img = x * disc * 180 + 20
    for _ in range(6):
        cx, cy, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(3, 8))]
        cv2.circle(img, (cx, cy), r, float(rng.integers(200, 255)), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def replica(img: np.ndarray, angle: float, shift: tuple[float, float]):
    """img rotated by ``angle`` degrees about its centre, then shifted; returns (image, M [2, 3])."""
    import cv2

    h, w = img.shape
    M = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    M[:, 2] += shift
    return cv2.warpAffine(img, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), M


def test_verification_recovers_a_rotated_shifted_copy():
    from ganprint.verify import verify_images

    a = texture(0, 256)
    b, M = replica(a, 7.0, (11.0, -8.0))
    m = verify_images(a, b)
    assert m.inliers >= 30, m
    assert abs(m.angle - 7.0) < 1.0
    assert abs(m.scale - 1.0) < 0.02
    # the fitted transform places a's pixels where the true one does (within 1.5 px on a grid)
    pts = np.stack(np.meshgrid(np.arange(32, 224, 32), np.arange(32, 224, 32)), -1).reshape(-1, 2).astype(float)
    ph = np.c_[pts, np.ones(len(pts))]
    assert np.abs(ph @ m.transform.T - ph @ M.T).max() < 1.5
    other = verify_images(a, texture(1, 256))
    assert other.inliers <= 8 and other.inliers * 4 < m.inliers


def test_orb_verifies_a_copy_too():
    from ganprint.verify import verify_images

    a = texture(3, 256)
    b, _ = replica(a, -5.0, (6.0, 9.0))
    m = verify_images(a, b, kind="orb")
    assert m.inliers >= 15 and abs(m.angle + 5.0) < 2.0
    assert verify_images(a, texture(4, 256), kind="orb").inliers * 3 < m.inliers


def test_verify_candidates_ranks_the_copy_first_and_threads_agree():
    from ganprint.local_features import LocalSet, extract
    from ganprint.verify import verify_candidates

    base = [texture(10 + i) for i in range(4)]
    keys = [texture(20 + i) for i in range(5)] + [replica(base[2], 6.0, (5.0, 4.0))[0]]
    q = LocalSet.from_features([extract(x) for x in base])
    k = LocalSet.from_features([extract(x) for x in keys], cap=400)
    cand = np.tile(np.arange(6), (4, 1))
    v1 = verify_candidates(q, k, cand, threads=1)
    v2 = verify_candidates(q, k, cand, threads=2)
    for a, b in zip((v1.values, v1.indices, v1.matches), (v2.values, v2.indices, v2.matches)):
        assert torch.equal(a, b)
    assert int(v1.indices[2, 0]) == 5 and float(v1.values[2, 0]) > 3 * float(v1.values[2, 1])
    assert (v1.values[:, :-1] >= v1.values[:, 1:]).all()
    assert math.isfinite(float(v1.transform[2, 0, 0]))


def _layout(root, n_members=4, n_non=4, n_unrel=4, size=128):
    """dev layout: generated = rotated/shifted replicas of members 0 and 1 + unrelated images."""
    imgs = {}
    for i in range(n_members):
        imgs[f"real_used/m{i}.png"] = texture(100 + i, size)
    for i in range(n_non):
        imgs[f"real_not_used/n{i}.png"] = texture(200 + i, size)
    for i in range(2):
        imgs[f"generated/rep{i}.png"] = replica(imgs[f"real_used/m{i}.png"], 4.0 + 2 * i, (5.0, -3.0))[0]
    for i in range(n_unrel):
        imgs[f"generated/g{i}.png"] = texture(300 + i, size)
    for rel, arr in imgs.items():
        write_png(root / rel, arr)
    return root


def _ok(r):
    assert r.exit_code == 0, r.stderr
    return r.stdout.strip()


def test_cli_embed_sift_simmatrix_verify_predict(tmp_path):
    root = _layout(tmp_path / "dev")
    runner = CliRunner()
    _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "pix"), "--backbone", "pixels", "-q", "--workers", "0"]))
    _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "sift"), "--backbone", "sift", "-q",
                            "--max-keypoints", "300"]))
    loc = read_artifact(tmp_path / "sift", kind="local_features")
    n = len(loc.table)
    assert loc.tensors["keypoints"].shape == (n, 300, 4) and loc.tensors["descriptors"].dtype == torch.uint8
    assert (loc.tensors["counts"] > 20).all() and loc.provenance["local"]["max_keypoints"] == 300
    _ok(runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "sim3"), "-q",
                            "--verify", str(tmp_path / "sift"), "--verify-k", "3"]))
    s3 = read_artifact(tmp_path / "sim3", kind="similarity")
    R = len(s3.table)
    assert s3.tensors["verify_real_values"].shape == (R, 3) and s3.tensors["verify_realref_values"].shape == (R, 3)
    assert s3.provenance["verify"]["k"] == 3
    # the shortlist is the global top-3: re-ordered by inliers, the same set of candidates
    assert (s3.tensors["verify_real_indices"].sort(1).values == s3.tensors["real_topk_indices"][:, :3].sort(1).values).all()
    _ok(runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "sim"), "-q",
                            "--verify", str(tmp_path / "sift"), "--verify-k", "0"]))  # all generated images
    sim = read_artifact(tmp_path / "sim", kind="similarity")
    t, prov = sim.tensors, sim.provenance
    assert t["verify_real_values"].shape == (R, 6) and t["verify_real_transform"].shape == (R, 2, 3)
    assert prov["verify"]["k"] == 6 and prov["verify"]["score"] == "ransac_inliers"
    gen_ids = read_artifact(tmp_path / "pix").table["image_id"].to_numpy()[t["gen_rows"].numpy()]
    ids = list(sim.table["image_id"])
    for i in range(2):  # member i's verified top-1 is its replica, with a clear margin
        r = ids.index(f"m{i}")
        assert gen_ids[int(t["verify_real_indices"][r, 0])] == f"rep{i}"
        assert float(t["verify_real_values"][r, 0]) >= 60
    others = [ids.index(x) for x in ids if x not in ("m0", "m1")]
    assert float(t["verify_real_values"][others, 0].max()) < 20  # chance inliers between unrelated textures
    from ganprint.verify import best_matches

    bm = best_matches(tmp_path / "sim").set_index("image_id")
    assert bm.loc["m1", "gen_image_id"] == "rep1" and bm.loc["m1", "gen_path"].endswith("rep1.png")
    assert abs(bm.loc["m1", "angle"] - 6.0) < 1.5 and abs(bm.loc["m1", "scale"] - 1.0) < 0.05
    assert bm.loc["m1", "frame"] == 256
    # the attack reads the verified scores through the attack registry
    out = _ok(runner.invoke(app, ["predict", str(tmp_path / "sim"), "-o", str(tmp_path / "sc"), "--attack",
                                  "verify_max", "--balanced", "-q"]))
    sc = read_artifact(out, kind="scores").table.set_index("image_id")
    assert sc.loc["m0", "score"] >= 60 and sc.loc["n0", "score"] < 20
    _ok(runner.invoke(app, ["predict", str(tmp_path / "sim"), "-o", str(tmp_path / "sc2"), "--attack",
                            "verify_cal", "--balanced", "-q"]))
    # reproducible: the same inputs give the same tensors
    _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "sift2"), "--backbone", "sift", "-q",
                            "--max-keypoints", "300", "--force"]))
    loc2 = read_artifact(tmp_path / "sift2")
    assert loc2.provenance["pair_id"] == loc.provenance["pair_id"]
    _ok(runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "sim2"), "-q",
                            "--verify", str(tmp_path / "sift2"), "--verify-k", "0"]))
    sim1, sim2 = read_artifact(tmp_path / "sim"), read_artifact(tmp_path / "sim2")
    assert sorted(sim1.tensors) == sorted(sim2.tensors)
    for name in sim1.tensors:
        assert torch.equal(sim1.tensor(name), sim2.tensor(name)), name


def test_attack_names_filter_verified_attacks(tmp_path):
    from ganprint.attacks import AttackContext, attack_names, run_attack
    from ganprint.errors import GanprintError

    ctx = AttackContext.from_embeddings(torch.randn(6, 8), torch.randn(4, 8))
    names = attack_names(ctx.tensors)
    assert "max_sim" in names and "verify_max" not in names and "verify_max" in attack_names()
    with pytest.raises(GanprintError, match="--verify"):
        run_attack("verify_max", ctx)


def test_blank_image_and_mismatched_artifacts_are_one_line_errors(tmp_path):
    runner = CliRunner()
    root = _layout(tmp_path / "dev", n_members=2, n_non=2, n_unrel=1)
    write_png(root / "generated" / "blank.png", np.full((128, 128), 90, np.uint8))
    r = runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "sift"), "--backbone", "sift", "-q"])
    assert r.exit_code != 0 and "blank.png: no sift keypoints" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sift.safetensors").exists()
    # --skip-bad keeps it with 0 keypoints, so rows still line up with the global embeddings
    r = runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "sift"), "--backbone", "sift", "-q", "--skip-bad"])
    assert r.exit_code == 0, r.stderr
    loc = read_artifact(tmp_path / "sift")
    blank = list(loc.table["image_id"]).index("blank")
    assert int(loc.tensors["counts"][blank]) == 0 and "blank.png: no sift keypoints" in r.stderr.replace("\n", "")
    _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "pix"), "--backbone", "pixels", "-q", "--workers", "0"]))
    _ok(runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "sim"), "-q",
                            "--verify", str(tmp_path / "sift"), "--verify-k", "2"]))
    # local features of other images: refused, naming the files, nothing written
    other = tmp_path / "other"
    for i, sub in enumerate(("generated", "real_used", "real_not_used")):
        write_png(other / sub / f"x{i}.png", texture(900 + i))
    _ok(runner.invoke(app, ["embed", str(other), "-o", str(tmp_path / "sift_other"), "--backbone", "sift", "-q"]))
    r = runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "bad"), "-q",
                            "--verify", str(tmp_path / "sift_other")])
    assert r.exit_code != 0 and "have no local features" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
    # local features and raw-pixel grids (registration) are not mixed in one --verify
    r = runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "bad"), "-q",
                            "--verify", str(tmp_path / "sift"), "--verify", str(tmp_path / "pix")])
    assert r.exit_code != 0 and "different kinds" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "bad"), "-q",
                            "--verify", str(tmp_path / "sift"), "--verify-k", "-1"])
    assert r.exit_code != 0 and "--verify-k" in r.stderr
    r = runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "x"), "--backbone", "sift", "--weights", "none"])
    assert r.exit_code != 0 and "take no --weights" in r.stderr


def test_many_to_one_matches_do_not_make_a_copy():
    """A candidate with one keypoint (or all query keypoints on one candidate keypoint) must not
    let a collapsing fit count every match as an inlier."""
    from ganprint.local_features import LocalSet, extract
    from ganprint.verify import verify_candidates

    kp, de = extract(texture(5))
    one = LocalSet.from_features([(kp[:1], de[:1]), (kp[:2], np.repeat(de[:1], 2, 0))], cap=8)
    q = LocalSet.from_features([(kp, de)])
    v = verify_candidates(q, one, np.array([[0, 1]]), threads=1)
    assert float(v.values.max()) == 0.0 and torch.isnan(v.transform).all()


def test_pixels_aligned_survives_rotation_and_shift():
    """The pose-normalised pixel descriptor keeps a rotated + shifted copy near its source (the
    shortlist verification needs), where raw pixels lose it."""
    from ganprint.backbones import load_backbone

    src = [texture(40 + i, 128) for i in range(6)]
    reps = [replica(x, 8.0 * (-1) ** i, (7.0, -6.0))[0] for i, x in enumerate(src)]
    sims = {}
    for name in ("pixels", "pixels_aligned"):
        lb = load_backbone(name)
        with torch.inference_mode():
            a = lb.model(torch.stack([lb.preprocess(x) for x in src]))
            b = lb.model(torch.stack([lb.preprocess(x) for x in reps]))
        sims[name] = (a @ b.T).numpy()
    s = sims["pixels_aligned"]
    assert (s.argmax(1) == np.arange(6)).all()  # each source's nearest copy is its own
    assert np.diag(s).mean() > np.diag(sims["pixels"]).mean() + 0.1
