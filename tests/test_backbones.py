"""Backbone registry, weights handling, preprocessing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ganprint.backbones import (
    BACKBONES,
    BackboneSpec,
    get_backbone,
    load_backbone,
    register_backbone,
)
from ganprint.errors import GanprintError, WeightsError


def test_registry_has_paper_backbones_and_validates():
    for name in ("resnet50", "efficientnet_b0", "vit_b16", "efficientnet_lite0", "pixels", "dinov2_vits14"):
        assert name in BACKBONES
    with pytest.raises(GanprintError, match="unknown backbone 'nope'; choose one of"):
        get_backbone("nope")
    spec = BACKBONES["pixels"]
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(spec)
    with pytest.raises(ValueError, match="lowercase identifier"):
        register_backbone(BackboneSpec(name="Bad-Name", description="", dim=1, input_size=1, mean=(0.0,), std=(1.0,),
                                       build=spec.build, color="gray", default_weights="none"))


def test_none_weights_are_deterministic():
    a = load_backbone("test_resnet", "none", 32)
    b = load_backbone("test_resnet", "none", 32)
    assert a.weights_digest == b.weights_digest
    assert a.dim == 96 and a.preprocess.size == 32


def test_local_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = load_backbone("test_resnet", "none", 32)
    sd = {k: v.clone() + 0.5 for k, v in src.model.state_dict().items() if v.is_floating_point()}
    sd.update({k: v for k, v in src.model.state_dict().items() if not v.is_floating_point()})
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = load_backbone("test_resnet", str(tmp_path / "w.safetensors"), 32)
    assert got.weights_digest != src.weights_digest
    k = next(iter(sd))
    assert torch.equal(got.model.state_dict()[k], sd[k])
    with pytest.raises(WeightsError, match="weights do not fit backbone 'test_efficientnet'"):
        load_backbone("test_efficientnet", str(tmp_path / "w.safetensors"), 32)
    with pytest.raises(WeightsError, match="weights file not found"):
        load_backbone("test_resnet", str(tmp_path / "missing.safetensors"), 32)


def test_hub_weights_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="--weights PATH"):
        load_backbone("efficientnet_b0", "imagenet")
    assert time.perf_counter() - t0 < 20  # not the ~50 s of hub retries


def test_lite0_imagenet_weights_offline():
    lb = load_backbone("efficientnet_lite0")
    assert lb.weights_source.startswith("package:")
    assert lb.dim == 1280
    # the package weights are ImageNet weights: the stem conv is far from a random init
    w = lb.model.conv_stem.weight
    assert float(w.std()) > 0.05 and not torch.isnan(w).any()


def test_pixels_is_zncc():
    lb = load_backbone("pixels", image_size=16)
    img = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    x = lb.preprocess(img)[None]
    f = lb.model(x)
    assert f.shape == (1, 256)
    assert abs(float(f.mean())) < 1e-6 and abs(float(f.norm()) - 1) < 1e-5
    brighter = np.clip(img.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    g = lb.model(lb.preprocess(brighter)[None])
    assert float((f * g).sum()) > 0.99  # invariant to a global affine intensity change
