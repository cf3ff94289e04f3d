"""``synth`` stage: real images -> member / non-member split -> generator trained on members -> ImageCLEF layout.

The generator is a small DCGAN (``--generator dcgan``, default) or a small diffusers DDPM
(``--generator ddpm``), see :mod:`ganprint.synth.generators`; ``--copies F`` replaces a fraction
of the samples by transformed replicas of members (:mod:`ganprint.synth.replicas`).

Output (``OUT``)::

    dev/generated/          generated_dev_00001.png ...   sampled from the generator
    dev/real_used/          real_used_0001.png ...        members (label 1)
    dev/real_not_used/      real_not_used_0001.png ...    non-members (label 0)
    test/generated/         generated_test_00001.png ...
    test/real_unknown/      real_unknown_0001.png ...     members and non-members, shuffled
    reference/real_not_used/ reference_0001.png ...       only with --reference-real N > 0: more known
                            non-members (patients of their own, never trained on, in neither split):
                            the null a data owner's own non-member images give p-values
    test_truth.csv          image_id,label   (image_id = file name without extension)
    replicas.csv            only with --copies F > 0: the generated images that are transformed
                            copies of members (see ganprint.synth.replicas)
    generator.safetensors   the trained generator (DCGAN or DDPM; architecture in its metadata)
    synth.json              parameters, seed, counts, timings, loss curve, digests, image list

All images are 8-bit palette PNGs (mode "P", grayscale palette) at ``size`` x ``size``, as the
2025 task data.  The generator's training set is exactly the members of dev and test.  Real
images are split by *patient* (a group of neighbouring slices), so a patient is never both a
member and a non-member and never in both dev and test.

Everything is written to a temporary folder next to ``OUT`` and renamed at the end, so a failed
run leaves no half-written dataset.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ganprint import __version__
from ganprint.errors import GanprintError
from ganprint.synth.regimes import GENERATOR_DEFAULTS, REGIMES

SYNTH_FORMAT = 1
GRAY_PALETTE = bytes(v for i in range(256) for v in (i, i, i))

@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of a synth run; ``None`` fields of the CLI take the regime's value."""

    regime: str = "memorize"
    generator: str = "dcgan"  # a name of ganprint.synth.generators.GENERATORS
    seed: int = 0
    size: int = 256  # output images: size x size
    dev_real: int = 20  # dev: this many real_used and this many real_not_used
    test_real: int = 20  # test: this many members and this many non-members in real_unknown
    # reference/real_not_used: this many extra known non-members (0 = none; the rest of the output
    # is then identical to a run without them)
    reference_real: int = 0
    dev_generated: int = 500
    test_generated: int = 1000
    slices_per_patient: int = 2  # neighbouring slices per phantom patient (near-duplicates)
    real_dir: str | None = None
    group_by_folder: bool = False  # --real-dir: images in one sub-folder are one patient
    gan_res: int = 64
    gan_width: int = 16
    z_dim: int = 64
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-4
    log_every: int = 25
    device: str = "auto"
    # torch CPU threads: this small GAN gains little from a second thread on 2 cores, and with
    # other jobs on the machine OpenMP threads spin-wait (measured 6-10x slower); None: torch's own
    threads: int | None = 1
    # replicas (see ganprint.synth.replicas): this fraction of each split's generated images are
    # transformed copies of random members; 0 = none (the output is then what it was without them)
    copies: float = 0.0
    copy_rotation: float = 10.0  # degrees, +-
    copy_shift: float = 0.08  # fraction of the side, +- per axis
    copy_gamma_min: float = 0.8
    copy_gamma_max: float = 1.25
    copy_blur: float = 2.0  # largest down-sampling factor of the blur (1 = none)
    copy_noise: float = 6.0  # largest Gaussian noise sigma, gray levels
    ddpm_sample_steps: int = 10  # --generator ddpm: DDIM steps per sample
    ddpm_train_t: str = "all"  # --generator ddpm: training timesteps, "all" or "sampler" (see ddpm.DdpmConfig)

    @property
    def replica_ranges(self):
        from ganprint.synth.replicas import ReplicaRanges

        return ReplicaRanges(rotation=self.copy_rotation, shift=self.copy_shift, gamma_min=self.copy_gamma_min,
                             gamma_max=self.copy_gamma_max, blur=self.copy_blur, noise=self.copy_noise)

    @property
    def members(self) -> int:
        return self.dev_real + self.test_real

    @property
    def real_needed(self) -> int:
        return 2 * (self.dev_real + self.test_real) + self.reference_real


