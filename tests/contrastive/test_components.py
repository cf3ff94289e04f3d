"""Pools, queue, EMA, projection head, augmentations, config files."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from ganprint.contrastive.augment import AugmentConfig, augment, to_model_input
from ganprint.contrastive.config import TrainConfig, load_config, read_toml, resolve_config, to_toml
from ganprint.contrastive.heads import ContrastiveEncoder, ProjectionHead
from ganprint.contrastive.momentum import ema_update, make_momentum_encoder
from ganprint.contrastive.pools import build_pools, pools_from_matrix, sample_negatives, sample_positives
from ganprint.contrastive.queue import KeyQueue
from ganprint.errors import GanprintError

REPO = Path(__file__).resolve().parents[2]


# -- pools ------------------------------------------------------------------------------------

def test_pools_honour_threshold_and_min_pos():
    m = torch.tensor([
        [0.9, 0.7, 0.65, 0.1],   # three pass 0.6
        [0.5, 0.2, 0.55, 0.1],   # none pass: top-2 by similarity
        [0.61, 0.3, 0.2, 0.0],   # one passes: topped up to 2
    ])
    pools = pools_from_matrix(m, threshold=0.6, min_pos=2)
    assert pools[0].tolist() == [0, 1, 2]
    assert pools[1].tolist() == [2, 0]
    assert pools[2].tolist() == [0, 1]
    assert [p.tolist() for p in pools_from_matrix(m, 0.6, 2, max_pool=2)][0] == [0, 1]
    assert pools_from_matrix(m, 0.95, 0)[0].numel() == 0


def test_pools_skip_invalid_columns_and_unsorted_topk():
    values = torch.tensor([[0.3, 0.8, 0.7]])
    indices = torch.tensor([[5, 6, 7]])
    valid = torch.tensor([[True, False, True]])  # column 6 is e.g. a real_not_used image
    assert build_pools(values, indices, 0.6, 2, valid=valid)[0].tolist() == [7, 5]
    rv = torch.tensor([True, False, True, True])
    m = torch.tensor([[0.1, 0.9, 0.8, 0.2]])
    assert pools_from_matrix(m, 0.5, 1, real_valid=rv)[0].tolist() == [2]


def test_sampling_positives_and_negatives():
    pools = [torch.tensor([3, 4, 5]), torch.tensor([7]), torch.zeros(0, dtype=torch.long)]
    g = torch.Generator().manual_seed(0)
    idx, ok = sample_positives(pools, torch.tensor([0, 1, 2]), 2, g)
    assert ok.tolist() == [[True, True], [True, False], [False, False]]
    assert set(idx[0].tolist()) <= {3, 4, 5} and idx[0, 0] != idx[0, 1]
    assert idx[1, 0] == 7
    neg = sample_negatives(4, 3, 4, g)
    assert all(sorted(r) == [0, 1, 2, 3] for r in neg.tolist())  # distinct per anchor
    assert sample_negatives(0, 3, 5, g).shape == (3, 0)


# -- queue ------------------------------------------------------------------------------------

def test_queue_fifo_wraps_and_masks_own_ids():
    q = KeyQueue(4, 2)
    assert q.filled() == 0 and not q.negative_mask(torch.tensor([0])).any()  # empty slots never count
    q.enqueue(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    q.enqueue(2 * torch.ones(3, 2), torch.tensor([3, 4, 5]))  # wraps: slots 3, 0, 1
    assert q.ids.tolist() == [4, 5, 2, 3] and q.ptr == 2
    assert q.keys[:, 0].tolist() == [2, 2, 1, 2]
    mask = q.negative_mask(torch.tensor([4, 9]))
    assert mask.tolist() == [[False, True, True, True], [True, True, True, True]]
    q.enqueue(torch.arange(12.0).reshape(6, 2), torch.arange(10, 16))  # more than K: last K kept
    assert sorted(q.ids.tolist()) == [12, 13, 14, 15]


# -- EMA --------------------------------------------------------------------------------------

def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_ema_m0_copies_m1_freezes_else_averages():
    online, mom = _net(0), make_momentum_encoder(_net(1))
    assert all(not p.requires_grad for p in mom.parameters())
    before = [p.clone() for p in mom.parameters()]
    ema_update(mom, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, mom.parameters()))
    ema_update(mom, online, 0.9)
    for a, o, b in zip(mom.parameters(), online.parameters(), before):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * o)
    ema_update(mom, online, 0.0)
    assert all(torch.equal(a, o) for a, o in zip(mom.parameters(), online.parameters()))
    assert all(torch.equal(a, o) for a, o in zip(mom.buffers(), online.buffers()))


# -- head -------------------------------------------------------------------------------------

def test_head_is_normalised_signed_and_tau_in_range():
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 8)
    z, tau = head(torch.randn(64, 16) * 10)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(64))
    assert (z < 0).any()  # no ReLU at the end: the whole sphere is used
    assert ((tau > 0.05) & (tau < 0.2)).all() and tau.shape == (64,)
    assert tau.std() > 0  # per sample, not one scalar
    assert not isinstance(head.mlp[-1], torch.nn.ReLU)
    enc = ContrastiveEncoder(torch.nn.Flatten(), head)
    assert enc(torch.randn(2, 1, 4, 4))[0].shape == (2, 8)


# -- augmentation -----------------------------------------------------------------------------

def test_augment_is_seeded_two_views_differ_and_values_in_range():
    imgs = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    cfg = AugmentConfig()
    v1 = augment(imgs, 32, cfg, torch.Generator().manual_seed(5))
    v1b = augment(imgs, 32, cfg, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    a, b = augment(imgs, 32, cfg, g), augment(imgs, 32, cfg, g)
    assert v1.shape == (3, 1, 32, 32) and torch.equal(v1, v1b)
    assert not torch.allclose(a, b)
    assert v1.min() >= 0 and v1.max() <= 1

    class Prep:
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    x = to_model_input(v1, Prep())
    assert x.shape == (3, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])


def test_identity_augmentation_keeps_the_image():
    imgs = torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(crop_min=1.0, flip=False, rotate=0.0, window=0.0, gamma=0.0, noise=0.0)
    v = augment(imgs, 32, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v[:, 0], imgs.float() / 255, atol=2e-3, rtol=0)


# -- config -----------------------------------------------------------------------------------

def test_presets_reproduce_table1():
    table = {1: (5, 2, 0.6), 2: (1, 1, 0.65), 3: (10, 5, 0.6)}
    for i, (neg, pos, thr) in table.items():
        cfg = load_config(REPO / "configs" / f"paper{i}.toml")
        assert (cfg.num_neg_samples, cfg.min_pos_samples, cfg.sim_threshold) == (neg, pos, thr)
        assert (cfg.backbone, cfg.batch_size, cfg.lr, cfg.loss_alpha, cfg.momentum) == ("resnet50", 128, 3e-4, 0.7, 0.999)


def test_packaged_default_preset_equals_repo_copy():
    pkg = REPO / "ganprint" / "configs" / "cpu-small.toml"
    assert pkg.read_bytes() == (REPO / "configs" / "cpu-small.toml").read_bytes()
    cfg = load_config(None)  # no --config: cpu-small
    assert cfg == load_config(pkg)
    assert cfg.image_size <= 96


def test_overrides_win_and_unknown_keys_fail(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('[pools]\nsim_threshold = 0.5\n[optim]\nbatch_size = 16\n')
    cfg = load_config(f, {"batch_size": 8, "lr": None})
    assert (cfg.sim_threshold, cfg.batch_size, cfg.lr) == (0.5, 8, TrainConfig().lr)
    f.write_text("sim_treshold = 0.5\n")
    with pytest.raises(GanprintError, match="did you mean 'sim_threshold'"):
        read_toml(f)
    with pytest.raises(GanprintError, match="bn_mode"):
        resolve_config({"bn_mode": "sync"})
    with pytest.raises(GanprintError, match="--batch-size"):
        resolve_config({}, {"batch_size": "many"})


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, {"data": "d", "similarity": None, "aug_flip": False})
    text = to_toml(cfg)
    tomllib.loads(text)
    f = tmp_path / "c.toml"
    f.write_text(text)
    assert load_config(f) == cfg
