"""positives = "instance" / "both": the copy-descriptor positive pair (two replica views of the anchor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ganprint.contrastive import run_training
from ganprint.contrastive import trainer as trainer_mod
from ganprint.contrastive.augment import instance_pair, plain_view, replica_views
from ganprint.contrastive.config import TrainConfig, resolve_config
from ganprint.errors import GanprintError
from ganprint.synth.replicas import ReplicaRanges, apply_transform

TINY = dict(backbone="test_resnet", weights="none", image_size=32, proj_hidden=32, batch_size=2,
            max_steps=3, num_neg_samples=2, min_pos_samples=1, pos_per_anchor=2, sim_threshold=-1.0,
            threads=2, momentum=0.9, lr=1e-3, warmup_steps=1)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 [n, size, size] of distinct smooth blobs (so a rotated copy still correlates)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), size / 10)
        x = (x - x.min()) / (x.max() - x.min() + 1e-6) * 255
        out.append(np.rint(x).astype(np.uint8))
    return torch.from_numpy(np.stack(out))


# -- the pair --------------------------------------------------------------------------------

def test_instance_pair_views_are_replica_transforms_of_the_same_image():
    imgs = smooth_images(5, 48, seed=1)
    ranges = ReplicaRanges(noise=0.0)  # without noise a view can be recomputed from its params
    a, b, pa, pb = instance_pair(imgs, 32, torch.Generator().manual_seed(3), ranges)
    assert a.shape == b.shape == (5, 1, 32, 32) and len(pa) == len(pb) == 5
    rng = np.random.default_rng(0)
    for i in range(5):
        for view, params in ((a, pa[i]), (b, pb[i])):
            assert abs(params["rotation_deg"]) <= ranges.rotation and abs(params["shift_x"]) <= ranges.shift
            again = plain_view(torch.from_numpy(apply_transform(imgs[i].numpy(), params, rng))[None], 32)
            assert torch.equal(view[i], again[0])
        assert pa[i] != pb[i]  # two independent transforms
    assert not torch.allclose(a, b)


def test_instance_views_match_their_own_image_best():
    imgs = smooth_images(6, 48, seed=2)
    a, b, _, _ = instance_pair(imgs, 32, torch.Generator().manual_seed(4))  # default ranges, with noise
    fa = torch.nn.functional.normalize((a - a.mean((2, 3), keepdim=True)).flatten(1), dim=1)
    fb = torch.nn.functional.normalize((b - b.mean((2, 3), keepdim=True)).flatten(1), dim=1)
    sim = fa @ fb.t()
    assert torch.equal(sim.argmax(1), torch.arange(6))


def test_replica_views_are_seeded():
    imgs = smooth_images(3, 40, seed=3)
    v1, p1 = replica_views(imgs, 32, torch.Generator().manual_seed(9))
    v2, p2 = replica_views(imgs, 32, torch.Generator().manual_seed(9))
    v3, _ = replica_views(imgs, 32, torch.Generator().manual_seed(10))
    assert torch.equal(v1, v2) and p1 == p2 and not torch.equal(v1, v3)
    assert v1.min() >= 0 and v1.max() <= 1
    empty, p = replica_views(imgs[:0], 32, torch.Generator().manual_seed(9))
    assert empty.shape == (0, 1, 32, 32) and p == []


# -- config ----------------------------------------------------------------------------------

def test_positives_default_and_choices():
    assert TrainConfig().positives == "pools"
    for v in ("pools", "instance", "both"):
        assert resolve_config({"positives": v}).positives == v
    # without pools the instance view is the positive: no "no positives at all" error
    resolve_config({"positives": "instance", "min_pos_samples": 0, "self_positive": False})
    with pytest.raises(GanprintError, match="no positives at all"):
        resolve_config({"positives": "pools", "min_pos_samples": 0, "self_positive": False})


def test_bad_positives_is_a_one_line_error_naming_the_file(tmp_path):
    from conftest import make_imageclef

    from ganprint.cli.main import app

    data = make_imageclef(tmp_path / "dev", (("generated", 2), ("real_used", 2)), size=16)
    cfg = tmp_path / "bad.toml"
    cfg.write_text('positives = "instances"\n')
    res = CliRunner().invoke(app, ["train", str(data), "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert res.stderr == (f"Error: {cfg}: positives = 'instances' is not one of pools, instance, both\n")
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["train", str(data), "--positives", "nope", "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2 and "positives = 'nope' is not one of pools, instance, both" in res.stderr
    assert res.stderr.count("\n") == 1


# -- training --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    from conftest import make_imageclef

    return make_imageclef(tmp_path_factory.mktemp("data") / "dev", seed=400)


def spy_loss(monkeypatch, seen):
    real = trainer_mod.hybrid_contrastive_loss

    def spy(q, k_pos, negatives, tau, alpha, pos_mask, neg_mask):
        seen.append({"k_pos": k_pos.detach().clone(), "pos_mask": pos_mask.clone()})
        return real(q, k_pos, negatives, tau, alpha, pos_mask, neg_mask)

    monkeypatch.setattr(trainer_mod, "hybrid_contrastive_loss", spy)


def test_instance_training_is_deterministic_and_uses_only_the_instance_positive(dev, tmp_path, monkeypatch):
    seen: list = []
    spy_loss(monkeypatch, seen)
    pairs = []
    real_pair = trainer_mod.instance_pair

    def pair_spy(images, *a, **kw):
        out = real_pair(images, *a, **kw)
        pairs.append(images.clone())
        return out

    monkeypatch.setattr(trainer_mod, "instance_pair", pair_spy)
    a = run_training({"data": str(dev), "out": str(tmp_path / "a"), **TINY, "positives": "instance"})
    assert a.step == 3 and all(np.isfinite(a.losses))
    # each step: the pair is built from the step's anchors (generated images), one positive per anchor
    assert len(pairs) == 3 and all(p.shape[0] == 2 for p in pairs)
    assert all(s["k_pos"].shape[1] == 1 and s["pos_mask"].all() for s in seen)
    b = run_training({"data": str(dev), "out": str(tmp_path / "b"), **TINY, "positives": "instance"})
    assert a.digest == b.digest and a.losses == b.losses
    c = run_training({"data": str(dev), "out": str(tmp_path / "c"), **TINY, "positives": "instance", "seed": 1})
    assert c.digest != a.digest
    pools = run_training({"data": str(dev), "out": str(tmp_path / "p"), **TINY})
    assert pools.digest != a.digest
    from ganprint.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(a.checkpoint)
    assert meta["config"]["positives"] == "instance" and meta["pools"]["source"] == "none (positives = instance)"


def test_both_keeps_pool_positives_and_adds_the_instance_view(dev, tmp_path, monkeypatch):
    seen: list = []
    spy_loss(monkeypatch, seen)
    r = run_training({"data": str(dev), "out": str(tmp_path / "both"), **TINY, "positives": "both",
                      "self_positive": False, "max_steps": 2})
    assert r.step == 2 and all(np.isfinite(r.losses))
    # the instance key (always on) + pos_per_anchor = 2 pool positives, all valid (sim_threshold -1)
    assert all(s["k_pos"].shape[1] == 3 and s["pos_mask"][:, 0].all() for s in seen)
    assert all(s["pos_mask"][:, 1:].any() for s in seen)


# -- views at the generator's resolution, clean second views --------------------------------

def test_work_size_applies_the_transform_at_that_resolution():
    import cv2

    imgs = smooth_images(4, 64, seed=5)
    ranges = ReplicaRanges(noise=0.0)
    g = torch.Generator().manual_seed(7)
    v, params = replica_views(imgs, 32, g, ranges, work_size=16)
    assert v.shape == (4, 1, 32, 32) and len(params) == 4
    rng = np.random.default_rng(0)
    for i, p in enumerate(params):
        assert abs(p["rotation_deg"]) <= ranges.rotation and abs(p["shift_y"]) <= ranges.shift
        assert ranges.gamma_min <= p["gamma"] <= ranges.gamma_max and 1.0 <= p["blur"] <= ranges.blur
        small = cv2.resize(imgs[i].numpy(), (16, 16), interpolation=cv2.INTER_AREA)
        again = plain_view(torch.from_numpy(apply_transform(small, p, rng))[None], 32)
        assert torch.equal(v[i], again[0])
    # the same draw at the cache's resolution is a different (sharper) view
    full, p_full = replica_views(imgs, 32, torch.Generator().manual_seed(7), ranges)
    assert p_full == params and not torch.allclose(full, v)


def test_clean_second_views_are_the_plain_image_and_leave_the_rest_unchanged():
    imgs = smooth_images(8, 48, seed=6)
    a0, b0, pa0, pb0 = instance_pair(imgs, 32, torch.Generator().manual_seed(11))
    a, b, pa, pb = instance_pair(imgs, 32, torch.Generator().manual_seed(11), clean=0.5)
    plain = plain_view(imgs, 32)
    picked = [i for i, p in enumerate(pb) if p is None]
    assert 0 < len(picked) < 8  # seeded: some rows clean, some not
    assert torch.equal(a, a0) and pa == pa0
    for i in range(8):
        assert torch.equal(b[i], plain[i] if i in picked else b0[i])
        assert pb[i] is None or pb[i] == pb0[i]
    _, b1, _, pb1 = instance_pair(imgs, 32, torch.Generator().manual_seed(11), clean=1.0)
    assert torch.equal(b1, plain) and pb1 == [None] * 8


@pytest.mark.parametrize("key,value,msg", [
    ("instance_res", 4, "instance_res = 4 must be 0 (the cache's resolution) or between 8 and 4096 pixels"),
    ("instance_res", -1, "instance_res = -1 must be 0"),
    ("instance_clean", 1.5, "instance_clean = 1.5 must be a probability in [0, 1]"),
    ("instance_clean", float("nan"), "instance_clean = nan must be a finite number"),
])
def test_instance_keys_are_validated(key, value, msg):
    with pytest.raises(GanprintError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        resolve_config({key: value})
    ok = resolve_config({"instance_res": 64, "instance_clean": 0.5})
    assert (ok.instance_res, ok.instance_clean) == (64, 0.5)


def test_instance_training_with_clean_views_at_work_size_learns(dev, tmp_path):
    r = run_training({"data": str(dev), "out": str(tmp_path / "a"), **TINY, "positives": "instance",
                      "instance_res": 16, "instance_clean": 0.5, "max_steps": 6, "batch_size": 4, "lr": 3e-3,
                      "warmup_steps": 0, "num_neg_samples": 0})
    assert r.step == 6 and all(np.isfinite(r.losses))
    assert np.mean(r.losses[-3:]) < np.mean(r.losses[:3])  # the loss goes down
    from ganprint.checkpoint import read_checkpoint_meta

    cfg = read_checkpoint_meta(r.checkpoint)["config"]
    assert (cfg["instance_res"], cfg["instance_clean"]) == (16, 0.5)


def test_resume_of_a_checkpoint_from_before_the_instance_keys(dev, tmp_path):
    from ganprint.checkpoint import read_checkpoint, save_checkpoint

    cfg = {"data": str(dev), "out": str(tmp_path / "r"), **TINY, "positives": "instance"}
    first = run_training({**cfg, "stop_at_step": 2})
    tensors, meta = read_checkpoint(first.checkpoint)
    for key in ("instance_res", "instance_clean"):  # as written by an older ganprint
        meta["config"].pop(key)
    save_checkpoint(first.checkpoint, tensors, meta)
    done = run_training(cfg, resume=True)
    assert done.step == 3 and done.resumed_from == 2
    with pytest.raises(GanprintError, match=r"--resume with a different config \(instance_clean\)"):
        run_training({**cfg, "instance_clean": 0.5}, resume=True)
