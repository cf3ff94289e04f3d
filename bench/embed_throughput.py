"""Embed throughput on this machine, as ratios against baselines measured in the same run.

    python bench/embed_throughput.py [--backbone efficientnet_lite0] [--n 192] [--batch-size 32] [--torchrun]

Prints images/s for
  forward   bare model forward on pre-decoded, pre-processed tensors (the practical limit),
  embed     ganprint's loader + model path (decode in DataLoader workers, channels_last,
            inference_mode), same batch size and threads,
  seed      a seed-style loop: PIL images decoded one by one in the main process, torchvision
            transforms, no workers, no channels_last, torch.no_grad,
and the ratios embed/forward (target >= 0.9) and embed/seed (target >= 1.5).
``--torchrun`` adds two rows of the whole ``ganprint embed`` command on the same images, decoding in
the main process (``--workers 0``): ``1proc x 2thr`` (one process, 2 threads) and ``torchrun 2x1``
(``torchrun --nproc-per-node 2``, gloo, one thread each), and their ratio; both artifacts are
checked to hold the same rows.
The images are 256x256 8-bit palette PNGs (the ImageCLEF 2025 format) written to a temp folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


def make_images(folder: Path, n: int, size: int = 256) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(12):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
            img += rng.uniform(0.2, 1.0) * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)
        img = img / img.max() * 220 + rng.normal(0, 8, img.shape)
        arr = np.clip(img, 0, 255).astype(np.uint8)
        p = Image.fromarray(arr, "L").convert("P")
        path = folder / f"img_{i:04d}.png"
        p.save(path)
        paths.append(path)
    return paths


def cli_rows(args, folder: str) -> dict[str, float]:
    """images/s of the ``ganprint embed`` command: 1 process x 2 threads, torchrun 2 processes x 1 thread."""
    import json
    import subprocess

    import torch

    from ganprint.artifacts import read_artifact

    exe = Path(sys.executable)
    common = ["embed", folder, "--backbone", args.backbone, "--batch-size", str(args.batch_size), "--workers", "0",
              "--force", "--json", "-q", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    out_dir = Path(folder).parent
    runs = {
        "1proc x 2thr": ([str(exe), "-m", "ganprint"], {"OMP_NUM_THREADS": "2"}),
        "torchrun 2x1": ([str(exe.parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "ganprint"],
                         {"OMP_NUM_THREADS": "1"}),
    }
    got: dict[str, float] = {}
    arts = {}
    for name, (cmd, extra) in runs.items():
        best = 0.0
        for r in range(args.repeats):
            base = out_dir / f"bench_{name.split()[0]}_{r}"
            proc = subprocess.run([*cmd, *common, "-o", str(base)], capture_output=True, text=True,
                                  env={**env, **extra}, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: ganprint embed failed: {proc.stderr[-2000:]}")
            best = max(best, float(json.loads(proc.stdout)["images_per_s"]))
            arts[name] = base
        got[name] = best
    a, b = (read_artifact(p).tensor("embeddings") for p in arts.values())
    # same rows; bit-identical only with equal threads per process (oneDNN rounds per thread count)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), "the two runs disagree"
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=None, help="embed's DataLoader workers [default: ganprint's]")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    ap.add_argument("--torchrun", action="store_true", help="add the 2-process torchrun row")
    args = ap.parse_args()

    import torch
    from torchvision import transforms

    from ganprint.backbones import load_backbone
    from ganprint.data import discover, load_image
    from ganprint.embed import default_workers, extract_features

    torch.set_num_threads(args.threads)
    workers = default_workers() if args.workers is None else args.workers
    lb = load_backbone(args.backbone)
    prep = lb.preprocess
    cpu = torch.device("cpu")

    with tempfile.TemporaryDirectory() as tmp_root:
        tmp = str(Path(tmp_root) / "imgs")  # the artifacts of --torchrun go beside it
        Path(tmp).mkdir()
        paths = make_images(Path(tmp), args.n)
        records, _ = discover([tmp])
        x_all = torch.stack([prep(load_image(str(p))) for p in paths])
        bs = args.batch_size

        # the fast model: channels_last (where the backbone supports it) + inference_mode
        fast = lb.model
        cl = lb.spec.channels_last
        if cl:
            fast = fast.to(memory_format=torch.channels_last)

        def forward_only() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(x_all), bs):
                    xb = x_all[i:i + bs]
                    fast(xb.contiguous(memory_format=torch.channels_last) if cl else xb)
            return time.perf_counter() - t

        def embed_path() -> float:
            t = time.perf_counter()
            extract_features(fast, records, prep, cpu, bs, workers, cl)
            return time.perf_counter() - t

        plain = load_backbone(args.backbone).model  # contiguous format, as the seed ran it
        interp = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR,
                  "box": transforms.InterpolationMode.BOX}.get(prep.interpolation, transforms.InterpolationMode.BILINEAR)
        tf = transforms.Compose([
            transforms.Resize((prep.size, prep.size), interpolation=interp),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ])

        def seed_loop() -> float:
            from PIL import Image

            t = time.perf_counter()
            with torch.no_grad():
                batch = []
                for p in paths:
                    img = Image.open(p).convert("L" if prep.color == "gray" else "RGB")
                    batch.append(tf(img))
                    if len(batch) == bs:
                        plain(torch.stack(batch))
                        batch = []
                if batch:
                    plain(torch.stack(batch))
            return time.perf_counter() - t

        forward_only()  # warm-up (allocator, kernels)
        res = {}
        for name, fn in (("forward", forward_only), ("embed", embed_path), ("seed", seed_loop)):
            res[name] = args.n / min(fn() for _ in range(args.repeats))
        if args.torchrun:
            res.update(cli_rows(args, tmp))

    print(f"backbone={args.backbone} size={prep.size} n={args.n} batch={bs} threads={args.threads} workers={workers}")
    print(f"{'path':<10}{'img/s':>10}")
    for k, v in res.items():
        print(f"{k:<10}{v:>10.1f}")
    if "torchrun 2x1" in res:
        print(f"torchrun 2x1 / 1proc x 2thr = {res['torchrun 2x1'] / res['1proc x 2thr']:.2f}  "
              "(2 processes of 1 thread vs 1 process of 2 threads, same images)")
    r1 = res["embed"] / res["forward"]
    r2 = res["embed"] / res["seed"]
    print(f"embed/forward = {r1:.2f}  (target >= 0.9)")
    print(f"embed/seed    = {r2:.2f}  (target >= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
