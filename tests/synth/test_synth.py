"""``ganprint synth``: layout, palette PNGs, truth file, split, provenance, determinism, errors."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ganprint.errors import GanprintError
from tests.synth.helpers import digests, run_cli

# a tiny run: 32 px images, a 16 px GAN with 4 channels, 30 steps (seconds on 2 cores)
TINY = ["--size", "32", "--gan-res", "16", "--gan-width", "4", "--z-dim", "8", "--steps", "30",
        "--batch-size", "8", "--dev-real", "5", "--test-real", "4", "--dev-generated", "6",
        "--test-generated", "7", "--log-every", "10", "--threads", "1", "--quiet"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels_sha(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return hashlib.sha256(np.asarray(im).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "bench"
    res = run_cli(str(out), *TINY, "--seed", "3")
    assert res.exit_code == 0, res.stderr
    return out, res


def test_layout_counts_and_stdout(tiny):
    out, res = tiny
    assert res.stdout.strip() == str(out)
    expected = {"dev/generated": 6, "dev/real_used": 5, "dev/real_not_used": 5,
                "test/generated": 7, "test/real_unknown": 8}
    for sub, n in expected.items():
        files = sorted((out / sub).iterdir())
        assert len(files) == n, sub
        assert all(f.suffix == ".png" for f in files)
    assert sorted(p.name for p in out.iterdir()) == ["dev", "generator.safetensors", "synth.json", "test", "test_truth.csv"]
    # nothing left over next to OUT (the temporary folder was renamed)
    assert [p.name for p in out.parent.iterdir()] == ["bench"]


def test_images_are_8bit_grayscale_palette_pngs(tiny):
    from PIL import Image

    out, _ = tiny
    from ganprint.data import load_image

    for f in sorted(out.glob("*/*/*.png")):
        with Image.open(f) as im:
            assert im.format == "PNG" and im.mode == "P" and im.size == (32, 32)
            pal = im.getpalette()
            assert pal[:768] == [v for i in range(256) for v in (i, i, i)]
            idx = np.asarray(im)
        # the package's own loader goes through the palette to the same gray levels
        assert np.array_equal(load_image(str(f)), idx)
    # real images are not blank: a body (bright) on air (black)
    arr = load_image(str(next((out / "dev/real_used").iterdir())))
    assert arr.min() < 20 and arr.max() > 120


def test_truth_file_matches_real_unknown_and_provenance(tiny):
    out, _ = tiny
    with open(out / "test_truth.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image_id", "label"]
    truth = {r[0]: int(r[1]) for r in rows[1:]}
    files = {p.stem for p in (out / "test/real_unknown").iterdir()}
    assert set(truth) == files and len(rows) - 1 == len(files)
    assert sorted(truth.values()) == [0] * 4 + [1] * 4
    meta = json.loads((out / "synth.json").read_text())
    by_id = {r["image_id"]: r for r in meta["images"]}
    assert all(by_id[i]["label"] == lab for i, lab in truth.items())
    assert all(by_id[p.stem]["label"] == 1 for p in (out / "dev/real_used").iterdir())
    assert all(by_id[p.stem]["label"] == 0 for p in (out / "dev/real_not_used").iterdir())


def test_dev_and_test_reals_are_disjoint_and_patients_never_cross(tiny):
    out, _ = tiny
    dev = {pixels_sha(p) for sub in ("real_used", "real_not_used") for p in (out / "dev" / sub).iterdir()}
    test = {pixels_sha(p) for p in (out / "test/real_unknown").iterdir()}
    assert len(dev) == 10 and len(test) == 8  # no duplicate image anywhere
    assert not dev & test
    meta = json.loads((out / "synth.json").read_text())
    where: dict[int, set] = {}
    for r in meta["images"]:
        where.setdefault(r["patient"], set()).add((r["split"], r["label"]))
    # a patient is in exactly one of: dev member, dev non-member, test member, test non-member
    assert all(len(v) == 1 for v in where.values())
    # two slices per patient by default: some patient contributes two near-duplicate slices
    assert any(sum(r["patient"] == p for r in meta["images"]) == 2 for p in where)


def test_synth_json_provenance(tiny):
    from ganprint import __version__

    out, _ = tiny
    meta = json.loads((out / "synth.json").read_text())
    assert meta["ganprint_version"] == __version__
    assert meta["seed"] == 3 and meta["config"]["regime"] == "memorize"
    assert meta["config"]["size"] == 32 and meta["config"]["gan_res"] == 16 and meta["config"]["steps"] == 30
    assert meta["generator"]["sha256"] == sha(out / "generator.safetensors")
    assert meta["generator"]["train_images"] == 5 + 4 == meta["counts"]["train_images"]
    assert meta["counts"]["dev"] == {"generated": 6, "real_used": 5, "real_not_used": 5}
    assert [p["step"] for p in meta["curve"]] == [10, 20, 30]
    assert all(np.isfinite(p["loss_d"]) and np.isfinite(p["loss_g"]) for p in meta["curve"])
    assert set(meta["seconds"]) >= {"real_images", "train", "sample", "write", "total"}
    assert meta["seconds"]["total"] >= meta["seconds"]["train"] > 0


def test_generator_file_reloads_without_pickle(tiny):
    import torch

    from ganprint.synth.gan import load_generator

    out, _ = tiny
    G, cfg, meta = load_generator(out / "generator.safetensors")
    assert cfg.res == 16 and cfg.z_dim == 8 and meta["seed"] == 3
    with torch.no_grad():
        x = G(torch.randn(3, cfg.z_dim))
    assert x.shape == (3, 1, 16, 16) and float(x.abs().max()) <= 1.0


def test_same_seed_same_split_and_images(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    res = run_cli(str(again), *TINY, "--seed", "3")
    assert res.exit_code == 0, res.stderr
    a = json.loads((out / "synth.json").read_text())
    b = json.loads((again / "synth.json").read_text())
    assert a["images"] == b["images"]  # identical split, names, patients and labels
    assert (out / "test_truth.csv").read_bytes() == (again / "test_truth.csv").read_bytes()
    # on CPU the GAN itself is reproducible: same weights, same generated images
    assert a["generator"]["sha256"] == b["generator"]["sha256"]
    assert a["curve"][-1]["loss_d"] == b["curve"][-1]["loss_d"]
    for p in sorted(out.glob("*/*/*.png")):
        assert p.read_bytes() == (again / p.relative_to(out)).read_bytes(), p


def test_other_seed_other_split_and_patients():
    from ganprint.synth.dataset import resolve_config, split_groups
    from ganprint.synth.phantoms import render_patients

    group = np.repeat(np.arange(20), 2)
    a = split_groups(group, resolve_config(dev_real=5, test_real=4, seed=3))
    b = split_groups(group, resolve_config(dev_real=5, test_real=4, seed=4))
    assert not np.array_equal(a, b)
    assert not np.array_equal(render_patients(2, 1, 32, seed=3)[0], render_patients(2, 1, 32, seed=4)[0])


def test_refuses_non_empty_out_then_force_replaces(tiny, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = run_cli(str(out), *TINY)
    assert res.exit_code == 2
    assert res.stderr.strip() == f"Error: {out}: folder exists and is not empty; choose another OUT or pass --force to replace it"
    assert (out / "keep.txt").exists() and res.stdout == ""
    res = run_cli(str(out), *TINY, "--force")
    assert res.exit_code == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "test_truth.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    from ganprint.synth import dataset

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset, "save_generator", boom, raising=False)
    import ganprint.synth.gan as gan

    monkeypatch.setattr(gan, "save_generator", boom)
    out = tmp_path / "out"
    with pytest.raises(GanprintError, match="No space left on device"):
        dataset.run_synth(out, dataset.resolve_config(size=32, gan_res=16, gan_width=4, z_dim=8, steps=2, batch_size=4,
                                                     dev_real=2, test_real=2, dev_generated=2, test_generated=2,
                                                     threads=1), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_real_dir(tmp_path):
    from ganprint.data import load_image

    from conftest import write_png

    src = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for i in range(22):  # varied sizes and modes: gray, RGB, non-square
        h, w = (40, 40) if i % 3 else (36, 50)
        arr = rng.integers(0, 256, (h, w, 3) if i % 4 == 0 else (h, w), dtype=np.uint8)
        write_png(src / f"case{i % 5}" / f"img_{i:02d}.png", arr)
    out = tmp_path / "out"
    res = run_cli(str(out), *TINY, "--real-dir", str(src), "--json")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["out"] == str(out) and summary["counts"]["train_images"] == 9
    meta = json.loads((out / "synth.json").read_text())
    assert meta["source"] == "real_dir"
    sources = [r["source"] for r in meta["images"]]
    assert len(sources) == len(set(sources)) == 18
    # the written real image is the source, gray, centre-cropped and resized to --size
    r = next(r for r in meta["images"] if r["source"].endswith("img_01.png"))
    assert load_image(str(out / r["file"])).shape == (32, 32)
    src_gray = load_image(str(src / r["source"]))
    assert abs(float(load_image(str(out / r["file"])).mean()) - float(src_gray.mean())) < 8


def test_real_dir_group_by_folder_keeps_patients_whole(tmp_path):
    from ganprint.synth.dataset import folder_reals, resolve_config

    from conftest import random_gray, write_png

    src = tmp_path / "mine"
    for p in range(12):
        for s in range(2):
            write_png(src / f"patient{p:02d}" / f"slice{s}.png", random_gray(p * 10 + s, 24))
    reals = folder_reals(resolve_config(size=24, gan_res=16, dev_real=4, test_real=4, real_dir=str(src), group_by_folder=True))
    classes = {}
    for src_info, c in zip(reals.source, reals.assign):
        classes.setdefault(src_info["source"].split("/")[0], set()).add(int(c))
    assert all(len(c) == 1 for c in classes.values())
    assert sorted(np.bincount(reals.assign).tolist()) == [4, 4, 4, 4]


def test_real_dir_too_few_images(tmp_path):
    from conftest import random_gray, write_png

    src = tmp_path / "few"
    for i in range(7):
        write_png(src / f"img_{i}.png", random_gray(i))
    out = tmp_path / "out"
    res = run_cli(str(out), *TINY, "--real-dir", str(src))
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"Error: --real-dir {src}: holds 7 images, the split needs 18 (dev 5 used + 5 not used, test 4 + 4); "
        "add images or lower --dev-real/--test-real"
    )
    assert res.stdout == "" and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--regime", "overfit"], "Error: --regime overfit: unknown regime; use one of memorize, balanced, generalize, copies"),
    (["--gan-res", "48"], "Error: --gan-res 48: must be a power of two >= 16 (e.g. 32, 64, 128)"),
    (["--steps", "0"], "Error: --steps 0: must be at least 1"),
    (["--size", "32", "--gan-res", "64"], "Error: --gan-res 64: larger than --size 32; lower --gan-res or raise --size"),
    (["--device", "tpu"], "Error: --device tpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
])
def test_bad_options(tmp_path, args, message):
    res = run_cli(str(tmp_path / "o"), *args)
    assert res.exit_code == 2
    assert res.stderr.strip() == message
    assert not (tmp_path / "o").exists()


def test_split_groups_never_splits_a_patient():
    from ganprint.synth.dataset import resolve_config, split_groups

    rng = np.random.default_rng(1)
    group = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    cfg = resolve_config(dev_real=6, test_real=5, seed=9)
    assign = split_groups(group, cfg)
    assert np.bincount(assign[assign >= 0]).tolist() == [6, 6, 5, 5]
    for g in np.unique(group):
        used = set(assign[group == g].tolist()) - {-1}
        assert len(used) <= 1
    assert np.array_equal(assign, split_groups(group, cfg))


def test_phantom_neighbouring_slices_are_near_duplicates():
    from ganprint.synth.phantoms import render_patients

    imgs, patient, _ = render_patients(6, 2, 64, seed=0)
    x = imgs.reshape(len(imgs), -1).astype(np.float64)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    same = [d[2 * i, 2 * i + 1] for i in range(6)]
    other = [d[i, j] for i in range(12) for j in range(12) if patient[i] != patient[j]]
    assert max(same) < min(other)


def test_out_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    res = run_cli(str(f), *TINY)
    assert res.exit_code == 2
    assert res.stderr.strip() == f"Error: {f}: exists and is not a folder; choose another OUT"
    assert f.read_text() == "x"


def test_full_disk_while_saving_the_generator_is_one_line(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own exception type: still one ``Error:`` line, no OUT."""
    import safetensors.torch

    class SafetensorError(Exception):
        pass

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    res = run_cli(str(out), *TINY[:TINY.index("--steps")], "--steps", "2", *TINY[TINY.index("--steps") + 2:])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {out}: cannot write the benchmark (No space left on device)")
    assert list(tmp_path.iterdir()) == []


