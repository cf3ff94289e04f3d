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
    from ganprint.verify_register import DEFAULT_REFINE_TOP

    reg = prov["registration"]
    assert (reg["coarse_size"], reg["fine_size"], reg["refine_top"]) == (32, 32, DEFAULT_REFINE_TOP)
    assert reg["contrast"] == "quadratic" and reg["attribution_margin"] > 0
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


def _degraded_copy(x, angle, shift, gamma=1.15, sigma=1.0, seed=0, noise=3.0):
    """A replica: rotation + shift, gamma, blur, noise (the synth --copies transforms)."""
    import cv2

    y, _ = replica(x, angle, shift)
    y = 255.0 * (y / 255.0) ** gamma
    y = cv2.GaussianBlur(y, (0, 0), sigma) + np.random.default_rng(seed).normal(0, noise, y.shape)
    return np.clip(y, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_cascade_top1_matches_the_full_search(size):
    """Refining only the top R coarse candidates picks the same top-1 (the copy) as refining all K,
    on 32 px grids (one grid) and on 64 px grids (coarse 32 px, refinement at 64 px)."""
    from ganprint.verify_register import DEFAULT_REFINE_TOP, GridSet, grid_of, register_candidates

    src = [texture(40 + i, 128) for i in range(3)]
    gens = [texture(60 + i, 128) for i in range(12)]
    gens[5] = _degraded_copy(src[0], 7.0, (6.0, -5.0))
    gens[9] = _degraded_copy(src[1], -9.0, (-4.0, 3.0), gamma=0.85, seed=1)
    keys = GridSet(np.stack([grid_of(x, size) for x in gens]))
    q = GridSet(np.stack([grid_of(x, size) for x in src]))
    cand = np.tile(np.arange(12), (3, 1))
    full = register_candidates(q, keys, cand, refine_top=None, threads=1)
    for r in (2, DEFAULT_REFINE_TOP):
        casc = register_candidates(q, keys, cand, refine_top=r, threads=1)
        assert list(casc["indices"][:2, 0]) == list(full["indices"][:2, 0]) == [5, 9], (r, casc["indices"][:, :3])
        assert casc["refined"].sum(1).tolist() == [r] * 3 and full["refined"].all()
        assert (np.diff(casc["values"], axis=1) <= 0).all()
        # the copies' refined scores are those of the full search (same pair, same pose search)
        np.testing.assert_allclose(casc["values"][:2, 0], full["values"][:2, 0], rtol=1e-6)
    # a copy is far above the best unrelated candidate of the query with no copy
    assert casc["values"][:2, 0].min() > casc["values"][2, 0] + 1.0


def test_fine_grid_and_determinism_across_threads():
    """64 px grids (coarse at 16 or 32 px): identical results for 1 and 2 threads and on a rerun;
    the best pair's transform is in the 64 px frame."""
    from ganprint.verify_register import GridSet, grid_of, register_candidates

    src = texture(70, 128)
    imgs = [texture(80 + i, 128) for i in range(6)] + [_degraded_copy(src, 5.0, (8.0, 4.0))]
    g = GridSet(np.stack([grid_of(x, 64) for x in imgs]))
    q = GridSet(np.stack([grid_of(src, 64), grid_of(imgs[2], 64)]))
    cand = np.array([[0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 1, 0, -1]])
    for cs in (16, 32):
        a = register_candidates(q, g, cand, threads=1, coarse_size=cs, refine_top=3)
        b = register_candidates(q, g, cand, threads=2, coarse_size=cs, refine_top=3)
        c = register_candidates(q, g, cand, threads=2, coarse_size=cs, refine_top=3)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
            np.testing.assert_array_equal(b[name], c[name], err_msg=name)
        assert a["indices"][0, 0] == 6 and a["indices"][1, -1] == -1
        # the copy was shifted by (8, 4) px of 128: (4, 2) px of the 64 px frame
        assert abs(_angle(a["transform"][0].astype(float)) - 5.0) < 1.5
        assert np.abs(a["transform"][0, :, 2] - transform_shift(5.0, 4.0, 2.0, 64)).max() < 1.0


def transform_shift(angle, dx, dy, size):
    from ganprint.verify_register import transform_matrix

    return transform_matrix(angle, dx, dy, size)[:, 2]


def test_attribution_gives_each_query_its_own_copy():
    """Two near-duplicate queries (neighbouring slices: b = a with one small blob), each with a copy:
    a's copy heavily degraded, b's lightly.  Per query, b's copy beats a's own copy for a; across
    queries it fits b better, so with attribution each query's top-1 is its own copy, and the
    other's copy ranks at most level with it."""
    import cv2

    from ganprint.verify_register import GridSet, grid_of, register_candidates

    a = texture(90, 128)
    b = a.copy()
    cv2.circle(b, (60, 52), 2, 150, -1)
    gens = [texture(100 + i, 128) for i in range(6)]
    gens += [_degraded_copy(a, 6.0, (4.0, -3.0), sigma=1.2, seed=2, noise=6.0),
             _degraded_copy(b, -5.0, (-3.0, 5.0), sigma=0.5, gamma=1.05, seed=3, noise=1.0)]
    keys = GridSet(np.stack([grid_of(x, 64) for x in gens]))
    q = GridSet(np.stack([grid_of(x, 64) for x in (a, b)]))
    cand = np.tile(np.arange(8), (2, 1))
    off = register_candidates(q, keys, cand, threads=1, attribute=False)
    assert list(off["indices"][:, 0]) == [7, 7]  # the lightly degraded copy wins both lists
    out = register_candidates(q, keys, cand, threads=1)
    assert list(out["indices"][:, 0]) == [6, 7], out["indices"][:, :3]
    j = list(out["indices"][0]).index(7)
    assert out["values"][0, j] <= out["values"][0, 0] < off["values"][0, 0]
    np.testing.assert_array_equal(out["values"][1], off["values"][1])  # b's list: nothing foreign above its own
    # without b's copy, b's best is a's copy, far above anything of b's own: it keeps its score
    keys6 = keys.take(range(7))
    one = register_candidates(q, keys6, cand[:, :7], threads=1)
    one_off = register_candidates(q, keys6, cand[:, :7], threads=1, attribute=False)
    assert list(one["indices"][:, 0]) == [6, 6] and one["values"][1, 0] == one_off["values"][1, 0]


def test_coarse_grid_choice_and_pooling():
    from ganprint.verify_register import coarse_size_for, grid_of, pool_grids

    assert [coarse_size_for(s) for s in (16, 32, 48, 64, 17)] == [16, 32, 24, 32, 17]
    assert coarse_size_for(64, 16) == 16
    x = texture(3, 256)
    pooled = pool_grids(grid_of(x, 64)[None], 16)[0].numpy()
    direct = grid_of(x, 16)
    assert abs(float((pooled * direct).sum()) - 1.0) < 1e-3  # the same unit-norm image, up to rounding


@pytest.mark.parametrize("kw, msg", [({"refine_top": 0}, "refine_top"), ({"refine_top": -2}, "refine_top"),
                                     ({"refine_top": 2.5}, "refine_top"), ({"refine_top": True}, "refine_top"),
                                     ({"coarse_size": 24}, "coarse grid"), ({"coarse_size": 64}, "coarse grid"),
                                     ({"query_blurs": ()}, "query blurs"), ({"query_blurs": (0.0, -1.0)}, "query blurs"),
                                     ({"coarse_blurs": (float("nan"),)}, "query blurs")])
def test_cascade_options_are_one_line_errors(kw, msg):
    from ganprint.errors import GanprintError
    from ganprint.verify_register import GridSet, register_candidates

    g = GridSet(np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32))
    with pytest.raises(GanprintError, match=msg) as e:
        register_candidates(g, g, np.zeros((3, 2), np.int64), **kw)
    assert "\n" not in str(e.value)
