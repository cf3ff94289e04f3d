#!/usr/bin/env bash
# Every CUDA path of ganprint once, on one GPU, in about 5 minutes: one PASS / FAIL / SKIP line each,
# with its throughput.  Where no CUDA device exists every check prints SKIP and the script exits 0.
#
#   bash bench/gpu_check.sh                      # from the repository root
#   PYTHON=.venv/bin/python GPU_CHECK_BACKBONE=test_resnet bash bench/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh    # self-test of the script itself on CPU (gloo; no AMP)
#
# Checks (each under `timeout $GPU_CHECK_TIMEOUT`, default 120 s):
#   embed-amp      `ganprint embed --device "$DEV"` (AMP) vs `--device cpu`: every row's cosine >= 0.999
#   simmatrix-gpu  topk_search on CUDA vs CPU (float32), 50k x 5k, D=256: identical top-k indices except
#                  near-ties (keys whose float64 scores differ by < 1e-6); and `ganprint simmatrix --device "$DEV"`
#   train-amp      `ganprint train --device "$DEV"` (AMP on) for 20 steps: finite loss, 20 steps done
#   torchrun-nccl  torchrun --nproc-per-node 1: the process group is nccl, a gather works, and
#                  `torchrun ... -m ganprint embed --device "$DEV"` equals the one-process CUDA artifact's rows
#   fuse           `ganprint fuse` (moe) on two CUDA-embedded experts (fuse itself has no CUDA path: CPU)
# Exit status: the number of FAIL lines (0: all passed or skipped).
set -u
PY=${PYTHON:-python}
BACKBONE=${GPU_CHECK_BACKBONE:-efficientnet_lite0}
LIMIT=${GPU_CHECK_TIMEOUT:-120}
DEV=${GPU_CHECK_DEVICE:-cuda}  # cpu: run the same checks on CPU, to test this script where no GPU is
N_IMAGES=${GPU_CHECK_IMAGES:-96}
case $BACKBONE in test_*) WEIGHTS_OPT="--weights none" ;; *) WEIGHTS_OPT="" ;; esac  # timm's test models: no weights
export HF_HUB_OFFLINE=1 PYTHONPATH="${PYTHONPATH:-$(pwd)}" DEV
TORCHRUN="$(dirname "$(command -v "$PY")")/torchrun"
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PY BACKBONE WEIGHTS_OPT LIMIT TORCHRUN WORK
trap 'rm -rf "$WORK"' EXIT
CHECKS="embed-amp simmatrix-gpu train-amp torchrun-nccl fuse"
fails=0

if [ "$DEV" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    for c in $CHECKS; do echo "SKIP $c: no CUDA device here (torch.cuda.is_available() is False)"; done
    exit 0
fi
if [ "$DEV" = cuda ]; then
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
else
    echo "device: $DEV (self-test of this script: the numbers say nothing about a GPU)"
fi

# run NAME FUNCTION: the function prints its own PASS/FAIL line; a crash or timeout becomes one FAIL line
run() {
    local name=$1; shift
    local t0=$SECONDS
    export -f "$1"  # a shell function: timeout runs it in a child bash
    timeout "$LIMIT" bash -c "$1" >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    local line
    line=$(grep -E '^(PASS|FAIL|SKIP) ' "$WORK/$name.out" | tail -1)
    if [ -z "$line" ]; then
        local why
        why=$(grep -v '^\s*$' "$WORK/$name.err" | tail -1)
        [ $rc -eq 124 ] && why="timed out after ${LIMIT}s"
        line="FAIL $name: exit $rc: ${why:-no output}"
    fi
    echo "$line ($((SECONDS - t0)) s)"
    case $line in FAIL*) fails=$((fails + 1)) ;; esac
}

# a tiny ImageCLEF layout of 256x256 palette PNGs
"$PY" - "$WORK/data" "$N_IMAGES" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:256, 0:256] / 256
for i in range(n):
    subset = "generated" if i < n // 2 else ("real_used" if i < 3 * n // 4 else "real_not_used")
    img = np.zeros((256, 256))
    for _ in range(10):
        cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.3)]
        img += rng.uniform(0.2, 1.0) * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)
    arr = np.clip(img / img.max() * 220 + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    (root / subset).mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "L").convert("P").save(root / subset / f"{subset}_{i:04d}.png")
EOF

