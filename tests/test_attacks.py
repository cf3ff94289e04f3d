"""Attack formulas against hand computations on tiny configurations; the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ganprint.attacks import (
    ATTACKS,
    attack_names,
    AttackContext,
    AttackSpec,
    get_attack,
    kde_logpdf,
    parse_params,
    register_attack,
    run_attack,
)
from ganprint.errors import GanprintError

# points on a line (L2): generated at 0, 1, 4; real images at 0.5, 3, 10
GEN = [[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]]
REAL = [[0.5, 0.0], [3.0, 0.0], [10.0, 0.0]]
# distances real x gen: 0.5: (0.5, 0.5, 3.5); 3: (3, 2, 1); 10: (10, 9, 6)
# real x real:          0.5-3: 2.5, 0.5-10: 9.5, 3-10: 7


@pytest.fixture
def line():
    return AttackContext.from_embeddings(GEN, REAL, metric="l2", k=3)


@pytest.fixture
def line_topk_only():
    # no full matrix, only the nearest generated image kept: monte_carlo must go to the embeddings
    return AttackContext.from_embeddings(GEN, REAL, metric="l2", k=1, full=False)


def test_registry_names():
    assert list(ATTACKS) == ["max_sim", "topk_mean", "monte_carlo", "gan_leaks", "gan_leaks_cal", "domias",
                             "dist_ratio", "verify_max", "verify_cal"]


def test_max_sim_and_gan_leaks_l2(line):
    assert np.allclose(run_attack("max_sim", line), [-0.5, -1.0, -6.0], atol=1e-6)
    assert np.allclose(run_attack("gan_leaks", line), [-0.5, -1.0, -6.0], atol=1e-6)


def test_topk_mean_l2(line):
    assert np.allclose(run_attack("topk_mean", line, {"k": 2}), [-0.5, -1.5, -7.5], atol=1e-6)
    assert np.allclose(run_attack("topk_mean", line, {"k": 3}), [-4.5 / 3, -2.0, -25 / 3], atol=1e-6)
    assert np.allclose(run_attack("topk_mean", line, {"k": 4}), run_attack("topk_mean", line, {"k": 3}))  # G = 3


def test_monte_carlo_l2(line, line_topk_only):
    # eps = median(0.5, 1, 6) = 1; within 1: {0, 1} for 0.5, {4} for 3, none for 10; over G = 3
    want = [2 / 3, 1 / 3, 0.0]
    assert np.allclose(run_attack("monte_carlo", line), want)
    assert "matrix" not in line_topk_only.tensors
    assert np.allclose(run_attack("monte_carlo", line_topk_only), want)
    # quantile 1: eps = 6 -> 0.5: 3 (0.5, 0.5, 3.5), 3: 3, 10: 1 (6)
    assert np.allclose(run_attack("monte_carlo", line, {"quantile": 1.0}), [1.0, 1.0, 1 / 3])
    assert np.allclose(run_attack("monte_carlo", line_topk_only, {"quantile": 1.0}), [1.0, 1.0, 1 / 3])
    # quantile 0: eps = 0.5 -> 0.5: 2 (0.5, 0.5)
    assert np.allclose(run_attack("monte_carlo", line, {"quantile": 0.0}), [2 / 3, 0.0, 0.0])


def test_gan_leaks_calibrated_by_other_reals(line):
    # nearest other real: 2.5, 2.5, 7 -> -(d_gen - d_ref) = 2, 1.5, 1
    assert np.allclose(run_attack("gan_leaks_cal", line), [2.0, 1.5, 1.0], atol=1e-6)


def test_gan_leaks_calibrated_by_reference_set():
    ctx = AttackContext.from_embeddings(GEN, REAL, ref=[[2.0, 0.0], [20.0, 0.0]], metric="l2", k=2)
    # nearest reference: 1.5, 1, 8
    assert np.allclose(run_attack("gan_leaks_cal", ctx), [1.0, 0.0, 2.0], atol=1e-6)


def test_dist_ratio(line):
    assert np.allclose(run_attack("dist_ratio", line, {"n": 1}), [-0.5 / 2.5, -1 / 2.5, -6 / 7], atol=1e-6)
    # two nearest reals: (2.5 + 9.5) / 2, (2.5 + 7) / 2, (7 + 9.5) / 2
    assert np.allclose(run_attack("dist_ratio", line, {"n": 2}), [-0.5 / 6, -1 / 4.75, -6 / 8.25], atol=1e-6)
    # only 2 other reals: n is capped at what exists
    assert np.allclose(run_attack("dist_ratio", line, {"n": 3}), run_attack("dist_ratio", line, {"n": 2}))


def test_too_few_stored_neighbours_is_an_error(line_topk_only):
    with pytest.raises(GanprintError, match="--k 2"):
        run_attack("dist_ratio", line_topk_only, {"n": 2})
    with pytest.raises(GanprintError, match="--k 2"):
        run_attack("topk_mean", line_topk_only, {"k": 2})


def test_cosine_attacks_by_hand():
    # cosines: (0.6, 0.8) -> 0.6, 0.8; (1, 0) -> 1, 0; (-1, 0) -> -1, 0
    ctx = AttackContext.from_embeddings([[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]], k=2)
    assert np.allclose(run_attack("max_sim", ctx), [0.8, 1.0, 0.0], atol=1e-6)
    assert np.allclose(run_attack("gan_leaks", ctx), [-0.2, 0.0, -1.0], atol=1e-6)  # d = 1 - cos
    assert np.allclose(run_attack("topk_mean", ctx, {"k": 2}), [0.7, 0.5, -0.5], atol=1e-6)
    # eps = median(0.2, 0, 1) = 0.2 -> cos >= 0.8: one generated image each for the first two
    assert np.allclose(run_attack("monte_carlo", ctx), [0.5, 0.5, 0.0])
    # other reals: cos(x0, x1) = 0.6, cos(x0, x2) = -0.6, cos(x1, x2) = -1 -> nearest d: 0.4, 0.4, 1.6
    assert np.allclose(run_attack("gan_leaks_cal", ctx), [0.2, 0.4, 0.6], atol=1e-6)
    assert np.allclose(run_attack("dist_ratio", ctx, {"n": 1}), [-0.5, 0.0, -1 / 1.6], atol=1e-6)


def test_kde_logpdf_matches_scipy_and_leave_one_out():
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(0)
    data, pts = rng.normal(size=(40, 3)), rng.normal(size=(7, 3))
    kde = gaussian_kde(data.T)
    assert np.allclose(kde_logpdf(pts, data), kde.logpdf(pts.T))
    # leave-one-out at the data points: (n p(x_i) - K(0)) / (n - 1), K(0) = 1 / sqrt(det(2 pi cov))
    n = len(data)
    k0 = 1.0 / math.sqrt(np.linalg.det(2 * math.pi * kde.covariance))
    want = np.log((n * kde.pdf(data.T) - k0) / (n - 1))
    assert np.allclose(kde_logpdf(data, data, exclude=np.arange(n)), want)


def test_domias_matches_pca_plus_scipy_kde():
    from scipy.stats import gaussian_kde
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    gen, real, ref = rng.normal(size=(60, 6)), rng.normal(size=(10, 6)) * 1.5, rng.normal(size=(30, 6))
    ctx = AttackContext.from_embeddings(gen, real, ref=ref, metric="l2", k=3)
    got = run_attack("domias", ctx, {"dim": 2})
    pca = PCA(n_components=2, random_state=0).fit(np.concatenate([gen, ref]))
    zx = pca.transform(real).T
    want = gaussian_kde(pca.transform(gen).T).logpdf(zx) - gaussian_kde(pca.transform(ref).T).logpdf(zx)
    assert np.allclose(got, want, atol=1e-8)


def test_domias_without_reference_leaves_each_real_out():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2)
    gen, real = rng.normal(size=(50, 5)), rng.normal(size=(12, 5))
    ctx = AttackContext.from_embeddings(gen, real, metric="l2", k=3)
    got = run_attack("domias", ctx, {"dim": 2})
    pca = PCA(n_components=2, random_state=0).fit(np.concatenate([gen, real]))
    zg, zr = pca.transform(gen), pca.transform(real)
    want = kde_logpdf(zr, zg) - kde_logpdf(zr, zr, exclude=np.arange(12))
    assert np.allclose(got, want)


def test_higher_means_member_on_a_memorising_generator():
    # generated images are near-copies of the members: every attack must rank members higher
    rng = np.random.default_rng(3)
    members, non = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    gen = np.concatenate([members + 0.05 * rng.normal(size=members.shape), rng.normal(size=(40, 8))])
    ctx = AttackContext.from_embeddings(gen, np.concatenate([members, non]), metric="l2", k=5)
    for name in attack_names(ctx.tensors):  # verify_* need `simmatrix --verify` (tests/test_verify.py)
        s = run_attack(name, ctx, {"dim": 3} if name == "domias" else None)
        assert s[:20].mean() > s[20:].mean(), name


def test_register_attack_validates():
    def f(ctx, alpha=1.0):
        return np.zeros(ctx.n_real)

    with pytest.raises(ValueError, match="name"):
        register_attack(AttackSpec("Bad Name", f, "x"))
    with pytest.raises(ValueError, match="already"):
        register_attack(AttackSpec("max_sim", f, "x"))
    with pytest.raises(TypeError, match="callable"):
        register_attack(AttackSpec("t_nc", 3, "x"))
    with pytest.raises(TypeError, match="beta"):
        register_attack(AttackSpec("t_beta", f, "x", {"beta": 1.0}))
    with pytest.raises(TypeError, match="default"):
        register_attack(AttackSpec("t_list", f, "x", {"alpha": [1]}))
    assert "t_beta" not in ATTACKS


def test_custom_attack_runs_and_output_is_checked(line):
    register_attack(AttackSpec("t_const", lambda ctx, c=2.0: np.full(ctx.n_real, c), "constant", {"c": 2.0}))
    register_attack(AttackSpec("t_short", lambda ctx: np.zeros(1), "wrong shape"))
    register_attack(AttackSpec("t_nan", lambda ctx: np.full(ctx.n_real, np.nan), "nan"))
    try:
        assert run_attack("t_const", line, parse_params("t_const", ["c=3.5"])).tolist() == [3.5] * 3
        with pytest.raises(RuntimeError, match="shape"):
            run_attack("t_short", line)
        with pytest.raises(GanprintError, match="non-finite"):
            run_attack("t_nan", line)
    finally:
        for n in ("t_const", "t_short", "t_nan"):
            ATTACKS.pop(n, None)


def test_params_and_names_errors(line):
    with pytest.raises(GanprintError, match="unknown attack"):
        get_attack("nope")
    with pytest.raises(GanprintError, match="KEY=VALUE"):
        parse_params("topk_mean", ["k"])
    with pytest.raises(GanprintError, match="no such parameter"):
        parse_params("topk_mean", ["n=3"])
    with pytest.raises(GanprintError, match="expected a int"):
        parse_params("topk_mean", ["k=x"])
    assert parse_params("domias", ["dim=3"]) == {"dim": 3}
    with pytest.raises(GanprintError, match="unknown parameter"):
        run_attack("max_sim", line, {"k": 1})


def test_context_from_artifact_loads_embeddings_lazily(tmp_path):
    from test_similarity import make_emb  # same folder, pytest puts it on sys.path

    from ganprint.artifacts import read_artifact
    from ganprint.similarity import run_simmatrix

    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 4))
    base = make_emb(tmp_path / "emb", x, ["generated"] * 24 + ["real_used"] * 3 + ["real_not_used"] * 3)
    sim = run_simmatrix(tmp_path / "sim", dataset=base, k=2, full=False, metric="l2", device="cpu").base
    ctx = AttackContext.from_artifact(read_artifact(sim))
    assert ctx._cache == {}
    s = run_attack("monte_carlo", ctx)
    direct = AttackContext.from_embeddings(x[:24], x[24:], metric="l2", k=2)
    assert np.allclose(s, run_attack("monte_carlo", direct))
    assert np.allclose(run_attack("domias", ctx, {"dim": 2}), run_attack("domias", direct, {"dim": 2}))
    assert torch.equal(ctx.embeddings("gen"), torch.as_tensor(x[:24], dtype=torch.float32))
    # the embeddings changed since: refused
    make_emb(tmp_path / "emb", x + 1, ["generated"] * 24 + ["real_used"] * 3 + ["real_not_used"] * 3)
    ctx2 = AttackContext.from_artifact(read_artifact(sim))
    with pytest.raises(GanprintError, match="changed since"):
        run_attack("domias", ctx2)
