"""Contrastive fine-tuning loop (paper sections 3.1-3.2, with the seed code's defects fixed).

Per step, for a global batch of ``batch_size`` generated images (anchors; split over ranks):

- query q_i, tau_i = online(view1(anchor_i))                      (gradients)
- keys from the momentum encoder, under no_grad:
    self key     momentum(view2(anchor_i))           (a *different* augmentation)
    pool keys    momentum(view(real_used p)), up to ``pos_per_anchor`` drawn from anchor_i's pool
    explicit negatives  momentum(view(real_not_used n)), ``num_neg_samples`` per anchor
  (each distinct real image is encoded once per step, however many anchors share it);
- loss = hybrid_contrastive_loss(q, [self key, pool keys], (queue, explicit negatives), tau,
  alpha), queued keys of the anchor itself masked out;
- AdamW step (warm-up + cosine lr, gradient clipping, AMP on CUDA), EMA update of the momentum
  encoder, then the self keys of all ranks enter the FIFO queue.

Anchors come from a seeded stream of per-epoch permutations; every random draw of step s on
rank r comes from a generator seeded by (seed, s, r) and the global torch RNG is re-seeded the
same way, so a run stopped at step s and resumed continues bit-exactly (on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ganprint.checkpoint import (
    FORMAT,
    load_optimizer_tensors,
    model_digest,
    optimizer_tensors,
    prefixed,
    read_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    tensors_digest,
    unprefixed,
)
from ganprint.contrastive.augment import (
    AugmentConfig,
    augment,
    cache_size,
    instance_pair,
    replica_views,
    to_cache,
    to_model_input,
)
from ganprint.contrastive.config import TrainConfig, absolute_paths, as_config, diff_configs, to_toml
from ganprint.contrastive.distributed import (
    DistContext,
    all_gather_cat,
    barrier,
    broadcast_,
    gather_digests,
    init_distributed,
    shutdown,
)
from ganprint.contrastive.heads import ContrastiveEncoder, ProjectionHead, set_bn_mode
from ganprint.contrastive.loss import hybrid_contrastive_loss
from ganprint.contrastive.momentum import ema_update, make_momentum_encoder
from ganprint.contrastive.pools import (
    cosine_matrix,
    pool_summary,
    pools_from_matrix,
    pools_from_similarity_artifact,
    sample_negatives,
    sample_positives,
)
from ganprint.contrastive.queue import KeyQueue
from ganprint.errors import GanprintError


# ---------------------------------------------------------------------------------------------
# seeds


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any JSON-able parts (stable across processes and platforms)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def make_generator(*parts: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


class AnchorStream:
    """Global anchor order: concatenated seeded permutations of range(n), one per epoch.
    ``batch(step, size)`` = items [step*size, (step+1)*size) of that stream."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=make_generator(self.seed, "epoch", epoch))
        return self._perms[epoch]

    def batch(self, step: int, size: int) -> torch.Tensor:
        start = step * size
        out = [int(self._perm((start + i) // self.n)[(start + i) % self.n]) for i in range(size)]
        return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    """The three subsets of a dev folder, cached as uint8 grayscale [N, S, S]."""

    gen: torch.Tensor
    used: torch.Tensor
    not_used: torch.Tensor
    gen_hashes: list[str]
    used_hashes: list[str]
    not_used_hashes: list[str]
    gen_records: list[Any]
    used_records: list[Any]
    inputs_hash: str
    ignored: int = 0

    def summary(self) -> dict[str, Any]:
        return {"inputs_hash": self.inputs_hash, "generated": len(self.gen_hashes), "real_used": len(self.used_hashes),
                "real_not_used": len(self.not_used_hashes), "cache_size": int(self.gen.shape[-1]),
                "ignored": self.ignored}


def load_train_data(folder: str, image_size: int) -> TrainData:
    from ganprint.data import discover, load_image
    from ganprint.embed import hash_records, inputs_digest

    if not folder:
        raise GanprintError("no training data; pass the dataset folder (positional DATA or --data, or `data` in the config)")
    records, _ = discover([folder])
    by: dict[str, list] = {"generated": [], "real_used": [], "real_not_used": []}
    ignored = 0
    for r in records:
        if r.subset in by:
            by[r.subset].append(r)
        else:
            ignored += 1
    if not by["generated"] or not by["real_used"]:
        raise GanprintError(f"{folder}: needs an ImageCLEF dev layout with generated/ and real_used/ "
                            f"(found {len(by['generated'])} generated, {len(by['real_used'])} real_used); "
                            "point --data at the dev folder")
    all_recs = by["generated"] + by["real_used"] + by["real_not_used"]
    hashes = hash_records(all_recs)
    size = cache_size(image_size)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        arrays = list(pool.map(lambda r: to_cache(load_image(r.path), size), all_recs))
    ng, nu = len(by["generated"]), len(by["real_used"])

    def stack(items: list[np.ndarray]) -> torch.Tensor:
        if not items:
            return torch.zeros(0, size, size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(items))

    return TrainData(
        gen=stack(arrays[:ng]), used=stack(arrays[ng:ng + nu]), not_used=stack(arrays[ng + nu:]),
        gen_hashes=hashes[:ng], used_hashes=hashes[ng:ng + nu], not_used_hashes=hashes[ng + nu:],
        gen_records=by["generated"], used_records=by["real_used"],
        inputs_hash=inputs_digest(all_recs, hashes), ignored=ignored,
    )


def compute_pools(cfg: TrainConfig, loaded, data: TrainData, ctx: DistContext) -> tuple[list[torch.Tensor], dict]:
    """Pools from the similarity artifact, or from the frozen backbone's cosine similarity
    (none with ``positives = "instance"``: the only positive is the anchor's second view)."""
    if cfg.positives == "instance":
        pools = [torch.zeros(0, dtype=torch.long) for _ in data.gen_hashes]
        info: dict[str, Any] = {"source": "none (positives = instance)"}
    elif cfg.similarity:
        pools, info = pools_from_similarity_artifact(cfg.similarity, data.gen_hashes, data.used_hashes,
                                                     cfg.sim_threshold, cfg.min_pos_samples, cfg.max_pool_size)
    else:
        g, r = len(data.gen_hashes), len(data.used_hashes)
        matrix = torch.zeros(g, r, device=ctx.device)
        if ctx.is_main:
            from ganprint.embed import extract_features

            feats = []
            for recs in (data.gen_records, data.used_records):
                f, kept, _, bad = extract_features(loaded.model.to(ctx.device), recs, loaded.preprocess, ctx.device,
                                                   batch_size=64, workers=0)
                if bad:
                    i = min(bad)
                    raise GanprintError(f"{recs[i].path}: {bad[i]}; remove or fix the file")
                feats.append(f)
            matrix = cosine_matrix(feats[0], feats[1]).to(ctx.device)
        matrix = broadcast_(ctx, matrix.contiguous()).cpu()
        pools = pools_from_matrix(matrix, cfg.sim_threshold, cfg.min_pos_samples, cfg.max_pool_size)
        info = {"source": "frozen-backbone-cosine", "backbone": loaded.spec.name}
    info.update(pool_summary(pools))
    info["threshold"] = cfg.sim_threshold
    info["min_pos"] = cfg.min_pos_samples
    info["digest"] = hashlib.sha256(b"".join(p.numpy().tobytes() + b"|" for p in pools)).hexdigest()
    return pools, info


# ---------------------------------------------------------------------------------------------
# schedule


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warm-up to ``lr`` then cosine decay to 0 over ``max_steps``."""
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, max_steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def warmup_steps(cfg: TrainConfig, max_steps: int) -> int:
    return int(round(0.05 * max_steps)) if cfg.warmup_steps < 0 else cfg.warmup_steps


@dataclass
class Plan:
    batch: int  # global
    local_batch: int
    steps_per_epoch: int
    max_steps: int
    stop: int
    queue_size: int
    pos_per_anchor: int
    notes: list[str] = field(default_factory=list)


def make_plan(cfg: TrainConfig, n_gen: int, n_not_used: int, world: int) -> Plan:
    notes = []
    batch = cfg.batch_size
    if batch % world:
        raise GanprintError(f"batch_size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    if batch > n_gen:
        batch = max(world, (n_gen // world) * world)
        notes.append(f"batch_size {cfg.batch_size} > {n_gen} generated images: using {batch}")
    spe = math.ceil(n_gen / batch)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_gen / batch))
    stop = min(max_steps, cfg.stop_at_step) if cfg.stop_at_step else max_steps
    if cfg.queue_size:
        k = cfg.queue_size
        if k > n_gen:
            notes.append(f"queue_size {k} exceeds the {n_gen} generated images: the queue holds stale repeats "
                         "(keys of the anchor itself are masked)")
    else:
        # keys of the other anchors, at most ~one epoch old; never far beyond the dataset
        k = int(min(16384, max(batch, n_gen - batch)))
    if cfg.num_neg_samples and n_not_used == 0:
        notes.append("no real_not_used images: explicit negatives off, the queue alone provides negatives")
    pos = 0 if cfg.positives == "instance" else cfg.pos_per_anchor or cfg.min_pos_samples
    return Plan(batch, batch // world, spe, max_steps, stop, k, pos, notes)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    checkpoint: Path
    config_path: Path
    step: int
    max_steps: int
    seconds: float
    losses: list[float]
    tau_means: list[float]
    resumed_from: int
    world_size: int
    digest: str
    notes: list[str]


class _Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, resume: bool, progress: bool, log) -> None:
        self.cfg, self.ctx, self.resume, self.progress, self.log = cfg, ctx, resume, progress, log

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        from ganprint.backbones import load_backbone
        from ganprint.device import autocast_context

        cfg, ctx = self.cfg, self.ctx
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _check_inputs(cfg)
        if self.resume:
            self._check_resumable()  # fail before the slow part
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        self.loaded = load_backbone(cfg.backbone, cfg.weights, cfg.image_size)
        self.start_prov = self.loaded.provenance()
        self.size = self.loaded.preprocess.size
        self.data = load_train_data(cfg.data, self.size)
        self.pools, self.pool_info = compute_pools(cfg, self.loaded, self.data, ctx)
        self.plan = make_plan(cfg, len(self.data.gen_hashes), len(self.data.not_used_hashes), ctx.world)
        self.aug = AugmentConfig.from_train_config(cfg)
        dev = ctx.device
        self.channels_last = self.loaded.spec.channels_last and dev.type != "mps"

        backbone = self.loaded.model
        for p in backbone.parameters():
            p.requires_grad_(True)  # load_backbone hands out a frozen feature extractor
        torch.manual_seed(derive_seed(cfg.seed, "head"))
        head = ProjectionHead(self.loaded.dim, cfg.proj_hidden, cfg.proj_dim, cfg.proj_layers)
        self.encoder = ContrastiveEncoder(backbone, head).to(dev)
        if self.channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        set_bn_mode(self.encoder, cfg.bn_mode)
        self.momentum = make_momentum_encoder(self.encoder)
        decay, no_decay = [], []
        for name, p in self.encoder.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.queue = KeyQueue(self.plan.queue_size, cfg.proj_dim, device=dev)
        # pool membership [G, R_used]: which generated images share a positive
        self.members = torch.zeros(len(self.pools), len(self.data.used_hashes), device=dev)
        for i, pool in enumerate(self.pools):
            self.members[i, pool.to(dev)] = 1.0
        use_amp = cfg.amp and dev.type == "cuda"
        self.autocast = (lambda: autocast_context(dev)) if use_amp else contextlib.nullcontext
        fp16 = cfg.amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.stream = AnchorStream(len(self.data.gen_hashes), cfg.seed)
        self.step = 0
        self.resumed_from = 0
        if self.resume:
            self._load()
        elif cfg.queue_init == "keys":
            self._fill_queue()
        if ctx.enabled and ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.encoder, device_ids=[dev.index] if dev.type == "cuda" else None,
                             broadcast_buffers=cfg.bn_mode == "train")
        else:
            self.model = self.encoder

    def _views(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # instance / both: every view (queries, keys, pool positives, negatives) is a replica view,
        # so no key can be told from the queries by its kind of augmentation
        if self.cfg.positives == "pools":
            v = augment(images.to(self.ctx.device), self.size, self.aug, g)
        else:
            v = replica_views(images.to(self.ctx.device), self.size, g, work_size=self.cfg.instance_res)[0]
        return to_model_input(v, self.loaded.preprocess, self.channels_last)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        with self.autocast():
            for i in range(0, x.shape[0], self.cfg.key_chunk):
                out.append(self.momentum(x[i:i + self.cfg.key_chunk])[0].float())
        return torch.cat(out) if out else x.new_zeros(0, self.cfg.proj_dim)

    def _fill_queue(self) -> None:
        """Start with real momentum keys of generated images (not random vectors): rank 0 encodes
        one view of ``queue_size`` images, every rank receives the same keys."""
        k = self.plan.queue_size
        if k == 0:
            return
        n = len(self.data.gen_hashes)
        g = make_generator(self.cfg.seed, "queue-init")
        ids = torch.randperm(n, generator=g)[:k] if k <= n else torch.randint(n, (k,), generator=g)
        keys = torch.zeros(ids.numel(), self.cfg.proj_dim, device=self.ctx.device)
        if self.ctx.is_main:
            keys = self._keys(self._views(self.data.gen[ids], g))
        keys = broadcast_(self.ctx, keys.contiguous())
        self.queue.enqueue(keys, ids.to(self.ctx.device))

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        cfg, ctx, plan, data = self.cfg, self.ctx, self.plan, self.data
        dev = ctx.device
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, cfg, plan.max_steps)
        torch.manual_seed(derive_seed(cfg.seed, "torch", step, ctx.rank))  # dropout, drop-path
        g = make_generator(cfg.seed, "step", step, ctx.rank)
        anchors = self.stream.batch(step, plan.batch)[ctx.rank * plan.local_batch:(ctx.rank + 1) * plan.local_batch]
        b = anchors.numel()
        pos_idx, pos_ok = sample_positives(self.pools, anchors, plan.pos_per_anchor, g)
        n_neg = cfg.num_neg_samples if len(data.not_used_hashes) else 0
        neg_idx = sample_negatives(len(data.not_used_hashes), b, n_neg, g)

        if cfg.positives == "pools":
            xq = self._views(data.gen[anchors], g)
            xk = self._views(data.gen[anchors], g)  # a second, independent view
        else:  # the instance pair: two replica views of the anchor
            va, vb, _, _ = instance_pair(data.gen[anchors].to(dev), self.size, g, work_size=cfg.instance_res,
                                         clean=cfg.instance_clean)
            xq, xk = (to_model_input(v, self.loaded.preprocess, self.channels_last) for v in (va, vb))
        upos, pos_inv = torch.unique(pos_idx[pos_ok], return_inverse=True)
        uneg, neg_inv = torch.unique(neg_idx.reshape(-1), return_inverse=True)
        xr = torch.cat([xk, self._views(data.used[upos], g), self._views(data.not_used[uneg], g)])
        keys = self._keys(xr)
        k_self, k_pos_u, k_neg_u = keys[:b], keys[b:b + upos.numel()], keys[b + upos.numel():]

        k_pos = keys.new_zeros(b, plan.pos_per_anchor, cfg.proj_dim)
        k_pos[pos_ok.to(dev)] = k_pos_u[pos_inv.to(dev)]
        ok = pos_ok.to(dev)
        if cfg.self_positive or cfg.positives != "pools":  # instance / both: the instance key always
            k_pos = torch.cat([k_self[:, None], k_pos], 1)
            ok = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), ok], 1)
        negatives = [self.queue.keys.clone()]  # clone: the queue is updated in place after the step
        qmask = self.queue.negative_mask(anchors.to(dev))
        if cfg.mask_pool_overlap:
            shared = self.members[anchors.to(dev)] @ self.members[self.queue.ids.clamp(min=0)].t()
            qmask &= shared == 0
        neg_masks = [qmask]
        if n_neg:
            negatives.append(k_neg_u[neg_inv.to(dev)].reshape(b, n_neg, cfg.proj_dim))
            neg_masks.append(torch.ones(b, n_neg, dtype=torch.bool, device=dev))

        with self.autocast():
            q, tau = self.model(xq)
        loss = hybrid_contrastive_loss(q.float(), k_pos, negatives, tau.float(), cfg.loss_alpha, ok, neg_masks)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        ema_update(self.momentum, self.encoder, cfg.momentum)
        self.queue.enqueue(all_gather_cat(ctx, k_self.contiguous()), all_gather_cat(ctx, anchors.to(dev)))

        t = tau.detach().float()
        stats = torch.stack([loss.detach().float(), t.mean(), t.min(), t.max()])[None]
        allstats = all_gather_cat(ctx, stats).cpu()
        return {"loss": float(allstats[:, 0].mean()), "tau_mean": float(allstats[:, 1].mean()),
                "tau_min": float(allstats[:, 2].min()), "tau_max": float(allstats[:, 3].max()),
                "lr": self.opt.param_groups[0]["lr"], "queue_filled": self.queue.filled()}

    # -- checkpoints -------------------------------------------------------------------------
    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        tensors.update(prefixed(self.encoder.state_dict(), "online."))
        tensors.update(prefixed(self.momentum.state_dict(), "momentum."))
        opt_t, opt_meta = optimizer_tensors(self.opt)
        tensors.update(opt_t)
        tensors.update(self.queue.state_tensors())
        tensors["state.step"] = torch.tensor(self.step, dtype=torch.long)
        return tensors, opt_meta

    def save(self) -> Path:
        cfg, ctx = self.cfg, self.ctx
        tensors, opt_meta = self._state_tensors()
        rank_digests = gather_digests(ctx, tensors_digest(tensors))
        path = cfg.checkpoint_path
        if ctx.is_main:
            tensors["rng.torch_cpu"] = torch.get_rng_state()
            online = unprefixed(tensors, "online.")
            meta = {
                "ganprint_version": __import__("ganprint").__version__,
                "kind": "checkpoint", "stage": "train", "format": FORMAT,
                **{k: self.start_prov[k] for k in ("backbone", "timm_name", "weights", "weights_source",
                                                   "weights_digest", "preprocess")},
                "image_size": self.size,
                "backbone_dim": self.loaded.dim,
                "head": self.encoder.head.config(),
                "dim": cfg.proj_dim,
                "config": cfg.to_dict(),
                "digest": tensors_digest(online),
                "step": self.step, "max_steps": self.plan.max_steps,
                "plan": {"batch": self.plan.batch, "queue_size": self.plan.queue_size,
                         "pos_per_anchor": self.plan.pos_per_anchor, "steps_per_epoch": self.plan.steps_per_epoch},
                "world_size": ctx.world, "rank_digests": rank_digests,
                "ranks_consistent": len(set(rank_digests)) == 1,
                "optimizer": {"type": "AdamW", **opt_meta},
                "data": self.data.summary(), "pools": self.pool_info,
                "rng": {"scheme": "each step re-seeds from sha256(seed, tag, step, rank)"},
                "torch_version": torch.__version__,
            }
            save_checkpoint(path, tensors, meta)
            cfg_path = cfg.config_path
            from ganprint.artifacts import atomic_path

            with atomic_path(cfg_path, "the resolved config", "free space or choose another --out") as tmp:
                Path(tmp).write_text(to_toml(cfg, header=f"resolved config of {path.name} (step {self.step}); "
                                                         f"rerun: ganprint train --config {cfg_path}"), encoding="utf-8")
        barrier(ctx)
        if len(set(rank_digests)) != 1:
            raise GanprintError(f"{path}: the {ctx.world} processes hold different weights (digests differ); "
                                "this is a bug, please report it with the config")
        return path

    def _check_resumable(self) -> None:
        cfg = self.cfg
        path = cfg.checkpoint_path
        if not path.is_file():
            raise GanprintError(f"{path}: no checkpoint to resume from; drop --resume or pass the --out of the run")
        meta = read_checkpoint_meta(path)
        # checkpoints from before these keys existed trained with their defaults
        changed = diff_configs({"positives": "pools", "instance_res": 0, "instance_clean": 0.0, **meta.get("config", {})},
                               cfg.to_dict())
        if changed:
            raise GanprintError(f"{path}: --resume with a different config ({', '.join(changed)}); use the saved "
                                f"{cfg.config_path} or start a new --out")

    def _load(self) -> None:
        cfg = self.cfg
        path = cfg.checkpoint_path
        self._check_resumable()
        tensors, meta = read_checkpoint(path)
        if meta.get("data", {}).get("inputs_hash") != self.data.inputs_hash:
            raise GanprintError(f"{path}: the dataset changed since this checkpoint; resume on the same data or "
                                "start a new --out")
        self.encoder.load_state_dict(unprefixed(tensors, "online."))
        self.momentum.load_state_dict(unprefixed(tensors, "momentum."))
        load_optimizer_tensors(self.opt, tensors, meta["optimizer"])
        self.queue.load_state_tensors(tensors)
        self.step = self.resumed_from = int(tensors["state.step"])
        if "rng.torch_cpu" in tensors:
            torch.set_rng_state(tensors["rng.torch_cpu"])

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, ctx, plan = self.cfg, self.ctx, self.plan
        t0 = time.perf_counter()
        metrics_path = Path(cfg.out) / "metrics.jsonl"
        losses: list[float] = []
        taus: list[float] = []
        if ctx.is_main:
            for note in plan.notes:
                self.log(f"note: {note}")
            self.log(f"train {cfg.backbone} @ {self.size}px: {len(self.data.gen_hashes)} generated, "
                     f"{len(self.data.used_hashes)} real_used, {len(self.data.not_used_hashes)} real_not_used; "
                     f"pools {self.pool_info.get('mean')} mean size ({self.pool_info.get('empty')} empty); "
                     f"batch {plan.batch} x {ctx.world} proc, queue {plan.queue_size}, steps {self.step}->{plan.stop}"
                     f" of {plan.max_steps}")
            if not self.resume and metrics_path.exists():
                metrics_path.unlink()
            elif self.resume and metrics_path.exists():
                _cut_metrics(metrics_path, self.step)  # steps logged after the checkpoint are redone
        bar = None
        if self.progress and ctx.is_main:
            from ganprint.progress import make_progress

            bar = make_progress("train", "step/s", "loss", "tau")
            bar.start()
            task = bar.add_task("train", total=plan.stop, completed=self.step, loss="", tau="")
        try:
            while self.step < plan.stop:
                st = self.train_step(self.step)
                self.step += 1
                losses.append(st["loss"])
                taus.append(st["tau_mean"])
                if not math.isfinite(st["loss"]):
                    raise GanprintError(f"loss became {st['loss']} at step {self.step}; lower lr or set grad_clip")
                if ctx.is_main:
                    try:
                        with open(metrics_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps({"step": self.step, **st}) + "\n")
                    except OSError as exc:
                        raise GanprintError(f"{metrics_path}: cannot write ({exc.strerror or exc}); free space "
                                            "or choose another --out, then rerun with --resume") from exc
                    if bar is not None:
                        bar.update(task, completed=self.step, loss=f"loss {st['loss']:.4f}",
                                   tau=f"tau {st['tau_mean']:.3f} [{st['tau_min']:.3f}-{st['tau_max']:.3f}]")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < plan.stop:
                    self.save()
        finally:
            if bar is not None:
                bar.stop()
        path = self.save()
        return TrainResult(path, cfg.config_path, self.step, plan.max_steps, time.perf_counter() - t0, losses, taus,
                           self.resumed_from, ctx.world, model_digest(self.encoder), plan.notes)


def _cut_metrics(path: Path, step: int) -> None:
    """Keep the ``metrics.jsonl`` lines of steps <= ``step`` (a killed run logged steps its last
    checkpoint does not hold; a resume redoes them).  A torn last line is dropped too."""
    from ganprint.artifacts import atomic_path

    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    with atomic_path(path, "metrics.jsonl", "free space or choose another --out") as tmp:
        Path(tmp).write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def _check_inputs(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise GanprintError("no training data; pass the dataset folder (DATA argument, --data, or `data` in the config)")
    if not Path(cfg.data).is_dir():
        raise GanprintError(f"{cfg.data}: no such folder; pass the dataset's dev folder as DATA")
    from ganprint.artifacts import artifact_paths

    if cfg.similarity and not artifact_paths(cfg.similarity)[0].is_file():
        raise GanprintError(f"{cfg.similarity}: similarity artifact not found; run `ganprint simmatrix` or omit --similarity")


def run_training(config: "TrainConfig | Mapping[str, Any] | str | os.PathLike", resume: bool = False,
                 progress: bool = False, log=None) -> TrainResult:
    """Train (or ``resume``) as ``config`` says; returns a :class:`TrainResult`.

    Works single-process or inside ``torchrun`` (one call per rank)."""
    cfg = absolute_paths(as_config(config))
    if log is None:
        from ganprint.progress import log as _log

        log = _log
    out = Path(cfg.out)
    _check_inputs(cfg)  # before anything is created
    ctx = init_distributed(cfg.device)
    created = not out.exists()
    try:
        if ctx.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise GanprintError(f"{out}: cannot create the output folder ({exc.strerror}); choose another --out") from exc
        barrier(ctx)
        if ctx.is_main and not resume and cfg.checkpoint_path.exists():
            log(f"note: {cfg.checkpoint_path} exists and will be replaced (use --resume to continue it)")
        trainer = _Trainer(cfg, ctx, resume, progress, log)
        trainer.setup()
        return trainer.run()
    except BaseException:
        # a run that fails before its first checkpoint leaves no folder it created behind
        if ctx.is_main and created and out.is_dir() and not cfg.checkpoint_path.exists():
            for f in out.iterdir():
                if f.name != "metrics.jsonl":
                    break
            else:
                (out / "metrics.jsonl").unlink(missing_ok=True)
                out.rmdir()
        raise
    finally:
        shutdown(ctx)


def train(config: "TrainConfig | Mapping[str, Any] | str | os.PathLike", resume: bool = False,
          progress: bool = False) -> Path:
    """Fine-tune as ``config`` says (a TrainConfig, a mapping of keys over the defaults, or a
    TOML path / preset name); returns the checkpoint path."""
    return run_training(config, resume=resume, progress=progress).checkpoint