# --- embed with AMP vs CPU --------------------------------------------------------------------
check_embed() {
    "$PY" -m ganprint embed "$WORK/data" -o "$WORK/e_gpu" -b "$BACKBONE" $WEIGHTS_OPT --device "$DEV" --json -q >"$WORK/e_gpu.json" || return 1
    "$PY" -m ganprint embed "$WORK/data" -o "$WORK/e_cpu" -b "$BACKBONE" $WEIGHTS_OPT --device cpu --json -q >"$WORK/e_cpu.json" || return 1
    "$PY" - "$WORK" <<'EOF'
import json, os, sys
import torch
from ganprint.artifacts import read_artifact
w = sys.argv[1]
g, c = (read_artifact(f"{w}/{n}").tensor("embeddings") for n in ("e_gpu", "e_cpu"))
cos = torch.nn.functional.cosine_similarity(g.double(), c.double(), dim=1)
ips = {n: json.load(open(f"{w}/{n}.json"))["images_per_s"] for n in ("e_gpu", "e_cpu")}
ok = g.shape == c.shape and float(cos.min()) >= 0.999
print(f"{'PASS' if ok else 'FAIL'} embed-amp: min row cosine AMP vs CPU {float(cos.min()):.5f} (>= 0.999) over {len(g)} rows; "
      f"{ips['e_gpu']:.1f} img/s on {os.environ['DEV']}, {ips['e_cpu']:.1f} img/s on CPU")
EOF
}
run embed-amp check_embed

# --- simmatrix on GPU vs CPU ------------------------------------------------------------------
check_sim() {
    "$PY" - <<'EOF'
import time
import torch
from ganprint.similarity import topk_search
g = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(5000, 256, generator=g), dim=1)
keys = torch.nn.functional.normalize(torch.randn(50000, 256, generator=g), dim=1)
import os
dev = os.environ["DEV"]
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
if not dev.startswith("cuda"):  # self-test: smaller
    q = q[:500]
topk_search(q[:64], keys, 10, device=dev, prepared=True, precision="fp32")  # warm-up
sync()
t = time.perf_counter()
a, _, _ = topk_search(q, keys, 10, device=dev, prepared=True, precision="fp32")
sync()
dt = time.perf_counter() - t
b, _, _ = topk_search(q, keys, 10, device="cpu", prepared=True, precision="fp32")
diff = (a.indices != b.indices).any(1).nonzero().flatten()
bad = 0
for r in diff.tolist():  # a differing row is fine only when the swapped keys tie within rounding
    union = torch.unique(torch.cat([a.indices[r], b.indices[r]]))
    s = (keys[union].double() @ q[r].double())
    kth = torch.sort(s, descending=True).values[9]
    only = set(a.indices[r].tolist()) ^ set(b.indices[r].tolist())
    bad += any(abs(float(keys[j].double() @ q[r].double()) - float(kth)) > 1e-6 for j in only)
ok = bad == 0 and torch.allclose(a.values, b.values, atol=1e-5)
print(f"{'PASS' if ok else 'FAIL'} simmatrix-gpu: top-10 of {len(q):,} x 50,000: {len(diff)} rows differ in order, {bad} beyond "
      f"near-ties; max |value diff| {float((a.values - b.values).abs().max()):.1e}; {q.shape[0] * keys.shape[0] / dt / 1e9:.2f} G pairs/s on {dev}")
EOF
    [ -f "$WORK/e_gpu.safetensors" ] || return 0
    "$PY" -m ganprint simmatrix "$WORK/e_gpu" -o "$WORK/s_gpu" --device "$DEV" -q >/dev/null \
        || echo "FAIL simmatrix-gpu: ganprint simmatrix --device "$DEV" failed"
}
run simmatrix-gpu check_sim

# --- train 20 steps with AMP ------------------------------------------------------------------
check_train() {
    local t0=$SECONDS
    "$PY" -m ganprint train "$WORK/data" --out "$WORK/train" --backbone "$BACKBONE" $WEIGHTS_OPT --device "$DEV" \
        --max-steps 20 --batch-size 8 --json -q >"$WORK/train.json" || return 1
    "$PY" - "$WORK/train.json" "$((SECONDS - t0))" <<'EOF'
import json, math, sys
s = json.load(open(sys.argv[1]))
ok = s["step"] == 20 and s["final_loss"] is not None and math.isfinite(s["final_loss"])
print(f"{'PASS' if ok else 'FAIL'} train-amp: {s['step']} steps, final loss {s['final_loss']}, "
      f"{s['step'] / max(s['seconds'], 1e-9):.2f} steps/s ({s['seconds']:.1f} s in training, {sys.argv[2]} s in all)")
EOF
}
run train-amp check_train

