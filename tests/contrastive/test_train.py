"""The training loop on a tiny model: determinism, bit-exact resume, what reaches the loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ganprint.checkpoint import read_checkpoint_meta
from ganprint.contrastive import run_training, train
from ganprint.contrastive import trainer as trainer_mod
from ganprint.errors import GanprintError

TINY = dict(backbone="test_resnet", weights="none", image_size=32, proj_hidden=32, batch_size=2,
            max_steps=4, num_neg_samples=2, min_pos_samples=1, pos_per_anchor=2, sim_threshold=-1.0,
            threads=2, momentum=0.9, lr=1e-3, warmup_steps=1)


def cfg(data, out, **kw):
    return {"data": str(data), "out": str(out), **TINY, **kw}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """ImageCLEF dev layout: 4 generated, 3 real_used, 3 real_not_used (48 px PNGs)."""
    from conftest import make_imageclef

    return make_imageclef(tmp_path_factory.mktemp("data") / "dev", seed=200)


@pytest.fixture(scope="module")
def straight(dev, tmp_path_factory):
    """4 steps in one go."""
    return run_training(cfg(dev, tmp_path_factory.mktemp("straight")))


def test_resume_is_bit_exact(dev, straight, tmp_path):
    half = run_training(cfg(dev, tmp_path / "b", stop_at_step=2))
    assert half.step == 2 and half.max_steps == 4
    first = load_file(str(half.checkpoint))
    resumed = run_training(cfg(dev, tmp_path / "b"), resume=True)
    assert resumed.resumed_from == 2 and resumed.step == 4

    a, b = load_file(str(straight.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.") for k in a) and "queue.keys" in a and "momentum.head.mlp.0.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_checkpoint_meta(straight.checkpoint), read_checkpoint_meta(resumed.checkpoint)
    assert ma["digest"] == mb["digest"] == straight.digest and ma["step"] == 4
    assert straight.losses[2:] == resumed.losses
    # training moved the weights (online and, by EMA, momentum) and the queue holds real keys
    for name in ("online.head.mlp.0.weight", "momentum.head.mlp.0.weight", "online.backbone.conv1.0.weight"):
        assert not torch.equal(first[name], a[name]), name
    assert (a["queue.ids"] >= 0).all()
    torch.testing.assert_close(a["queue.keys"].norm(dim=1), torch.ones(a["queue.keys"].shape[0]))


def test_resume_refuses_a_changed_config(dev, straight, tmp_path):
    with pytest.raises(GanprintError, match="loss_alpha"):
        run_training(cfg(dev, straight.checkpoint.parent, loss_alpha=0.5), resume=True)
    with pytest.raises(GanprintError, match="no checkpoint to resume"):
        run_training(cfg(dev, tmp_path / "empty"), resume=True)


def test_positives_and_negatives_enter_the_loss(dev, tmp_path, monkeypatch):
    """Spy on the loss the trainer calls: the pool positives and explicit negatives are there,
    are momentum keys of real images, and the loss has a gradient w.r.t. each of them."""
    seen = []
    real = trainer_mod.hybrid_contrastive_loss

    def spy(q, k_pos, negatives, tau, alpha, pos_mask, neg_mask):
        kp = k_pos.detach().clone().requires_grad_()
        negs = [n.detach().clone().requires_grad_() for n in negatives]
        probe = real(q.detach(), kp, negs, tau.detach(), alpha, pos_mask, neg_mask)
        probe.backward()
        seen.append({"kp": kp, "negs": negs, "pos_mask": pos_mask, "neg_mask": neg_mask, "alpha": alpha})
        return real(q, k_pos, negatives, tau, alpha, pos_mask, neg_mask)

    monkeypatch.setattr(trainer_mod, "hybrid_contrastive_loss", spy)
    run_training(cfg(dev, tmp_path / "s", max_steps=2, loss_alpha=0.6))
    assert len(seen) == 2
    s = seen[1]
    b = 2
    assert s["alpha"] == 0.6
    assert s["kp"].shape == (b, 1 + 2, 256)  # self view + 2 pool positives (pools hold all 3 real_used)
    assert s["pos_mask"].all()
    assert (s["kp"].grad.norm(dim=-1) > 0).all()  # every positive gets a gradient
    queue, explicit = s["negs"]
    assert explicit.shape == (b, 2, 256)  # num_neg_samples real_not_used keys per anchor
    assert (explicit.grad.norm(dim=-1) > 0).all()
    assert s["neg_mask"][0].any()  # queued keys of other anchors are negatives
    assert queue.grad[s["neg_mask"][0].any(0)].norm(dim=-1).gt(0).all()
    # the positives are not copies of the anchor's own key: distinct real images
    assert not torch.allclose(s["kp"][:, 1], s["kp"][:, 0])


def test_other_seed_other_weights(dev, straight, tmp_path):
    c = run_training(cfg(dev, tmp_path / "z", seed=1))
    assert c.digest != straight.digest


def test_missing_layout_is_a_clear_error(png_folder, tmp_path):
    with pytest.raises(GanprintError, match="generated/ and real_used/"):
        run_training(cfg(png_folder, tmp_path / "o"))


def test_pool_overlap_masks_queue_negatives(dev, tmp_path, monkeypatch):
    """With every pool holding every real_used image, each queued generated image shares a pool
    with the anchor: --mask-pool-overlap leaves no queue negative, only the explicit ones."""
    masks = []
    real = trainer_mod.hybrid_contrastive_loss

    def spy(q, k_pos, negatives, tau, alpha, pos_mask, neg_mask):
        masks.append([m.clone() for m in neg_mask])
        return real(q, k_pos, negatives, tau, alpha, pos_mask, neg_mask)

    monkeypatch.setattr(trainer_mod, "hybrid_contrastive_loss", spy)
    run_training(cfg(dev, tmp_path / "m", max_steps=1, mask_pool_overlap=True))
    (q_on, ex_on), = masks
    assert not q_on.any() and ex_on.all()  # (without the option the queue counts: see the spy test above)


def test_resume_after_a_kill_cuts_metrics_back_and_cleans_temp_files(dev, straight, tmp_path):
    import json

    out = tmp_path / "k"
    run_training(cfg(dev, out, stop_at_step=2))
    metrics = out / "metrics.jsonl"
    # what a kill -9 at step 4 leaves: steps 3-4 logged past the step-2 checkpoint, a torn line,
    # and the temp files of a checkpoint / config write it interrupted
    with open(metrics, "a") as fh:
        fh.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n{\"st")
    stale = [out / ".checkpoint.safetensors.ab12cd34.tmp", out / ".config.toml.x_9y8z7w.tmp"]
    for f in stale:
        f.write_bytes(b"partial")
    keep = out / ".checkpoint.safetensors.notmine.tmp"  # not a name our writer makes: left alone
    keep.write_bytes(b"x")
    run_training(cfg(dev, out), resume=True)
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert metrics.read_text() == (straight.checkpoint.parent / "metrics.jsonl").read_text()
    assert not any(f.exists() for f in stale) and keep.exists()
    assert not list(out.glob(".*.lock"))
