"""Hybrid contrastive loss of the paper (equations 3-7) with per-sample temperature.

For anchor i with query q_i, temperature tau_i, positive keys k_ip and negative keys k_j::

    l_ip(t) = -s_ip / t + log( exp(s_ip / t) + sum_j exp(q_i . k_j / t) ),   s_ip = q_i . k_ip
    L       = alpha * mean_i mean_p l_ip(tau_i) + (1 - alpha) * mean_i mean_p l_ip(tau_i.detach())

With one positive per anchor this is exactly the paper's L1 + L2.  The first term lets the
gradient reach the temperature head; the second does not (tau_fixed = tau.detach()), so alpha
scales how strongly the temperature is learned while q and the keys get the full gradient.

Multi-positive choice: each valid (anchor, positive) pair is its own eq.-4 term whose
denominator holds that positive and the negatives only -- the other positives of the same
anchor are neither in the numerator nor the denominator (SupCon's "L_out" form).  Positives of
one anchor therefore never compete with each other (several real images can legitimately be
close to one generated image), and every positive gets a gradient.  Terms are averaged over an
anchor's valid positives first, then over anchors that have at least one, so an anchor with a
big pool does not outweigh one with a small pool.

Shapes: q [B, D]; k_pos [B, P, D]; pos_mask [B, P] bool; negatives [K, D] (shared, e.g. the
queue) or [B, K, D] (per anchor), or a tuple/list of such blocks (concatenated along K);
neg_mask [B, K] bool (or a matching tuple; None = all valid); tau [B].  All vectors are
expected L2-normalised (dot product = cosine).  Computed in float32 with log-sum-exp.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Negatives = Union[torch.Tensor, Sequence[torch.Tensor], None]


def negative_logits(q: torch.Tensor, negatives: Negatives, neg_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dot products of each query with its negatives -> (sims [B, K], valid [B, K] bool)."""
    b = q.shape[0]
    if negatives is None:
        blocks: list[torch.Tensor] = []
    elif isinstance(negatives, torch.Tensor):
        blocks = [negatives]
    else:
        blocks = list(negatives)
    if neg_mask is None or isinstance(neg_mask, torch.Tensor):
        masks: list = [None] * len(blocks)
        whole = neg_mask  # one mask over the concatenated blocks
    else:
        masks = list(neg_mask)
        whole = None
        if len(masks) != len(blocks):
            raise ValueError(f"neg_mask has {len(masks)} blocks, negatives has {len(blocks)}")
    sims, valid = [], []
    for neg, m in zip(blocks, masks):
        neg = neg.to(q.dtype)
        if neg.dim() == 2:  # shared [K, D]
            s = q @ neg.t()
        elif neg.dim() == 3:  # per anchor [B, K, D]
            if neg.shape[0] != b:
                raise ValueError(f"per-anchor negatives have {neg.shape[0]} rows, q has {b}")
            s = torch.einsum("bd,bkd->bk", q, neg)
        else:
            raise ValueError(f"negatives must be [K, D] or [B, K, D], got {tuple(neg.shape)}")
        if m is None:
            m = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        elif m.shape != s.shape:
            raise ValueError(f"neg_mask shape {tuple(m.shape)} does not match negatives {tuple(s.shape)}")
        sims.append(s)
        valid.append(m.to(torch.bool))
    if whole is not None:
        total = sum(s.shape[1] for s in sims)
        if tuple(whole.shape) != (b, total):
            raise ValueError(f"neg_mask shape {tuple(whole.shape)} does not match negatives {(b, total)}")
        if not sims:
            return q.new_zeros(b, 0), whole.to(torch.bool)
        return torch.cat(sims, 1), torch.cat(valid, 1) & whole.to(torch.bool)
    if not sims:
        return q.new_zeros(b, 0), torch.zeros(b, 0, dtype=torch.bool, device=q.device)
    return torch.cat(sims, 1), torch.cat(valid, 1)