# --- torchrun with nccl on one GPU ------------------------------------------------------------
check_nccl() {
    cat >"$WORK/nccl.py" <<'EOF'
import torch
from ganprint.distributed import join, leave
import os
g = join(os.environ["DEV"])
parts = g.gather_rows(torch.arange(5, device=g.device).float(), dst=None)
want = "nccl" if g.device.type == "cuda" else "gloo"
ok = g.enabled and g.backend == want and parts[0].tolist() == [0, 1, 2, 3, 4]
print(f"{'OK' if ok else 'BAD'} backend={g.backend} device={g.device} world={g.world}")
leave(g)
EOF
    "$TORCHRUN" --standalone --nproc-per-node 1 "$WORK/nccl.py" >"$WORK/nccl.out" 2>&1 || { tail -1 "$WORK/nccl.out"; return 1; }
    grep -q '^OK' "$WORK/nccl.out" || { echo "FAIL torchrun-nccl: $(grep -E '^(OK|BAD)' "$WORK/nccl.out")"; return 0; }
    [ -f "$WORK/e_gpu.safetensors" ] || "$PY" -m ganprint embed "$WORK/data" -o "$WORK/e_gpu" -b "$BACKBONE" $WEIGHTS_OPT \
        --device "$DEV" -q >/dev/null || return 1
    "$TORCHRUN" --standalone --nproc-per-node 1 -m ganprint embed "$WORK/data" -o "$WORK/e_ddp" -b "$BACKBONE" $WEIGHTS_OPT \
        --device "$DEV" --json -q >"$WORK/e_ddp.json" || return 1
    "$TORCHRUN" --standalone --nproc-per-node 1 -m ganprint simmatrix "$WORK/e_ddp" -o "$WORK/s_ddp" --device "$DEV" -q \
        >/dev/null || return 1
    "$PY" - "$WORK" <<'EOF'
import json, sys
import torch
from ganprint.artifacts import read_artifact
w = sys.argv[1]
a, b = (read_artifact(f"{w}/{n}").tensor("embeddings") for n in ("e_gpu", "e_ddp"))
cos = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min())
s = read_artifact(f"{w}/s_ddp")
ok = a.shape == b.shape and cos >= 0.999 and s.tensor("real_topk_indices").shape[0] > 0
ips = json.load(open(f"{w}/e_ddp.json"))["images_per_s"]
print(f"{'PASS' if ok else 'FAIL'} torchrun-nccl: process group ok (see backend above); torchrun embed vs one process: min row "
      f"cosine {cos:.5f}; torchrun simmatrix wrote {s.tensor('real_topk_indices').shape[0]} rows; {ips:.1f} img/s")
EOF
}
run torchrun-nccl check_nccl

# --- fuse -------------------------------------------------------------------------------------
check_fuse() {
    [ -f "$WORK/e_gpu.safetensors" ] || "$PY" -m ganprint embed "$WORK/data" -o "$WORK/e_gpu" -b "$BACKBONE" $WEIGHTS_OPT \
        --device "$DEV" -q >/dev/null || return 1
    "$PY" -m ganprint embed "$WORK/data" -o "$WORK/e_res" -b test_resnet --weights none --device "$DEV" -q >/dev/null || return 1
    local t0=$SECONDS
    # `fuse moe A B` (subcommands) or `fuse --method moe A B` (one command), whichever this version has
    "$PY" -m ganprint fuse moe "$WORK/e_gpu" "$WORK/e_res" --out "$WORK/fused" --steps 20 --json -q >"$WORK/fuse.json" 2>"$WORK/fuse1.err" \
        || "$PY" -m ganprint fuse --method moe "$WORK/e_gpu" "$WORK/e_res" --out "$WORK/fused" --steps 20 --json -q \
            >"$WORK/fuse.json" || return 1
    "$PY" - "$WORK" "$((SECONDS - t0))" <<'EOF'
import sys
import torch
from ganprint.artifacts import read_artifact
z = read_artifact(f"{sys.argv[1]}/fused").tensor("embeddings")
ok = z.shape[0] > 0 and bool(torch.isfinite(z).all())
print(f"{'PASS' if ok else 'FAIL'} fuse: moe of 2 experts, 20 steps, fused [{z.shape[0]}, {z.shape[1]}] finite; "
      f"{sys.argv[2]} s (fuse runs on CPU: it has no CUDA path)")
EOF
}
run fuse check_fuse

exit $fails