def resolve_config(regime: str = "memorize", generator: str = "dcgan", **overrides: Any) -> SynthConfig:
    """The regime's defaults, then the generator's, then every non-``None`` override, validated."""
    if regime not in REGIMES:
        raise GanprintError(f"--regime {regime}: unknown regime; use one of {', '.join(REGIMES)}")
    generator = generator or "dcgan"
    if generator not in GENERATOR_DEFAULTS:
        raise GanprintError(f"--generator {generator}: unknown generator; use one of {', '.join(GENERATOR_DEFAULTS)}")
    base = {**REGIMES[regime], **GENERATOR_DEFAULTS[generator], "generator": generator,
            **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(base) - {f.name for f in SynthConfig.__dataclass_fields__.values()}
    if unknown:
        raise TypeError(f"unknown synth parameters: {sorted(unknown)}")
    cfg = SynthConfig(regime=regime, **base)
    _validate(cfg)
    return cfg


def _validate(cfg: SynthConfig) -> None:
    checks = [
        ("--seed", cfg.seed, 0), ("--size", cfg.size, 16), ("--dev-real", cfg.dev_real, 1), ("--test-real", cfg.test_real, 1),
        ("--reference-real", cfg.reference_real, 0),
        ("--dev-generated", cfg.dev_generated, 1), ("--test-generated", cfg.test_generated, 1),
        ("--slices-per-patient", cfg.slices_per_patient, 1), ("--gan-width", cfg.gan_width, 1),
        ("--z-dim", cfg.z_dim, 1), ("--steps", cfg.steps, 1), ("--batch-size", cfg.batch_size, 1),
        ("--log-every", cfg.log_every, 1), ("--threads", cfg.threads if cfg.threads is not None else 1, 1),
        ("--ddpm-sample-steps", cfg.ddpm_sample_steps, 1),
    ]
    if cfg.ddpm_train_t not in ("all", "sampler"):
        raise GanprintError(f"--ddpm-train-t {cfg.ddpm_train_t}: use all or sampler")
    if cfg.generator not in GENERATOR_DEFAULTS:
        raise GanprintError(f"--generator {cfg.generator}: unknown generator; use one of {', '.join(GENERATOR_DEFAULTS)}")
    for name, value, lo in checks:
        if value < lo:
            raise GanprintError(f"{name} {value}: must be at least {lo}")
    if cfg.gan_res < 16 or cfg.gan_res & (cfg.gan_res - 1):
        raise GanprintError(f"--gan-res {cfg.gan_res}: must be a power of two >= 16 (e.g. 32, 64, 128)")
    if cfg.gan_res > cfg.size:
        raise GanprintError(f"--gan-res {cfg.gan_res}: larger than --size {cfg.size}; lower --gan-res or raise --size")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise GanprintError(f"--lr {cfg.lr}: must be a positive number")
    if not (0.0 <= cfg.copies <= 1.0):
        raise GanprintError(f"--copies {cfg.copies}: must be a fraction in [0, 1] (e.g. 0.15)")
    cfg.replica_ranges.validate()
    if cfg.group_by_folder and not cfg.real_dir:
        raise GanprintError("--group-by-folder: only applies to --real-dir; pass --real-dir DIR or drop the option")


# ---------------------------------------------------------------------------------------------
# real images and the split


@dataclass
class RealSet:
    """Real images uint8 [N, size, size]; per image: ``group`` [N] patient id, ``assign`` [N] class
    (see :func:`split_groups`), ``source`` a dict describing where it came from."""

    images: np.ndarray
    group: np.ndarray
    assign: np.ndarray
    source: list[dict]


def _fit_square(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] -> [size, size]: centre crop to a square (no distortion), then resize."""
    from PIL import Image

    h, w = arr.shape
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    arr = arr[y0:y0 + s, x0:x0 + s]
    if s == size:
        return np.ascontiguousarray(arr)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.LANCZOS))


def resize_batch(images: np.ndarray, size: int, resample: str = "lanczos") -> np.ndarray:
    """uint8 [N, H, W] -> uint8 [N, size, size] with PIL (deterministic, antialiased)."""
    from PIL import Image

    if images.shape[1:] == (size, size):
        return images.copy()
    method = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}[resample]
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), method))
    return out


def _groups_needed(cfg: SynthConfig) -> list[int]:
    """Patients needed for each of the 4 classes (dev used, dev not used, test used, test not used)."""
    spp = cfg.slices_per_patient
    return [math.ceil(n / spp) for n in (cfg.dev_real, cfg.dev_real, cfg.test_real, cfg.test_real)]


def phantom_reals(cfg: SynthConfig, on_image=None) -> RealSet:
    from ganprint.synth.phantoms import render_patients

    n_main = sum(_groups_needed(cfg))
    n_ref = math.ceil(cfg.reference_real / cfg.slices_per_patient)
    # patient i depends on (seed, i) only: the reference patients come after the split's own, so
    # the split, and every image of it, is what it is without them
    imgs, group, sl = render_patients(n_main + n_ref, cfg.slices_per_patient, cfg.size, cfg.seed, on_image)
    main = group < n_main
    assign = np.full(len(group), -1, dtype=np.int64)
    assign[main] = split_groups(group[main], cfg)
    assign[np.flatnonzero(~main)[: cfg.reference_real]] = REFERENCE_CLASS
    keep = assign >= 0
    source = [{"patient": int(p), "slice": int(j)} for p, j in zip(group[keep], sl[keep])]
    return RealSet(imgs[keep], group[keep], assign[keep], source)


def folder_reals(cfg: SynthConfig, on_image=None) -> RealSet:
    """Images of ``cfg.real_dir`` (gray, centre-cropped, resized); only the ones the split uses are decoded."""
    from ganprint.data import discover, load_image, to_gray

    root = Path(cfg.real_dir).expanduser()
    if not root.is_dir():
        raise GanprintError(f"--real-dir {cfg.real_dir}: not a folder; pass a folder of real images")
    records, _ = discover([str(root)])
    need = cfg.real_needed
    if len(records) < need:
        raise GanprintError(
            f"--real-dir {cfg.real_dir}: holds {len(records)} images, the split needs {need} "
            f"(dev {cfg.dev_real} used + {cfg.dev_real} not used, test {cfg.test_real} + {cfg.test_real}"
            f"{f', --reference-real {cfg.reference_real}' if cfg.reference_real else ''}); "
            "add images or lower --dev-real/--test-real" + ("/--reference-real" if cfg.reference_real else "")
        )
    if cfg.group_by_folder:
        keys = [str(Path(r.relpath).parent) for r in records]
    else:
        keys = [r.relpath for r in records]
    names = sorted(set(keys))
    gid = {k: i for i, k in enumerate(names)}
    group = np.asarray([gid[k] for k in keys], dtype=np.int64)
    if len(names) < 4:
        raise GanprintError(
            f"--real-dir {cfg.real_dir}: only {len(names)} patient folder(s); the split needs at least 4 "
            "(members and non-members in dev and test); drop --group-by-folder or add folders"
        )
    # decide the split on the file list first, so a big folder costs only the images used
    assign = split_groups(group, cfg)
    if cfg.reference_real:
        assign = _deal_reference(group, assign, cfg)
    keep = np.flatnonzero(assign >= 0)
    imgs, source = [], []
    for i in keep:
        rec = records[i]
        imgs.append(_fit_square(to_gray(load_image(rec.path)), cfg.size))
        source.append({"patient": int(group[i]), "source": rec.relpath})
        if on_image:
            on_image()
    return RealSet(np.stack(imgs), group[keep], assign[keep], source)


CLASSES = (("dev", "real_used", 1), ("dev", "real_not_used", 0), ("test", "real_unknown", 1), ("test", "real_unknown", 0),
           ("reference", "real_not_used", 0))
REFERENCE_CLASS = 4  # --reference-real: known non-members outside dev and test


def _deal_reference(group: np.ndarray, assign: np.ndarray, cfg: SynthConfig) -> np.ndarray:
    """``assign`` with ``cfg.reference_real`` images of patients the split left unused as class 4
    (whole patients, in a seeded order; a last patient may be cut short)."""
    out = assign.copy()
    free = np.unique(group[assign < 0])
    used = set(np.unique(group[assign >= 0]).tolist())
    free = np.asarray([g for g in free if g not in used], dtype=group.dtype)
    free = free[np.random.default_rng([cfg.seed, 0x4EF]).permutation(len(free))]
    left = cfg.reference_real
    for g in free:
        if left <= 0:
            break
        idx = np.flatnonzero(group == g)[:left]
        out[idx] = REFERENCE_CLASS
        left -= len(idx)
    if left > 0:
        raise GanprintError(f"--real-dir {cfg.real_dir}: no patients left for --reference-real {cfg.reference_real} "
                            f"after the split ({cfg.reference_real - left} images found); add patients or lower it")
    return out


def split_groups(group: np.ndarray, cfg: SynthConfig) -> np.ndarray:
    """Class index per image (0 dev member, 1 dev non-member, 2 test member, 3 test non-member, -1 unused).

    Patients are shuffled with the seed and dealt to the classes in turn until each has its
    count; a class's last patient may be cut short.  Raises when patients run out (a few big
    patient folders can hold enough images but not enough separate patients).
    """
    wanted = [cfg.dev_real, cfg.dev_real, cfg.test_real, cfg.test_real]
    rng = np.random.default_rng([cfg.seed, 0x5B117])
    uniq = np.unique(group)
    order = uniq[rng.permutation(len(uniq))]
    members_of = {g: np.flatnonzero(group == g) for g in uniq}
    assign = np.full(len(group), -1, dtype=np.int64)
    filled = [0, 0, 0, 0]
    k = 0
    pending = [c for c in range(4)]
    for g in order:
        if not pending:
            break
        c = pending[k % len(pending)]
        idx = members_of[g][: wanted[c] - filled[c]]
        assign[idx] = c
        filled[c] += len(idx)
        if filled[c] >= wanted[c]:
            pending.remove(c)
        else:
            k += 1
    if pending:
        raise GanprintError(
            f"--real-dir {cfg.real_dir}: its {len(uniq)} patients cannot fill the split "
            f"(dev {cfg.dev_real}+{cfg.dev_real}, test {cfg.test_real}+{cfg.test_real} images, a patient in one class only); "
            "add patients or lower --dev-real/--test-real"
        )
    return assign


# ---------------------------------------------------------------------------------------------
# writing


def save_palette_png(arr: np.ndarray, path: Path) -> None:
    """uint8 [H, W] -> 8-bit palette PNG whose palette index i is gray level i."""
    from PIL import Image

    h, w = arr.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    im.putpalette(GRAY_PALETTE)
    im.save(path, format="PNG")


def _ids(prefix: str, n: int, width: int = 4) -> list[str]:
    w = max(width, len(str(n)))
    return [f"{prefix}_{i:0{w}d}" for i in range(1, n + 1)]


@dataclass
class SynthOutcome:
    out: Path
    config: SynthConfig
    counts: dict
    seconds: dict
    generator_sha256: str
    device: str
    final_losses: dict = field(default_factory=dict)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise GanprintError(f"{out}: exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GanprintError(f"{out}: folder exists and is not empty; choose another OUT or pass --force to replace it")
    # the parent is created only when writing starts; check now that it can be, before training
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise GanprintError(f"{out.parent}: cannot create or write the output's parent folder; choose another OUT")


class _Deterministic:
    """Deterministic algorithms (and the thread count, if given) for the run; the caller's settings after."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def __enter__(self):
        import torch

        self.prev_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        self.prev = torch.are_deterministic_algorithms_enabled()
        self.prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        # warn_only: on CUDA a few kernels have no deterministic version; CPU runs are exact anyway
        torch.use_deterministic_algorithms(True, warn_only=True)
        return self

    def __exit__(self, *exc):
        import torch

        torch.use_deterministic_algorithms(self.prev, warn_only=self.prev_warn)
        torch.set_num_threads(self.prev_threads)
        return False


