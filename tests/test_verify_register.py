"""Registration verifier (ganprint.verify_register): rotation search + phase correlation + ECC, NCC score."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_png
from ganprint.artifacts import read_artifact
from ganprint.cli.main import app
from test_verify import _layout, _ok, replica, texture


def _angle(m: np.ndarray) -> float:
    return math.degrees(math.atan2(-m[1, 0], m[0, 0]))


def test_registration_recovers_rotation_and_shift():
    from ganprint.verify_register import register_images

    a = texture(0, 64)
    b, M = replica(a, 7.0, (3.0, -2.0))
    score, m = register_images(a, b, size=64)
    assert abs(_angle(m) - 7.0) < 1.0, m
    # the fitted transform places a's pixels where the true one does (within 1 px on a grid)
    pts = np.stack(np.meshgrid(np.arange(16, 56, 8), np.arange(16, 56, 8)), -1).reshape(-1, 2).astype(float)
    ph = np.c_[pts, np.ones(len(pts))]
    M = M.copy()
    M[:, 2] += (M[:, :2] @ [0.5, 0.5]) - [0.5, 0.5]  # cv2's centre (w/2) vs ours ((w-1)/2): same map
    assert np.abs(ph @ m.T - ph @ M.T).max() < 1.0
    unrelated, _ = register_images(a, texture(1, 64), size=64)
    assert score > 3.0 and unrelated < 0.5 * score


def test_true_replica_beats_its_near_duplicate_neighbour():
    """The neighbouring slice (same image, one structure moved) under the same replica transform
    scores below the true source's replica; both above an unrelated image."""
    import cv2

    from ganprint.verify_register import GridSet, grid_of, register_candidates

    a = texture(5, 128)
    nb = a.copy()
    cv2.circle(nb, (50, 60), 7, 240, -1)
    cv2.circle(nb, (80, 70), 6, 30, -1)

    def copy_of(x):  # the replica transforms: rotation, shift, gamma, blur, noise
        y, _ = replica(x, -6.0, (5.0, 4.0))
        y = 255.0 * (y / 255.0) ** 1.15
        y = cv2.GaussianBlur(y, (0, 0), 1.0) + np.random.default_rng(0).normal(0, 4, y.shape)
        return np.clip(y, 0, 255).astype(np.uint8)

    keys = GridSet(np.stack([grid_of(x, 32) for x in (copy_of(nb), copy_of(a), texture(6, 128))]))
    q = GridSet(grid_of(a, 32)[None])
    out = register_candidates(q, keys, np.array([[0, 1, 2]]), threads=1)
    assert list(out["indices"][0]) == [1, 0, 2], out
    assert out["values"][0, 0] > out["values"][0, 1] > out["values"][0, 2]


def test_register_candidates_is_deterministic_and_threads_agree():
    from ganprint.verify_register import GridSet, grid_of, register_candidates

    imgs = [texture(10 + i, 64) for i in range(5)] + [replica(texture(11, 64), 5.0, (2.0, 1.0))[0]]
    g = GridSet(np.stack([grid_of(x, 32) for x in imgs]))
    cand = np.array([[0, 2, 3, 4, 5, -1], [5, 4, 3, 2, 1, 0]])
    q = g.take([1, 2])
    a = register_candidates(q, g, cand, threads=1)
    b = register_candidates(q, g, cand, threads=2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["indices"][0, -1] == -1 and a["indices"][0, 0] == 5  # padding last; the copy first
    assert (np.diff(a["values"][:, :5], axis=1) <= 0).all()


def test_cli_simmatrix_verify_with_pixel_grids(tmp_path):
    root = _layout(tmp_path / "dev", size=64)
    runner = CliRunner()
    _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "pix"), "--backbone", "pixels", "-q", "--workers", "0"]))
    _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / "grid"), "--backbone", "pixels", "-q",
                            "--workers", "0", "--image-size", "32"]))
    _ok(runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "sim"), "-q",
                            "--verify", str(tmp_path / "grid"), "--verify-k", "0"]))
    sim = read_artifact(tmp_path / "sim", kind="similarity")
    t, prov = sim.tensors, sim.provenance["verify"]
    R = len(sim.table)
    assert prov["method"] == "register" and prov["local"]["size"] == 32 and prov["score"].startswith("-log")
    assert t["verify_real_values"].shape == (R, 6) and t["verify_realref_values"].shape == (R, R - 1)
    gen_ids = read_artifact(tmp_path / "pix").table["image_id"].to_numpy()[t["gen_rows"].numpy()]
    ids = list(sim.table["image_id"])
    for i in range(2):
        assert gen_ids[int(t["verify_real_indices"][ids.index(f"m{i}"), 0])] == f"rep{i}"
    from ganprint.verify import best_matches

    bm = best_matches(tmp_path / "sim").set_index("image_id")
    assert bm.loc["m1", "gen_image_id"] == "rep1" and abs(bm.loc["m1", "angle"] - 6.0) < 2.0
    assert bm.loc["m1", "frame"] == 32
    for attack in ("verify_max", "verify_cal"):
        out = _ok(runner.invoke(app, ["predict", str(tmp_path / "sim"), "-o", str(tmp_path / attack), "--attack",
                                      attack, "--balanced", "-q"]))
        sc = read_artifact(out, kind="scores").table.set_index("image_id")["score"]
        assert sc[["m0", "m1"]].min() > sc[[x for x in ids if x.startswith("n")]].max()


def test_mismatched_grids_are_one_line_errors(tmp_path):
    root = _layout(tmp_path / "dev", n_members=2, n_non=2, n_unrel=1, size=64)
    runner = CliRunner()
    for name, extra in (("pix", []), ("g32", ["--image-size", "32"]), ("g16", ["--image-size", "16"]),
                        ("res", ["--backbone", "pixels_aligned"])):
        bb = [] if name == "res" else ["--backbone", "pixels"]  # pixels_aligned grids are not image grids
        _ok(runner.invoke(app, ["embed", str(root), "-o", str(tmp_path / name), "-q", "--workers", "0", *bb, *extra]))
    cases = [(["--verify", str(tmp_path / "res")], "cannot verify"),
             (["--verify", str(tmp_path / "g32"), "--verify", str(tmp_path / "g16")], "different sizes")]
    other = tmp_path / "other"
    for i, sub in enumerate(("generated", "real_used", "real_not_used")):
        write_png(other / sub / f"x{i}.png", texture(900 + i, 64))
    _ok(runner.invoke(app, ["embed", str(other), "-o", str(tmp_path / "g_other"), "--backbone", "pixels", "-q",
                            "--workers", "0", "--image-size", "32"]))
    cases.append((["--verify", str(tmp_path / "g_other")], "have no pixel grids"))
    for args, msg in cases:
        r = runner.invoke(app, ["simmatrix", str(tmp_path / "pix"), "-o", str(tmp_path / "bad"), "-q", *args])
        assert r.exit_code != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad.safetensors").exists()


def test_bad_parameters_are_refused():
    from ganprint.errors import GanprintError
    from ganprint.verify_register import GridSet, angles_grid, register_candidates

    with pytest.raises(GanprintError):
        angles_grid(10, 0)
    g = GridSet(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(GanprintError, match="blur"):
        register_candidates(g, g, np.zeros((2, 1), np.int64), blur=2)
