"""Mixture of experts over frozen embeddings (the paper's section 3.3, done consistently).

Model (:class:`MoEFusion`), for the K expert features x_k [B, d_k] of the same B images::

    t_k  = normalize(P_k normalize(x_k))          P_k: Linear d_k -> d         tokens t [B, K, d]
    g    = softmax(W2 GELU(W1 concat_k t_k))      W1: K*d -> 512, W2: 512 -> K  gate g [B, K]
    a    = t + MHSA(t)                            8-head self-attention over the K tokens [B, K, d]
    z    = normalize(sum_k g_k a_k)               fused embedding z [B, d]
    tau  = 0.05 + 0.15 sigmoid(w . z + b)         per-sample temperature [B]

The raw expert vectors are L2-normalised before their projection as well, so experts whose
features differ in scale (CNN pooled features vs ViT tokens) start on an equal footing.  The
residual ``t +`` around the attention (``residual=True``) keeps each token tied to its expert:
without it the K attention outputs tend to the same mixture and the gate has nothing to choose
between.  There is no dropout or normalisation with batch statistics, so train-mode and
eval-mode forwards are identical, and training and inference run the same ``forward``.

Training (:func:`train_moe`) uses the contrastive objective of ``train`` on the frozen expert
features (no image decoding, so it is fast):

- anchors: fused embeddings of the ``generated`` images;
- positive pool of a generated image: the ``real_used`` images whose similarity is >=
  ``sim_threshold``, topped up to ``min_pos`` by rank (capped to ``max_pool`` when > 0).  The
  similarity is the cosine of the concatenated per-expert L2-normalised features (= the mean of
  the experts' cosines), computed once.  Each step draws ``pos_per_anchor`` positives per anchor;
- negatives: fused embeddings of the ``real_not_used`` images (all of them, or
  ``neg_per_anchor`` drawn per anchor), plus optionally a FIFO queue (``queue_size``) of keys of
  earlier anchors (an anchor's own queued key is masked out);
- keys (positives, negatives, queue) come from the online model itself with gradients
  (``key_encoder="online"``, the default: the features are frozen and un-augmented, so there is no
  view noise for a momentum encoder to smooth) or from an EMA copy (``key_encoder="momentum"``);
- loss: :func:`ganprint.contrastive.loss.hybrid_contrastive_loss` with the per-sample tau of
  the anchors, plus ``balance`` x a load-balancing term ``K * sum_k mean_b(g_bk)^2 - 1`` (0 when
  the *average* gate is uniform; it does not push single gates toward uniform or one-hot, unlike
  the paper code's gate-entropy term, which collapses the gate);
- every parameter (all K projections, gate, attention, temperature head) is in the optimizer.

Defects of the paper's code that this avoids: inference skipping the attention and the
per-expert normalisation; two expert projections never optimised; a gate-entropy term that
collapses the gate; rows of different experts silently misaligned (manifests are checked row by
row); pickle checkpoints (weights are safetensors with provenance).

Outputs: the fusion weights (one safetensors file: the state dict, and metadata ``ganprint`` =
JSON with ``kind`` "moe_weights", the experts' identities, the model shape, the config, the seed
and ``digest`` of the weights) and fused ``embeddings`` artifacts (same manifest as the inputs,
``backbone`` "moe(b1+b2+...)", ``weights_digest`` = the fusion digest, ``checkpoint`` = the fusion
weights' digest dict).  :func:`apply_moe` applies trained weights to other artifacts of the same
experts (e.g. the test set).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ganprint import __version__
from ganprint.artifacts import (Artifact, atomic_path, base_provenance, digest_json, ensure_writable,
                                releases_output_claim, sha256_bytes, write_artifact)
from ganprint.contrastive.loss import hybrid_contrastive_loss
from ganprint.errors import ArtifactError, GanprintError
from ganprint.fusion.common import by_expert, expert_identity, expert_record, read_experts, short
from ganprint.fusion.config import MoEConfig, as_moe_config

TAU_MIN = 0.05
TAU_RANGE = 0.15
WEIGHTS_KIND = "moe_weights"
META_KEY = "ganprint"
FORMAT = 1


# ---------------------------------------------------------------------------------------------
# model


class MoEOutput(NamedTuple):
    z: torch.Tensor     # [B, d] fused embedding, L2-normalised
    tau: torch.Tensor   # [B] per-sample temperature in (0.05, 0.2)
    gate: torch.Tensor  # [B, K] expert weights, rows sum to 1


class ExpertAttention(nn.Module):
    """Multi-head self-attention over expert tokens: [B, K, d] -> [B, K, d].

    Written out (no dropout, no fused kernel) so that training and inference compute exactly
    the same thing."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = int(heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, k, d = t.shape
        dh = d // self.heads
        q, kk, v = self.qkv(t).view(b, k, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # each [B, H, K, dh]
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # [B, H, K, K]
        return self.out((att @ v).transpose(1, 2).reshape(b, k, d))


class MoEFusion(nn.Module):
    """K expert features [B, d_k] -> :class:`MoEOutput` (z [B, d], tau [B], gate [B, K])."""

    def __init__(self, in_dims: Sequence[int], dim: int = 256, gate_hidden: int = 512, heads: int = 8,
                 residual: bool = True) -> None:
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"a mixture needs at least 2 experts, got {len(in_dims)}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.in_dims = [int(d) for d in in_dims]
        self.dim, self.gate_hidden, self.heads, self.residual = int(dim), int(gate_hidden), int(heads), bool(residual)
        k = len(self.in_dims)
        self.proj = nn.ModuleList(nn.Linear(d_k, dim) for d_k in self.in_dims)
        self.gate = nn.Sequential(nn.Linear(k * dim, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, k))
        self.attn = ExpertAttention(dim, heads)
        self.temperature = nn.Linear(dim, 1)

    @property
    def n_experts(self) -> int:
        return len(self.in_dims)

    def spec(self) -> dict[str, Any]:
        return {"in_dims": self.in_dims, "dim": self.dim, "gate_hidden": self.gate_hidden, "heads": self.heads,
                "residual": self.residual}

    def forward(self, feats: Sequence[torch.Tensor]) -> MoEOutput:
        if len(feats) != self.n_experts:
            raise ValueError(f"expected {self.n_experts} expert feature tensors, got {len(feats)}")
        tokens = torch.stack([F.normalize(p(F.normalize(x.float(), dim=1)), dim=1)
                              for p, x in zip(self.proj, feats)], dim=1)  # [B, K, d]
        gate = torch.softmax(self.gate(tokens.flatten(1)), dim=1)  # [B, K]
        a = self.attn(tokens)
        if self.residual:
            a = tokens + a
        z = F.normalize((gate[:, :, None] * a).sum(1), dim=1)
        tau = TAU_MIN + TAU_RANGE * torch.sigmoid(self.temperature(z)).squeeze(1)
        return MoEOutput(z, tau, gate)


def fuse_features(model: MoEFusion, feats: Sequence[torch.Tensor], batch_size: int = 4096
                  ) -> MoEOutput:
    """Inference: ``model.forward`` in eval mode without gradients, in row chunks -> MoEOutput on CPU."""
    model.eval()
    n = feats[0].shape[0]
    zs, taus, gates = [], [], []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            out = model([f[s:s + batch_size] for f in feats])
            zs.append(out.z)
            taus.append(out.tau)
            gates.append(out.gate)
    return MoEOutput(torch.cat(zs), torch.cat(taus), torch.cat(gates))


# ---------------------------------------------------------------------------------------------
# pools, sampling, queue


def positive_pools(gen: Sequence[torch.Tensor], used: Sequence[torch.Tensor], threshold: float, min_pos: int,
                   max_pool: int = 0, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Pools from the experts' features: gen [G, d_k] and used [U, d_k] per expert ->
    (order [G, L] long: real_used indices by decreasing similarity, sizes [G] long: pool lengths).

    Similarity = cosine of the concatenated per-expert normalised features (mean expert cosine)."""
    k = len(gen)
    g = torch.cat([F.normalize(x.float(), dim=1) for x in gen], 1) / math.sqrt(k)
    u = torch.cat([F.normalize(x.float(), dim=1) for x in used], 1) / math.sqrt(k)
    orders, sizes = [], []
    for s in range(0, g.shape[0], chunk):
        sim = g[s:s + chunk] @ u.t()
        vals, idx = torch.sort(sim, dim=1, descending=True, stable=True)
        n = torch.clamp((vals >= threshold).sum(1), min=min(min_pos, u.shape[0]))
        if max_pool > 0:
            n = n.clamp(max=max_pool)
        orders.append(idx)
        sizes.append(n)
    order, size = torch.cat(orders), torch.cat(sizes)
    width = max(1, int(size.max()))
    return order[:, :width].contiguous(), size


def _sample_pool(order: torch.Tensor, size: torch.Tensor, anchors: torch.Tensor, n: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` distinct members of each anchor's pool -> (idx [B, n], valid [B, n] bool)."""
    o, s = order[anchors], size[anchors]
    r = torch.rand(o.shape, generator=generator)
    r = r.masked_fill(torch.arange(o.shape[1])[None, :] >= s[:, None], 2.0)  # non-members sort last
    pick = torch.argsort(r, dim=1, stable=True)[:, :n]
    idx = torch.gather(o, 1, pick)
    valid = torch.arange(idx.shape[1])[None, :] < s[:, None]
    return idx, valid


def _top_of_pool(order: torch.Tensor, size: torch.Tensor, anchors: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` most similar members (deterministic; for the evaluation loss)."""
    idx = order[anchors, :n]
    valid = torch.arange(idx.shape[1])[None, :] < size[anchors][:, None]
    return idx, valid


class _KeyQueue:
    """FIFO of keys [Q, d] with the anchor id of each (-1 = empty slot, never a negative)."""

    def __init__(self, size: int, dim: int) -> None:
        self.keys = torch.zeros(size, dim)
        self.ids = torch.full((size,), -1, dtype=torch.long)
        self.ptr = 0

    def push(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        q = self.keys.shape[0]
        keys, ids = keys.detach()[-q:], ids[-q:]
        pos = (self.ptr + torch.arange(keys.shape[0])) % q
        self.keys[pos] = keys
        self.ids[pos] = ids
        self.ptr = int((self.ptr + keys.shape[0]) % q)

    def mask(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        return (self.ids >= 0)[None, :] & (self.ids[None, :] != anchor_ids[:, None])


# ---------------------------------------------------------------------------------------------
# weights file


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes), in sorted name order."""
    parts = []
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        parts.append(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return sha256_bytes(b"".join(parts))


def weights_path(path: str | os.PathLike) -> Path:
    """The fusion weights file: ``.safetensors`` is appended when missing."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else Path(str(p) + ".safetensors")


def save_moe(path: str | os.PathLike, model: MoEFusion, meta: Mapping[str, Any]) -> Path:
    """Write the state dict + metadata atomically; returns the path written."""
    from ganprint.artifacts import save_safetensors

    p = weights_path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(p, "fusion weights") as tmp:
        save_safetensors(state, tmp, metadata={META_KEY: json.dumps(dict(meta), sort_keys=True)})
    return p


def load_moe(path: str | os.PathLike) -> tuple[MoEFusion, dict[str, Any]]:
    """Fusion weights written by :func:`train_moe` -> (model in eval mode, metadata dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists() and weights_path(p).exists():
        p = weights_path(p)
    if not p.exists():
        raise ArtifactError(f"{p}: fusion weights not found; train them with `ganprint fuse moe ... "
                            "--weights PATH` or check the path")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
        state = load_file(str(p))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{p}: not a valid safetensors file ({exc}); re-run fuse moe") from exc
    meta = json.loads(raw) if raw else {}
    if meta.get("kind") != WEIGHTS_KIND:
        raise ArtifactError(f"{p}: not fusion weights (kind {meta.get('kind')!r}); pass the --weights file written "
                            "by `ganprint fuse moe`")
    if weights_digest(state) != meta.get("digest"):
        raise ArtifactError(f"{p}: weights do not match their recorded digest (corrupt?); re-run fuse moe")
    spec = meta["model"]
    model = MoEFusion(spec["in_dims"], spec["dim"], spec["gate_hidden"], spec["heads"], spec["residual"])
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------
# fused artifacts


def _expert_name(prov: dict[str, Any]) -> str:
    ident = expert_identity(prov)
    name = str(ident["backbone"])
    return name if ident["checkpoint"] is None else f"{name}@{str(ident['checkpoint'])[:8]}"


def _features(arts: Sequence[Artifact]) -> list[torch.Tensor]:
    return [a.tensor("embeddings").float() for a in arts]


def _write_fused(out: str | os.PathLike, model: MoEFusion, meta: Mapping[str, Any], wpath: Path,
                 arts: Sequence[Artifact]) -> tuple[Path, list[float]]:
    """Fuse ``arts`` with ``model`` and write an embeddings artifact -> (base, mean gate per expert)."""
    res = fuse_features(model, _features(arts))
    mean_gate = [round(float(v), 6) for v in res.gate.mean(0)]
    first = arts[0]
    fprov = first.provenance
    digest = meta["digest"]
    names = [_expert_name(a.provenance) for a in arts]
    ckpt = {"digest": digest, "path": str(wpath), "dim": model.dim, "method": "moe",
            "experts": [expert_identity(a.provenance) for a in arts]}
    prov = base_provenance(
        "embeddings", "fuse",
        backbone=f"moe({'+'.join(names)})",
        timm_name=None,
        weights=str(wpath),
        weights_source="moe",
        weights_digest=digest,
        preprocess={"experts": [e.get("preprocess") for e in meta["experts"]]},
        dim=model.dim,
        checkpoint=ckpt,
        inputs_hash=fprov.get("inputs_hash"),
        rows=int(res.z.shape[0]),
        seed=meta.get("seed"),
        device="cpu",
        cache_key=digest_json({"fuse": digest, "inputs": [a.provenance.get("pair_id") for a in arts]}),
        skipped=fprov.get("skipped", 0),
        subsets=fprov.get("subsets"),
        fusion={"method": "moe", "experts": [expert_record(a) for a in arts], "mean_gate": mean_gate},
    )
    base = write_artifact(out, {"embeddings": res.z.contiguous()}, first.table, prov, table_meta=first.table_meta)
    return base, mean_gate


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class MoETrainResult:
    """What :func:`train_moe` did. ``history``: training loss per step (contrastive + balance)."""

    weights: Path
    digest: str
    fused: Path | None
    experts: list[str]
    mean_gate: list[float]
    loss_start: float
    loss_end: float
    history: list[float]
    steps: int
    rows: dict[str, int]
    pools: dict[str, Any]
    config: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"], d["fused"] = str(self.weights), (str(self.fused) if self.fused else None)
        d["history"] = [round(v, 6) for v in self.history]
        d["mean_gate_by_expert"] = by_expert(self.experts, self.mean_gate)
        return d


@dataclass
class MoEApplyResult:
    fused: Path
    weights: Path
    digest: str
    experts: list[str]
    mean_gate: list[float]
    rows: int
    dim: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fused"], d["weights"] = str(self.fused), str(self.weights)
        d["mean_gate_by_expert"] = by_expert(self.experts, self.mean_gate)
        return d


def _subset_rows(art: Artifact, subset: str) -> torch.Tensor:
    if art.table is None or "subset" not in art.table.columns:
        raise ArtifactError(f"{art.base}: manifest has no subset column; embed an ImageCLEF dev layout "
                            "(generated/, real_used/, real_not_used/)")
    mask = (art.table["subset"].astype(str) == subset).to_numpy().copy()
    return torch.nonzero(torch.from_numpy(mask), as_tuple=False).flatten()


def _eval_loss(model: MoEFusion, feats, gen_rows, used_rows, neg_rows, order, size, n_pos: int, alpha: float,
               chunk: int = 1024) -> float:
    """Deterministic loss over every anchor: its ``n_pos`` most similar pool members as positives,
    every real_not_used image as negatives (eval mode, no gradients)."""
    with torch.no_grad():
        k_used = fuse_features(model, [f[used_rows] for f in feats]).z
        k_neg = fuse_features(model, [f[neg_rows] for f in feats]).z
        total, count = 0.0, 0
        for s in range(0, gen_rows.numel(), chunk):
            anchors = torch.arange(s, min(s + chunk, gen_rows.numel()))
            out = fuse_features(model, [f[gen_rows[anchors]] for f in feats])
            idx, ok = _top_of_pool(order, size, anchors, n_pos)
            loss = hybrid_contrastive_loss(out.z, k_used[idx], k_neg, out.tau, alpha, pos_mask=ok)
            total += float(loss) * anchors.numel()
            count += anchors.numel()
    return total / max(1, count)


@releases_output_claim("out_weights", "out")
def train_moe(
    expert_artifacts: Sequence[str | os.PathLike],
    out_weights: str | os.PathLike,
    config: MoEConfig | Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    threads: int | None = None,
    **overrides: Any,
) -> MoETrainResult:
    """Train the fusion on K >= 2 embeddings artifacts of one dev set (same images, same order).

    ``expert_artifacts``: embeddings artifact paths, one per expert, whose manifests have
    ``subset`` generated / real_used / real_not_used.  ``out_weights``: the fusion weights file
    (``.safetensors`` appended when missing).  ``out``: when given, also write the fused embeddings
    of these inputs there.  ``config`` / ``overrides``: :class:`MoEConfig` keys.  ``threads``: torch
    CPU threads while training (restored afterwards; None leaves torch's setting; the model is small,
    so 1 thread is often fastest, and on a busy machine much faster).
    Same inputs + seed -> same weights (CPU)."""
    if threads:
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return train_moe(expert_artifacts, out_weights, config, out, progress, None, **overrides)
        finally:
            torch.set_num_threads(old)
    t0 = time.perf_counter()
    cfg = as_moe_config(config, **overrides)
    wpath = weights_path(out_weights)
    ensure_writable(wpath)
    if out is not None:
        ensure_writable(out)
    arts = read_experts(expert_artifacts)
    feats = _features(arts)
    gen_rows = _subset_rows(arts[0], "generated")
    used_rows = _subset_rows(arts[0], "real_used")
    neg_rows = _subset_rows(arts[0], "real_not_used")
    for name, rows in (("generated", gen_rows), ("real_used", used_rows), ("real_not_used", neg_rows)):
        if rows.numel() == 0:
            raise GanprintError(f"{arts[0].base}: no '{name}' images; the fusion is trained on a dev set with "
                                "generated/, real_used/ and real_not_used/ (apply it to other sets with --apply)")
    n_pos = cfg.pos_per_anchor or cfg.min_pos
    order, size = positive_pools([f[gen_rows] for f in feats], [f[used_rows] for f in feats],
                                 cfg.sim_threshold, cfg.min_pos, cfg.max_pool)
    sizes = size.float()
    pools = {"mean": round(float(sizes.mean()), 3), "min": int(sizes.min()), "max": int(sizes.max()),
             "threshold": cfg.sim_threshold, "similarity": "mean expert cosine (concatenated normalised features)"}
    if int(size.min()) == used_rows.numel() and used_rows.numel() > cfg.min_pos:
        # typical for non-negative CNN features, where almost every cosine is high
        pools["warning"] = (f"every pool holds all {used_rows.numel()} real_used images (similarity >= "
                            f"{cfg.sim_threshold} everywhere): positives are not selective; raise --sim-threshold "
                            "or set --max-pool")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # initialisation from the seed, without touching the caller's RNG
        model = MoEFusion([f.shape[1] for f in feats], cfg.dim, cfg.gate_hidden, cfg.heads, cfg.residual)
    key_model = None
    if cfg.key_encoder == "momentum":
        import copy

        key_model = copy.deepcopy(model).eval()
        for p in key_model.parameters():
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    queue = _KeyQueue(cfg.queue_size, cfg.dim) if cfg.queue_size > 0 else None

    # every parameter (all projections, gate, attention, tau head) is optimised
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = min(cfg.warmup_steps, max(0, cfg.steps - 1))

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_start = _eval_loss(model, feats, gen_rows, used_rows, neg_rows, order, size, n_pos, cfg.loss_alpha)

    n_gen = gen_rows.numel()
    bsz = min(cfg.batch_size, n_gen)
    perm = torch.randperm(n_gen, generator=gen)
    cursor = 0
    history: list[float] = []
    bar = task = None
    if progress:
        from ganprint.progress import make_progress

        bar = make_progress("fuse moe", "step/s", "loss")
        bar.start()
        task = bar.add_task("train", total=cfg.steps, loss="")
    try:
        for step in range(cfg.steps):
            if cursor + bsz > n_gen:
                perm, cursor = torch.randperm(n_gen, generator=gen), 0
            anchors = perm[cursor:cursor + bsz]
            cursor += bsz
            pos_idx, pos_ok = _sample_pool(order, size, anchors, n_pos, gen)
            if cfg.neg_per_anchor > 0:
                n_neg = neg_rows.numel()
                if cfg.neg_per_anchor <= n_neg:
                    neg_idx = torch.argsort(torch.rand(bsz, n_neg, generator=gen), dim=1)[:, :cfg.neg_per_anchor]
                else:
                    neg_idx = torch.randint(n_neg, (bsz, cfg.neg_per_anchor), generator=gen)
            else:
                neg_idx = None

            model.train()
            fwd = model([f[gen_rows[anchors]] for f in feats])

            def keys(rows: torch.Tensor) -> torch.Tensor:
                if key_model is None:
                    return model([f[rows] for f in feats]).z
                with torch.no_grad():
                    return key_model([f[rows] for f in feats]).z

            # only the distinct real images this step needs go through the key encoder
            u_pos, inv_pos = torch.unique(pos_idx, return_inverse=True)
            k_pos = keys(used_rows[u_pos])[inv_pos]  # [B, P, d]
            if neg_idx is None:
                negs: list[torch.Tensor] = [keys(neg_rows)]  # [Kn, d], shared
            else:
                u_neg, inv_neg = torch.unique(neg_idx, return_inverse=True)
                negs = [keys(neg_rows[u_neg])[inv_neg]]  # [B, n, d]
            masks: list[Any] = [None]
            if queue is not None:
                negs.append(queue.keys)
                masks.append(queue.mask(anchors))
            loss_c = hybrid_contrastive_loss(fwd.z, k_pos, negs, fwd.tau, cfg.loss_alpha, pos_mask=pos_ok,
                                             neg_mask=masks)
            mean_g = fwd.gate.mean(0)
            balance = model.n_experts * (mean_g ** 2).sum() - 1.0
            loss = loss_c + cfg.balance * balance
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            if key_model is not None:
                with torch.no_grad():
                    for pk, po in zip(key_model.parameters(), model.parameters()):
                        pk.lerp_(po.detach(), 1.0 - cfg.momentum)
            if queue is not None:
                if key_model is None:
                    qk = fwd.z.detach()
                else:
                    with torch.no_grad():
                        qk = key_model([f[gen_rows[anchors]] for f in feats]).z
                queue.push(qk, anchors)
            history.append(float(loss.detach()))
            if bar is not None:
                bar.update(task, advance=1, loss=f"loss {history[-1]:.4f}")
    finally:
        if bar is not None:
            bar.stop()

    model.eval()
    loss_end = _eval_loss(model, feats, gen_rows, used_rows, neg_rows, order, size, n_pos, cfg.loss_alpha)
    mean_gate = [round(float(v), 6) for v in fuse_features(model, feats).gate.mean(0)]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    digest = weights_digest(state)
    names = [_expert_name(a.provenance) for a in arts]
    rows = {"generated": int(gen_rows.numel()), "real_used": int(used_rows.numel()),
            "real_not_used": int(neg_rows.numel()), "total": int(feats[0].shape[0])}
    meta = {
        "ganprint_version": __version__,
        "kind": WEIGHTS_KIND,
        "stage": "fuse",
        "method": "moe",
        "format": FORMAT,
        "digest": digest,
        "model": model.spec(),
        "experts": [expert_record(a) for a in arts],
        "expert_names": names,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "training": {"inputs_hash": arts[0].provenance.get("inputs_hash"), "rows": rows, "pools": pools,
                     "loss_start": loss_start, "loss_end": loss_end, "mean_gate": mean_gate},
    }
    save_moe(wpath, model, meta)
    fused = None
    if out is not None:
        fused, _ = _write_fused(out, model, meta, wpath, arts)
    return MoETrainResult(wpath, digest, fused, names, mean_gate, loss_start, loss_end, history, cfg.steps, rows,
                          pools, cfg.to_dict(), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# applying trained weights


def check_experts(meta: Mapping[str, Any], wpath: str | os.PathLike, arts: Sequence[Artifact]) -> None:
    """Refuse experts that differ (count, order, backbone, weights, preprocessing, checkpoint,
    width) from those the fusion weights were trained on."""
    trained = meta["experts"]
    names = ", ".join(str(e.get("backbone")) for e in trained)
    if len(arts) != len(trained):
        raise GanprintError(f"{wpath}: trained on {len(trained)} experts ({names}), got {len(arts)} artifacts; "
                            "pass one embeddings artifact per expert, in the training order")
    for i, (art, want) in enumerate(zip(arts, trained)):
        have = expert_identity(art.provenance)
        have["dim"] = int(art.tensor("embeddings").shape[1])
        diffs = [k for k in ("backbone", "weights_digest", "preprocess", "checkpoint", "dim") if have[k] != want.get(k)]
        if diffs:
            k = diffs[0]
            raise GanprintError(
                f"{art.base}: expert {i + 1} has {k} {short(have[k]) if k != 'preprocess' else have[k]} but {wpath} was "
                f"trained on {short(want.get(k)) if k != 'preprocess' else want.get(k)} ({want.get('backbone')}); "
                f"pass the experts in the training order ({names}), embedded with the same backbones, weights "
                "and checkpoints")


@releases_output_claim("out")
def apply_moe(weights: str | os.PathLike, expert_artifacts: Sequence[str | os.PathLike],
              out: str | os.PathLike) -> MoEApplyResult:
    """Fuse other embeddings artifacts of the same experts (e.g. the test set) with trained weights.

    The experts must be given in the training order and match its backbones / weights digests /
    checkpoints; their manifests must agree row by row.  Writes an embeddings artifact ``out``."""
    ensure_writable(out)
    model, meta = load_moe(weights)
    wpath = weights_path(weights) if not Path(weights).exists() else Path(weights)
    arts = read_experts(expert_artifacts)
    check_experts(meta, wpath, arts)
    base, mean_gate = _write_fused(out, model, meta, wpath, arts)
    return MoEApplyResult(base, wpath, meta["digest"], [_expert_name(a.provenance) for a in arts], mean_gate,
                          int(arts[0].tensor("embeddings").shape[0]), model.dim)