def _per_pair_terms(pos_sim: torch.Tensor, neg_sim: torch.Tensor, neg_valid: torch.Tensor,
                    tau: torch.Tensor) -> torch.Tensor:
    """l_ip for every (anchor, positive): [B, P]."""
    t = tau[:, None]
    a = pos_sim / t  # [B, P]
    n = neg_sim / t  # [B, K]
    empty = ~neg_valid.any(1) if n.shape[1] else torch.ones(n.shape[0], dtype=torch.bool, device=n.device)
    if n.shape[1]:
        n = n.masked_fill(~neg_valid, float("-inf"))
        # a row with no valid negative would make logsumexp -inf and its backward NaN
        lse = torch.logsumexp(n.masked_fill(empty[:, None], 0.0), dim=1)
    else:
        lse = a.new_zeros(a.shape[0])
    lse = lse.masked_fill(empty, float("-inf"))
    return torch.logaddexp(a, lse[:, None]) - a


def hybrid_contrastive_loss(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    negatives: Negatives,
    tau: torch.Tensor,
    alpha: float = 0.7,
    pos_mask: torch.Tensor | None = None,
    neg_mask=None,
) -> torch.Tensor:
    """Scalar hybrid loss L = alpha * L1(tau) + (1 - alpha) * L2(tau.detach()) (eqs. 3-5).

    ``q`` [B, D] queries; ``k_pos`` [B, P, D] positive keys (a [B, D] tensor is taken as P = 1);
    ``negatives`` [K, D] (shared, e.g. the queue) or [B, K, D] (per anchor), or a tuple of such
    blocks; ``tau`` [B] per-sample temperatures; ``pos_mask`` [B, P] bool of valid positives
    (padding for anchors with smaller pools); ``neg_mask`` [B, K] bool of valid negatives, or a
    tuple with one mask (or None) per block (e.g. to drop a queued key of the anchor itself).

    Multi-positive: every valid (anchor i, positive p) pair is one eq.-4 term
    ``-s_ip/tau_i + log(exp(s_ip/tau_i) + sum_j exp(q_i.k_j/tau_i))`` -- the other positives of i
    are not in its denominator, so positives never compete -- averaged over i's valid positives,
    then over the anchors that have one.  P = 1 gives the paper's formula exactly.  Anchors
    without a valid positive do not count; with none at all the loss is 0 (still attached to
    the graph)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    q = q.float()
    k_pos = k_pos.float()
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None, :]
    b, p, d = k_pos.shape
    if q.shape != (b, d):
        raise ValueError(f"q is {tuple(q.shape)}, k_pos is {tuple(k_pos.shape)}: expected q [B, D], k_pos [B, P, D]")
    tau = tau.float().reshape(-1)
    if tau.shape[0] != b:
        raise ValueError(f"tau has {tau.shape[0]} values for {b} anchors")
    if pos_mask is None:
        pos_mask = torch.ones(b, p, dtype=torch.bool, device=q.device)
    pos_mask = pos_mask.to(torch.bool)
    if pos_mask.shape != (b, p):
        raise ValueError(f"pos_mask is {tuple(pos_mask.shape)}, expected {(b, p)}")

    pos_sim = torch.einsum("bd,bpd->bp", q, k_pos)
    neg_sim, neg_valid = negative_logits(q, negatives, neg_mask)

    w = pos_mask.float()
    n_pos = w.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return (q.sum() + tau.sum()) * 0.0

    def reduce(terms: torch.Tensor) -> torch.Tensor:
        # masked positives may hold garbage (padding): zero them before weighting
        terms = torch.where(pos_mask, terms, torch.zeros_like(terms))
        per_anchor = terms.sum(1)[has] / n_pos[has]
        return per_anchor.mean()

    l1 = reduce(_per_pair_terms(pos_sim, neg_sim, neg_valid, tau))
    l2 = reduce(_per_pair_terms(pos_sim, neg_sim, neg_valid, tau.detach()))
    return alpha * l1 + (1.0 - alpha) * l2
