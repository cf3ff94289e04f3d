"""``ganprint synth --copies F``: replicas of members under random transforms, their truth file, counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.synth.helpers import run_cli, digests

TINY = ["--size", "32", "--gan-res", "16", "--gan-width", "4", "--z-dim", "8", "--steps", "20",
        "--batch-size", "8", "--dev-real", "5", "--test-real", "4", "--dev-generated", "10",
        "--test-generated", "12", "--log-every", "10", "--threads", "1", "--quiet", "--seed", "7"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    out = {}
    for name, extra in (("none", ["--copies", "0"]), ("copies", ["--copies", "0.5"]),
                        ("again", ["--copies", "0.5"])):
        res = run_cli(str(root / name), *TINY, *extra)
        assert res.exit_code == 0, res.stderr
        out[name] = root / name
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_replicas_csv_lists_exactly_the_replaced_images(runs):
    base, cop = digests(runs["none"]), digests(runs["copies"])
    rows = read_csv(runs["copies"] / "replicas.csv")
    assert len(rows) == 5 + 6  # round(0.5 * 10) dev, round(0.5 * 12) test
    listed = {r["file"] for r in rows}
    assert len(listed) == len(rows)
    changed = {f for f in base if base[f] != cop.get(f)}
    # every listed file differs from the GAN sample it replaced; nothing else changed at all
    # (reals, truth, generator weights, the other samples)
    assert changed == listed
    assert set(cop) == set(base) | {"replicas.csv"}
    for r in rows:
        assert r["file"] == f"{r['split']}/generated/{r['image_id']}.png"
        assert (runs["copies"] / r["file"]).exists()
    assert {r["split"] for r in rows} == {"dev", "test"}


def test_sources_are_members_of_the_generator_training_set(runs):
    meta = json.loads((runs["copies"] / "synth.json").read_text())
    members = {r["image_id"]: r for r in meta["images"] if r["label"] == 1}
    assert len(members) == meta["generator"]["train_images"] == 9
    for r in read_csv(runs["copies"] / "replicas.csv"):
        m = members[r["source_id"]]
        assert r["source_file"] == m["file"] and r["source_split"] == m["split"]
        assert m["subset"] in ("real_used", "real_unknown")


def test_counts_in_synth_json(runs):
    meta = json.loads((runs["copies"] / "synth.json").read_text())
    rows = read_csv(runs["copies"] / "replicas.csv")
    c = meta["counts"]["replicas"]
    assert c["dev"] == 5 and c["test"] == 6
    truth = dict(r for r in csv.reader(open(runs["copies"] / "test_truth.csv")) if r[0] != "image_id")
    copied = {r["source_id"] for r in rows if r["split"] == "test"}
    assert c["test_members_with_replica"] == sum(truth[i] == "1" for i in copied if i in truth)
    assert c["members_with_replica"] == len({r["source_id"] for r in rows})
    assert meta["config"]["copies"] == 0.5 and meta["replicas"]["file"] == "replicas.csv"
    assert meta["counts"]["dev"]["generated"] == 10  # replicas count among the generated images
    none = json.loads((runs["none"] / "synth.json").read_text())
    assert none["counts"]["replicas"] == {"dev": 0, "test": 0, "test_members_with_replica": 0,
                                          "members_with_replica": 0}
    assert "replicas" not in none and not (runs["none"] / "replicas.csv").exists()


def test_replicas_are_saved_like_samples(runs):
    from PIL import Image

    rows = read_csv(runs["copies"] / "replicas.csv")
    replica = runs["copies"] / rows[0]["file"]
    sample = next(p for p in sorted((runs["copies"] / "dev/generated").iterdir())
                  if f"dev/generated/{p.name}" not in {r["file"] for r in rows})
    with Image.open(replica) as a, Image.open(sample) as b:
        assert (a.format, a.mode, a.size, a.getpalette()) == (b.format, b.mode, b.size, b.getpalette())
        assert a.info.keys() == b.info.keys()


def test_transforms_stay_in_default_ranges(runs):
    rows = read_csv(runs["copies"] / "replicas.csv")
    for r in rows:
        assert abs(float(r["rotation_deg"])) <= 10
        assert abs(float(r["shift_x"])) <= 0.08 and abs(float(r["shift_y"])) <= 0.08
        assert 0.8 <= float(r["gamma"]) <= 1.25
        assert 1.0 <= float(r["blur"]) <= 2.0 and 0.0 <= float(r["noise_sigma"]) <= 6.0
    # the draws are spread over the range, not stuck at one value
    assert np.ptp([float(r["rotation_deg"]) for r in rows]) > 5


def test_transform_options_set_the_ranges(tmp_path):
    out = tmp_path / "o"
    res = run_cli(str(out), *TINY, "--copies", "1", "--copy-rotation", "2", "--copy-shift", "0.01",
                  "--copy-gamma-min", "1.1", "--copy-gamma-max", "1.2", "--copy-blur", "1.5", "--copy-noise", "0.5")
    assert res.exit_code == 0, res.stderr
    from ganprint.synth.replicas import read_replicas

    rows = read_replicas(out)
    assert len(rows) == 22  # every generated image is a replica
    for r in rows:
        assert abs(r["rotation_deg"]) <= 2 and abs(r["shift_x"]) <= 0.01 and abs(r["shift_y"]) <= 0.01
        assert 1.1 <= r["gamma"] <= 1.2 and 1.0 <= r["blur"] <= 1.5 and 0 <= r["noise_sigma"] <= 0.5


def test_identity_transform_gives_the_member_as_the_generator_saw_it(tmp_path):
    from ganprint.data import load_image
    from ganprint.synth.dataset import resize_batch
    from ganprint.synth.replicas import read_replicas

    out = tmp_path / "o"
    res = run_cli(str(out), *TINY, "--copies", "0.3", "--copy-rotation", "0", "--copy-shift", "0",
                  "--copy-gamma-min", "1", "--copy-gamma-max", "1", "--copy-blur", "1", "--copy-noise", "0")
    assert res.exit_code == 0, res.stderr
    for r in read_replicas(out):
        src = load_image(str(out / r["source_file"]))[None]
        expected = resize_batch(resize_batch(src, 16), 32, "bicubic")[0]
        assert np.array_equal(load_image(str(out / r["file"])), expected)


def test_apply_transform():
    from ganprint.synth.replicas import apply_transform

    rng = np.random.default_rng(0)
    img = np.zeros((40, 40), dtype=np.uint8)
    img[10:20, 12:22] = 200
    ident = {"rotation_deg": 0.0, "shift_x": 0.0, "shift_y": 0.0, "gamma": 1.0, "blur": 1.0, "noise_sigma": 0.0}
    assert np.array_equal(apply_transform(img, ident, rng), img)
    shifted = apply_transform(img, {**ident, "shift_x": 0.1, "shift_y": -0.05}, rng)  # 4 px right, 2 px up
    assert np.array_equal(shifted[8:18, 16:26], img[10:20, 12:22]) and shifted[19, 13] == 0
    flat = np.full((8, 8), 128, dtype=np.uint8)
    assert int(apply_transform(flat, {**ident, "gamma": 2.0}, rng)[0, 0]) == round(255 * (128 / 255) ** 2)
    rot = apply_transform(img, {**ident, "rotation_deg": 90.0}, rng)
    assert np.array_equal(rot, np.rot90(img))  # counter-clockwise, as OpenCV's positive angle
    noisy = apply_transform(flat, {**ident, "noise_sigma": 5.0}, rng).astype(float)
    assert 3 < noisy.std() < 7
    blurred = apply_transform(img, {**ident, "blur": 2.0}, rng)
    assert blurred[10:20, 12:22].min() < 200 and 0 < int(blurred[9, 15]) < 200


def test_same_seed_same_replicas(runs):
    assert digests(runs["copies"]) == digests(runs["again"])
    a = json.loads((runs["copies"] / "synth.json").read_text())
    b = json.loads((runs["again"] / "synth.json").read_text())
    assert a["counts"] == b["counts"] and a["images"] == b["images"]


def test_other_seed_other_replicas(runs, tmp_path):
    res = run_cli(str(tmp_path / "s8"), *TINY, "--copies", "0.5", "--seed", "8")
    assert res.exit_code == 0, res.stderr
    a = read_csv(runs["copies"] / "replicas.csv")
    b = read_csv(tmp_path / "s8" / "replicas.csv")
    assert [r["rotation_deg"] for r in a] != [r["rotation_deg"] for r in b]


def test_copies_zero_never_touches_the_replica_code(tmp_path, monkeypatch):
    import ganprint.synth.replicas as replicas

    def boom(*a, **k):
        raise AssertionError("replica code ran with --copies 0")

    monkeypatch.setattr(replicas, "plan_replicas", boom)
    monkeypatch.setattr(replicas, "make_replicas", boom)
    res = run_cli(str(tmp_path / "o"), *TINY)
    assert res.exit_code == 0, res.stderr
    assert not (tmp_path / "o" / "replicas.csv").exists()


def test_copies_regime_is_balanced_with_15_percent():
    from ganprint.synth import REGIMES, resolve_config

    a, b = resolve_config("copies"), resolve_config("balanced")
    assert a.copies == 0.15 and b.copies == 0.0
    assert {k: v for k, v in REGIMES["copies"].items() if k != "copies"} == REGIMES["balanced"]
    assert resolve_config("copies", copies=0.3).copies == 0.3


@pytest.mark.parametrize("args, message", [
    (["--copies", "1.5"], "Error: --copies 1.5: must be a fraction in [0, 1] (e.g. 0.15)"),
    (["--copy-shift", "0.6"], "Error: --copy-shift 0.6: must be in [0, 0.5) (a fraction of the side)"),
    (["--copy-gamma-min", "1.3"], "Error: --copy-gamma-min 1.3 / --copy-gamma-max 1.25: need 0 < min <= max"),
    (["--copy-blur", "0.5"], "Error: --copy-blur 0.5: must be between 1 (no blur) and 16"),
])
def test_bad_copy_options(tmp_path, args, message):
    res = run_cli(str(tmp_path / "o"), *args)
    assert res.exit_code == 2
    assert res.stderr.strip() == message
    assert not (tmp_path / "o").exists()


def test_copies_zero_is_bit_identical_to_the_plain_dcgan_path(runs, tmp_path):
    """The files of ``--copies 0`` equal those of the pre-replica pipeline, rebuilt here from the
    unchanged pieces (phantoms, split, DCGAN training and sampling, PNG layout, weights file)."""
    from ganprint import __version__
    from ganprint.synth import gan
    from ganprint.synth.dataset import _Deterministic, _write_layout, phantom_reals, resize_batch, resolve_config

    cfg = resolve_config(size=32, gan_res=16, gan_width=4, z_dim=8, steps=20, batch_size=8, dev_real=5, test_real=4,
                         dev_generated=10, test_generated=12, log_every=10, threads=1, seed=7)
    with _Deterministic(1):
        reals = phantom_reals(cfg)
        members = np.flatnonzero((reals.assign == 0) | (reals.assign == 2))
        gcfg = gan.GanConfig(res=16, z_dim=8, ngf=4, ndf=4, batch_size=8, steps=20, lr_g=cfg.lr, lr_d=cfg.lr,
                             log_every=10)
        res = gan.train_gan(resize_batch(reals.images[members], 16), gcfg, "cpu", seed=7)
        gen_dev = resize_batch(gan.sample(res.generator, 10, 8, 7 * 2 + 101, "cpu"), 32, "bicubic")
        gen_test = resize_batch(gan.sample(res.generator, 12, 8, 7 * 2 + 102, "cpu"), 32, "bicubic")
    ref = tmp_path / "ref"
    _write_layout(ref, cfg, reals, reals.assign, gen_dev, gen_test)
    gan.save_generator(res.generator, gcfg, ref / "generator.safetensors",
                       extra={"ganprint_version": __version__, "seed": 7, "regime": "memorize"})
    assert digests(ref) == digests(runs["none"])
