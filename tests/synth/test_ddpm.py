"""``ganprint synth --generator ddpm``: a tiny diffusers UNet trains, samples, reloads, reproduces."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.synth.helpers import run_cli, digests

# 16 px UNet of width 4, 12 steps, 2 DDIM steps: seconds on 2 cores
TINY = ["--generator", "ddpm", "--size", "32", "--gan-res", "16", "--gan-width", "4", "--steps", "12",
        "--batch-size", "4", "--dev-real", "3", "--test-real", "2", "--dev-generated", "5",
        "--test-generated", "6", "--ddpm-sample-steps", "2", "--log-every", "4", "--threads", "1",
        "--quiet", "--seed", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    for name in ("a", "b"):
        res = run_cli(str(root / name), *TINY, "--copies", "0.4", "--json")
        assert res.exit_code == 0, res.stderr
    return root / "a", root / "b", json.loads(res.stdout)


def test_trains_samples_and_records_provenance(tiny):
    out, _, summary = tiny
    assert summary["generator"] == "ddpm" and summary["counts"]["train_images"] == 5
    meta = json.loads((out / "synth.json").read_text())
    g = meta["generator"]
    assert g["arch"] == "ddpm-unet2d" and g["config"]["res"] == 16 and g["config"]["sample_steps"] == 2
    assert g["unet"]["block_out_channels"] == [4, 8, 8] and g["scheduler"]["num_train_timesteps"] == 1000
    assert g["sha256"] == hashlib.sha256((out / "generator.safetensors").read_bytes()).hexdigest()
    assert [p["step"] for p in meta["curve"]] == [4, 8, 12]
    assert all(np.isfinite(p["loss"]) and p["loss"] > 0 for p in meta["curve"])
    assert meta["config"]["generator"] == "ddpm" and meta["generator_defaults"]["steps"] == 1200
    assert summary["final_losses"] == {"loss": meta["curve"][-1]["loss"]}
    assert len(list((out / "dev/generated").iterdir())) == 5 and len(list((out / "test/generated").iterdir())) == 6


def test_samples_are_palette_pngs_and_not_blank(tiny):
    from PIL import Image

    out, _, _ = tiny
    arrs = []
    for p in sorted((out / "test/generated").iterdir()):
        with Image.open(p) as im:
            assert im.mode == "P" and im.size == (32, 32)
            arrs.append(np.asarray(im))
    arrs = np.stack(arrs).astype(float)
    assert arrs.std() > 1  # images vary (in pixels and across samples)
    assert np.abs(arrs[0] - arrs[1]).mean() > 0.5


def test_same_seed_same_dataset(tiny):
    a, b, _ = tiny
    assert digests(a) == digests(b)
    ma, mb = (json.loads((d / "synth.json").read_text()) for d in (a, b))
    assert ma["curve"][-1]["loss"] == mb["curve"][-1]["loss"] and ma["images"] == mb["images"]


def test_weights_reload_and_resample_the_same_images(tiny):
    from ganprint.synth.ddpm import load_ddpm, sample_ddpm

    out, _, _ = tiny
    model, cfg, meta = load_ddpm(out / "generator.safetensors")
    assert cfg.res == 16 and cfg.width == 4 and meta["seed"] == 4 and meta["regime"] == "memorize"
    again = sample_ddpm(model, cfg, 3, seed=4 * 2 + 101, device="cpu")
    assert again.shape == (3, 16, 16) and again.dtype == np.uint8
    # the first dev samples, as written (replicas aside), are these images up-sampled
    from ganprint.data import load_image
    from ganprint.synth.dataset import resize_batch
    from ganprint.synth.replicas import read_replicas

    replaced = {r["image_id"] for r in read_replicas(out)}
    up = resize_batch(again, 32, "bicubic")
    for i in range(3):
        image_id = f"generated_dev_{i + 1:05d}"
        if image_id not in replaced:
            assert np.array_equal(load_image(str(out / "dev/generated" / f"{image_id}.png")), up[i])


def test_dcgan_weights_file_is_not_a_ddpm(tmp_path):
    from ganprint.errors import GanprintError
    from ganprint.synth.ddpm import load_ddpm

    out = tmp_path / "g"
    res = run_cli(str(out), *TINY[2:], "--generator", "dcgan", "--z-dim", "4")
    assert res.exit_code == 0, res.stderr
    with pytest.raises(GanprintError, match="not a ganprint DDPM file"):
        load_ddpm(out / "generator.safetensors")


def test_generator_defaults():
    from ganprint.synth import resolve_config

    d, g = resolve_config("memorize", "ddpm"), resolve_config("memorize")
    assert (d.generator, d.gan_res, d.steps, d.lr) == ("ddpm", 16, 1200, 2e-3) and (g.generator, g.gan_res, g.steps) == ("dcgan", 64, 3000)
    assert resolve_config("generalize", "ddpm", steps=50).steps == 50
    assert resolve_config("generalize", "ddpm").dev_real == 250


@pytest.mark.parametrize("args, message", [
    (["--generator", "vae"], "Error: --generator vae: unknown generator; use one of dcgan, ddpm"),
    (["--generator", "ddpm", "--ddpm-sample-steps", "0"], "Error: --ddpm-sample-steps 0: must be at least 1"),
    (["--generator", "ddpm", "--ddpm-train-t", "most"], "Error: --ddpm-train-t most: use all or sampler"),
])
def test_bad_generator_options(tmp_path, args, message):
    res = run_cli(str(tmp_path / "o"), *args)
    assert res.exit_code == 2
    assert res.stderr.strip() == message
    assert not (tmp_path / "o").exists()


def test_train_on_sampler_timesteps(monkeypatch):
    import torch
    from diffusers import DDPMScheduler

    from ganprint.synth.ddpm import DdpmConfig, sampler_timesteps, train_ddpm

    cfg = DdpmConfig(res=16, width=4, steps=3, batch_size=2, sample_steps=4, train_t="sampler", log_every=1)
    grid = sampler_timesteps(cfg)
    assert grid.tolist() == [750, 500, 250, 0]
    seen = []
    orig = DDPMScheduler.add_noise

    def spy(self, x, noise, t):
        seen.extend(t.tolist())
        return orig(self, x, noise, t)

    monkeypatch.setattr(DDPMScheduler, "add_noise", spy)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    res = train_ddpm(images, cfg, "cpu", seed=0)
    assert len(seen) == 6 and set(seen) <= set(grid.tolist())
    assert [p["step"] for p in res.curve] == [1, 2, 3]
    assert isinstance(res.model, torch.nn.Module)
