"""hybrid_contrastive_loss against a hand-written reference, and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ganprint.contrastive.loss import hybrid_contrastive_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def reference(q, k_pos, negs, tau, alpha, pos_mask, neg_mask):
    """Plain-Python eqs. 4-5, one term per valid positive, averaged per anchor then over anchors.
    ``negs`` is a list over anchors of lists of negative vectors; ``neg_mask`` likewise."""
    q, k_pos, tau = q.double().tolist(), k_pos.double().tolist(), tau.double().tolist()
    total, anchors = 0.0, 0
    for i in range(len(q)):
        dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
        terms = []
        for p, k in enumerate(k_pos[i]):
            if not pos_mask[i][p]:
                continue
            s = dot(q[i], k)
            negsum = sum(math.exp(dot(q[i], n) / tau[i]) for n, ok in zip(negs[i], neg_mask[i]) if ok)
            term = -s / tau[i] + math.log(math.exp(s / tau[i]) + negsum)
            # L1 and L2 have the same value; only their gradients differ
            terms.append(alpha * term + (1 - alpha) * term)
        if terms:
            total += sum(terms) / len(terms)
            anchors += 1
    return total / anchors


def test_matches_reference_shared_and_per_anchor_negatives_with_masks():
    b, p, d, k, n = 4, 3, 8, 6, 2
    q, k_pos, queue, per = unit(b, d, seed=1), unit(b, p, d, seed=2), unit(k, d, seed=3), unit(b, n, d, seed=4)
    tau = torch.tensor([0.05, 0.1, 0.15, 0.2])
    pos_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    qmask = torch.ones(b, k, dtype=torch.bool)
    qmask[0, 2] = qmask[1, 0] = qmask[1, 5] = False
    got = hybrid_contrastive_loss(q, k_pos, (queue, per), tau, alpha=0.7, pos_mask=pos_mask,
                                  neg_mask=(qmask, torch.ones(b, n, dtype=torch.bool)))
    negs = [[*queue.tolist(), *per[i].tolist()] for i in range(b)]
    masks = [[*qmask[i].tolist(), True, True] for i in range(b)]
    want = reference(q, k_pos, negs, tau, 0.7, pos_mask.tolist(), masks)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_single_positive_equals_paper_cross_entropy_form():
    b, d, k = 5, 16, 7
    q, kp, neg = unit(b, d, seed=5), unit(b, d, seed=6), unit(k, d, seed=7)
    tau = torch.full((b,), 0.07)
    logits = torch.cat([(q * kp).sum(1, keepdim=True), q @ neg.t()], 1) / tau[:, None]
    ce = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    got = hybrid_contrastive_loss(q, kp, neg, tau, alpha=0.7)  # [B, D] positives = P of 1
    assert got.item() == pytest.approx(ce.item(), rel=1e-5)


def test_gradients_reach_positive_and_negative_keys():
    b, p, d, k, n = 3, 2, 8, 5, 3
    q = unit(b, d, seed=8).requires_grad_()
    k_pos = unit(b, p, d, seed=9).requires_grad_()
    queue = unit(k, d, seed=10).requires_grad_()
    per = unit(b, n, d, seed=11).requires_grad_()
    tau = torch.full((b,), 0.1, requires_grad=True)
    pos_mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    loss = hybrid_contrastive_loss(q, k_pos, (queue, per), tau, 0.7, pos_mask)
    loss.backward()
    for name, t in (("q", q), ("k_pos", k_pos), ("queue", queue), ("per-anchor negatives", per), ("tau", tau)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    assert (k_pos.grad[pos_mask].norm(dim=-1) > 0).all()
    assert k_pos.grad[1, 1].abs().sum() == 0  # a masked positive gets nothing
    assert (queue.grad.norm(dim=-1) > 0).all()
    assert (per.grad.norm(dim=-1) > 0).all()


def test_changing_a_positive_or_a_negative_changes_the_loss():
    b, p, d, k = 2, 2, 8, 4
    q, k_pos, neg = unit(b, d, seed=12), unit(b, p, d, seed=13), unit(k, d, seed=14)
    tau = torch.full((b,), 0.1)
    base = hybrid_contrastive_loss(q, k_pos, neg, tau)
    k2 = k_pos.clone()
    k2[0, 1] = F.normalize(q[0], dim=0)  # the second positive of anchor 0 now matches it exactly
    assert hybrid_contrastive_loss(q, k2, neg, tau) < base
    n2 = neg.clone()
    n2[0] = q[1]  # a negative equal to anchor 1's query
    assert hybrid_contrastive_loss(q, k_pos, n2, tau) > base


def test_alpha_scales_only_the_temperature_gradient():
    b, d, k = 3, 8, 6
    q, kp, neg = unit(b, d, seed=15), unit(b, 1, d, seed=16), unit(k, d, seed=17)
    grads = {}
    for alpha in (0.0, 0.7, 1.0):
        qq = q.clone().requires_grad_()
        tau = torch.tensor([0.06, 0.1, 0.18], requires_grad=True)
        hybrid_contrastive_loss(qq, kp, neg, tau, alpha).backward()
        grads[alpha] = (qq.grad.clone(), tau.grad.clone())
    assert grads[0.0][1].abs().sum() == 0  # tau_fixed: no gradient to the temperature
    assert grads[1.0][1].abs().sum() > 0
    torch.testing.assert_close(grads[0.7][1], 0.7 * grads[1.0][1])
    torch.testing.assert_close(grads[0.0][0], grads[1.0][0])  # q gets the full gradient either way


def test_per_sample_temperature_is_used():
    b, d, k = 2, 8, 5
    q, kp, neg = unit(b, d, seed=18), unit(b, 1, d, seed=19), unit(k, d, seed=20)
    # each anchor's loss depends on its own tau only: swapping anchors and taus together is invariant
    l1 = hybrid_contrastive_loss(q, kp, neg, torch.tensor([0.05, 0.2]))
    l2 = hybrid_contrastive_loss(q.flip(0), kp.flip(0), neg, torch.tensor([0.2, 0.05]))
    l3 = hybrid_contrastive_loss(q, kp, neg, torch.tensor([0.2, 0.05]))
    torch.testing.assert_close(l1, l2)
    assert not torch.isclose(l1, l3)


def test_no_valid_negatives_or_positives_is_finite():
    b, d = 2, 4
    q = unit(b, d, seed=21).requires_grad_()
    kp = unit(b, 1, d, seed=22)
    tau = torch.full((b,), 0.1, requires_grad=True)
    queue = unit(3, d, seed=23)
    loss = hybrid_contrastive_loss(q, kp, queue, tau, neg_mask=torch.zeros(b, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(q.grad).all() and torch.isfinite(tau.grad).all()
    none = hybrid_contrastive_loss(q, kp, queue, tau, pos_mask=torch.zeros(b, 1, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_shape_errors_are_clear():
    q, kp = unit(2, 4), unit(2, 1, 4)
    with pytest.raises(ValueError, match="tau"):
        hybrid_contrastive_loss(q, kp, unit(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="per-anchor"):
        hybrid_contrastive_loss(q, kp, unit(3, 2, 4), torch.ones(2))