class _Bar:
    """One rich progress bar on stderr for one phase, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, label: str, unit: str, total: int, *fields: str) -> None:
        self.progress = self.task = None
        if enabled:
            from ganprint.progress import make_progress

            self.progress = make_progress(label, unit, *fields)
            self.task = self.progress.add_task(label, total=total, **dict.fromkeys(fields, ""))

    def tick(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def __enter__(self) -> "_Bar":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.progress is not None:
            self.progress.stop()
        return False


def run_synth(out: str | os.PathLike, config: SynthConfig | None = None, *, force: bool = False,
              progress: bool = True, **overrides: Any) -> SynthOutcome:
    """Build a synthetic membership benchmark in ``out`` (see the module docstring).

    ``config`` or ``overrides`` (``regime=``, ``steps=``, ... as in :class:`SynthConfig`) choose the
    parameters.  Returns a :class:`SynthOutcome`; raises :class:`GanprintError` on bad input.
    """
    import torch

    from ganprint.artifacts import sha256_file
    from ganprint.device import resolve_device
    from ganprint.synth.generators import GENERATORS

    cfg = config if config is not None else resolve_config(**overrides)
    if config is not None and overrides:
        cfg = replace(config, **overrides)
    _validate(cfg)
    out = Path(out).expanduser()
    _check_out(out, force)
    dev = resolve_device(cfg.device)
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}

    with _Deterministic(cfg.threads):
        # -- real images
        t = time.perf_counter()
        with _Bar(progress, "synth: real images", "img/s", cfg.real_needed) as bar:
            reals = folder_reals(cfg, on_image=bar.tick) if cfg.real_dir else phantom_reals(cfg, on_image=bar.tick)
        assign = reals.assign
        seconds["real_images"] = time.perf_counter() - t

        # -- the generator, trained on the members of dev and test
        members = np.flatnonzero((assign == 0) | (assign == 2))
        train_imgs = resize_batch(reals.images[members], cfg.gan_res)
        backend = GENERATORS[cfg.generator]
        gcfg = backend.make_config(cfg)
        with _Bar(progress, f"synth: train {cfg.generator} ({len(members)} members)", "it/s", cfg.steps, "loss") as bar:
            def on_step(step: int, losses: dict) -> None:
                if bar.progress is not None and (step % 10 == 0 or step == cfg.steps):
                    bar.progress.update(bar.task, completed=step, loss=backend.progress(losses))

            res = backend.train(train_imgs, gcfg, dev, cfg.seed, on_step)
        seconds["train"] = res.seconds

        # -- sampling: dev and test from separate noise streams
        t = time.perf_counter()
        raw = {"dev": backend.sample(res, gcfg, cfg.dev_generated, cfg.seed * 2 + 101, dev),
               "test": backend.sample(res, gcfg, cfg.test_generated, cfg.seed * 2 + 102, dev)}
        seconds["sample"] = time.perf_counter() - t
        plans = []
        if cfg.copies > 0:
            t = time.perf_counter()
            plans = _insert_replicas(raw, train_imgs, cfg)
            seconds["replicas"] = time.perf_counter() - t
        # replicas go through the same up-sampling as the samples they replace
        gen_dev = resize_batch(raw["dev"], cfg.size, "bicubic")
        gen_test = resize_batch(raw["test"], cfg.size, "bicubic")
        threads_used = torch.get_num_threads()

    # -- writing, into a temporary folder renamed at the end
    t = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GanprintError(f"{out.parent}: cannot create the output's parent folder ({exc.strerror}); choose another OUT") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _Bar(progress, "synth: write PNGs", "img/s",
                  cfg.dev_generated + cfg.test_generated + cfg.real_needed) as bar:
            real_ids: dict[int, dict] = {}
            images = _write_layout(tmp, cfg, reals, assign, gen_dev, gen_test, bar.tick, real_ids)
        replica_rows = _replica_rows(plans, members, real_ids)
        if plans:
            from ganprint.synth.replicas import REPLICAS_FILE, write_replicas_csv

            write_replicas_csv(tmp / REPLICAS_FILE, replica_rows)
        gen_path = tmp / "generator.safetensors"
        backend.save(res, gcfg, gen_path, {"ganprint_version": __version__, "seed": cfg.seed, "regime": cfg.regime})
        digest = sha256_file(gen_path)
        seconds["write"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t_all
        counts = _counts(images, cfg)
        counts["replicas"] = _replica_counts(replica_rows, images)
        summary = {
            "format": SYNTH_FORMAT,
            "ganprint_version": __version__,
            "stage": "synth",
            "config": asdict(cfg),
            "regime_defaults": REGIMES[cfg.regime],
            **({"generator_defaults": GENERATOR_DEFAULTS[cfg.generator]} if cfg.generator != "dcgan" else {}),
            "seed": cfg.seed,
            "source": "real_dir" if cfg.real_dir else "phantoms",
            "counts": counts,
            "generator": {
                "file": "generator.safetensors", "sha256": digest, "arch": backend.arch,
                **backend.describe(gcfg), "train_images": int(len(members)),
                "epochs": round(cfg.steps * cfg.batch_size / max(1, len(members)), 2),
                "steps_per_s": round(res.steps_per_s, 3),
            },
            "curve": res.curve,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "device": str(dev),
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "torch_threads": threads_used},
            "images": images,
        }
        if plans:
            summary["replicas"] = {"file": "replicas.csv", "fraction": cfg.copies,
                                   "ranges": asdict(cfg.replica_ranges),
                                   "applied_at": f"generator resolution {cfg.gan_res} px, then up-sampled like the samples",
                                   "sources": "uniform over the generator's training set (dev and test members)"}
        with open(tmp / "synth.json", "w") as fh:
            json.dump(summary, fh, indent=1, sort_keys=True)
            fh.write("\n")
        _replace_dir(tmp, out)
    except OSError as exc:  # a full disk or a vanished folder while writing: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise GanprintError(f"{out}: cannot write the benchmark ({exc.strerror or exc}); "
                            "free some space or choose another OUT") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = res.curve[-1] if res.curve else {}
    return SynthOutcome(out=out, config=cfg, counts=counts, seconds=summary["seconds"], generator_sha256=digest,
                        device=str(dev), final_losses={k: final.get(k) for k in backend.loss_keys})


def _insert_replicas(raw: dict[str, np.ndarray], train_imgs: np.ndarray, cfg: SynthConfig) -> list:
    """Overwrite the planned slots of ``raw[split]`` (uint8 [G, R, R], in place) with replicas."""
    from ganprint.synth.replicas import make_replicas, plan_replicas

    plans, rng = plan_replicas({k: len(v) for k, v in raw.items()}, len(train_imgs), cfg.copies,
                               cfg.replica_ranges, cfg.seed)
    for plan in plans:
        if len(plan.slots):
            raw[plan.split][plan.slots] = make_replicas(train_imgs, plan, rng)
    return plans


def _replica_rows(plans: list, members: np.ndarray, real_ids: dict[int, dict]) -> list[dict]:
    """One replicas.csv row per replica: generated file, source member (its written id), transform."""
    rows = []
    for plan in plans:
        ids = _ids(f"generated_{plan.split}", plan.n_generated, 5)  # the names _write_layout gives
        for slot, src, params in zip(plan.slots, plan.sources, plan.params):
            image_id = ids[int(slot)]
            s = real_ids[int(members[src])]
            rows.append({"image_id": image_id, "file": f"{plan.split}/generated/{image_id}.png", "split": plan.split,
                         "source_id": s["image_id"], "source_file": s["file"], "source_split": s["split"], **params})
    return rows


def _replica_counts(rows: list[dict], images: list[dict]) -> dict:
    """Replicas per split, and how many test members have one among the test generated images."""
    copied = {r["source_id"] for r in rows if r["split"] == "test"}
    test_members = [r["image_id"] for r in images if r["subset"] == "real_unknown" and r["label"] == 1]
    return {"dev": sum(r["split"] == "dev" for r in rows), "test": sum(r["split"] == "test" for r in rows),
            "test_members_with_replica": sum(i in copied for i in test_members),
            "members_with_replica": len({r["source_id"] for r in rows})}


def _write_layout(root: Path, cfg: SynthConfig, reals: RealSet, assign: np.ndarray,
                  gen_dev: np.ndarray, gen_test: np.ndarray, tick=None,
                  real_ids: dict[int, dict] | None = None) -> list[dict]:
    """Write the PNGs and ``test_truth.csv`` under ``root``; returns one record per real image.

    ``real_ids``, if given, is filled with ``{index into reals: its record}``."""
    for d in ("dev/generated", "dev/real_used", "dev/real_not_used", "test/generated", "test/real_unknown"):
        (root / d).mkdir(parents=True)
    if (assign == REFERENCE_CLASS).any():
        (root / "reference" / "real_not_used").mkdir(parents=True)
    for sub, arr in (("dev", gen_dev), ("test", gen_test)):
        for image_id, im in zip(_ids(f"generated_{sub}", len(arr), 5), arr):
            save_palette_png(im, root / sub / "generated" / f"{image_id}.png")
            if tick:
                tick()
    # names are handed out in a seeded random order, so file order says nothing about
    # membership or patient (neighbouring slices do not get neighbouring names)
    rng = np.random.default_rng([cfg.seed, 0x1D5])
    records: list[dict] = []
    layout = [("dev", "real_used", "real_used", [0]), ("dev", "real_not_used", "real_not_used", [1]),
              ("test", "real_unknown", "real_unknown", [2, 3])]
    if (assign == REFERENCE_CLASS).any():
        layout.append(("reference", "real_not_used", "reference", [REFERENCE_CLASS]))
    for split, subset, prefix, classes in layout:
        idx = np.flatnonzero(np.isin(assign, classes))
        idx = idx[rng.permutation(len(idx))]
        for image_id, i in zip(_ids(prefix, len(idx)), idx):
            label = 1 if assign[i] in (0, 2) else 0
            save_palette_png(reals.images[i], root / split / subset / f"{image_id}.png")
            records.append({"image_id": image_id, "split": split, "subset": subset, "label": label,
                            "file": f"{split}/{subset}/{image_id}.png", **reals.source[i]})
            if real_ids is not None:
                real_ids[int(i)] = records[-1]
            if tick:
                tick()
    with open(root / "test_truth.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image_id", "label"])
        for r in sorted((r for r in records if r["subset"] == "real_unknown"), key=lambda r: r["image_id"]):
            w.writerow([r["image_id"], r["label"]])
    return records


def _counts(images: list[dict], cfg: SynthConfig) -> dict:
    c = {"dev": {"generated": cfg.dev_generated}, "test": {"generated": cfg.test_generated}}
    for r in images:
        c.setdefault(r["split"], {})
        c[r["split"]][r["subset"]] = c[r["split"]].get(r["subset"], 0) + 1
    c["test"]["members"] = sum(1 for r in images if r["subset"] == "real_unknown" and r["label"] == 1)
    c["test"]["non_members"] = sum(1 for r in images if r["subset"] == "real_unknown" and r["label"] == 0)
    c["train_images"] = sum(1 for r in images if r["label"] == 1)
    c["patients"] = len({r["patient"] for r in images})
    return c


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` (``--force``) is removed only after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None:
            os.replace(old, out)
        raise GanprintError(f"{out}: cannot move the finished dataset into place ({exc.strerror}); check permissions") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