def test_reference_pool_adds_known_non_members_and_changes_nothing_else(tiny, tmp_path):
    from ganprint.data import discover

    out, _ = tiny
    ref = tmp_path / "ref"
    res = run_cli(str(ref), *TINY, "--seed", "3", "--reference-real", "5")
    assert res.exit_code == 0, res.stderr
    pool = sorted((ref / "reference" / "real_not_used").glob("*.png"))
    assert [p.stem for p in pool] == [f"reference_{i:04d}" for i in range(1, 6)]
    # everything else is byte for byte the run without a reference pool
    with_ref = {k: v for k, v in digests(ref).items() if not k.startswith("reference/")}
    assert with_ref == digests(out)
    records, _ = discover([str(ref / "reference" / "real_not_used")])
    assert {(r.subset, r.label) for r in records} == {("real_not_used", 0)}
    meta = json.loads((ref / "synth.json").read_text())
    assert meta["counts"]["reference"] == {"real_not_used": 5}
    patients = {}
    for r in meta["images"]:
        patients.setdefault(r["patient"], set()).add(r["split"])
    ref_patients = {p for p, s in patients.items() if "reference" in s}
    assert ref_patients and all(patients[p] == {"reference"} for p in ref_patients)  # own patients only
    assert all(r["label"] == 0 for r in meta["images"] if r["split"] == "reference")


def test_reference_pool_from_a_real_dir_uses_patients_the_split_left(tmp_path):
    from ganprint.synth.dataset import REFERENCE_CLASS, folder_reals, resolve_config

    from conftest import random_gray, write_png

    src = tmp_path / "mine"
    for p in range(14):
        for s in range(2):
            write_png(src / f"patient{p:02d}" / f"slice{s}.png", random_gray(p * 10 + s, 24))
    cfg = dict(size=24, gan_res=16, dev_real=4, test_real=4, real_dir=str(src), group_by_folder=True)
    reals = folder_reals(resolve_config(**cfg, reference_real=3))
    by_patient = {}
    for info, c in zip(reals.source, reals.assign):
        by_patient.setdefault(info["source"].split("/")[0], set()).add(int(c))
    assert all(len(c) == 1 for c in by_patient.values())
    assert int((reals.assign == REFERENCE_CLASS).sum()) == 3
    with pytest.raises(GanprintError, match="--reference-real"):
        folder_reals(resolve_config(**cfg, reference_real=20))
