"""Fine-tuning checkpoints (``ganprint train``): one safetensors file, no pickle.

Tensors (all CPU):

- ``online.<name>``    the online encoder's state dict (``backbone.*``, ``head.*``);
- ``momentum.<name>``  the momentum (key) encoder's state dict;
- ``optim.<i>.<key>``  AdamW state of parameter i (``exp_avg``, ``exp_avg_sq``, ``step``);
  param_groups (hyper-parameters, parameter order) are in the metadata JSON;
- ``queue.keys`` [K, D], ``queue.ids`` [K] (-1 = empty slot), ``queue.ptr`` [] int64;
- ``state.step`` [] int64 (completed optimizer steps);
- ``rng.torch_cpu`` uint8 (rank 0's CPU generator state; each step also re-seeds from
  (seed, step, rank), which is what makes --resume bit-exact).

Metadata ``ganprint`` (JSON): ``kind`` "checkpoint", ``backbone``, ``timm_name``, ``weights`` /
``weights_source`` / ``weights_digest`` of the *starting* weights, ``preprocess``,
``image_size``, ``head`` (in_dim, hidden, out_dim, layers), ``dim`` (embedding size), ``config``
(resolved), ``digest`` (sha256 of the online encoder's weights: the model's identity),
``step``, ``world_size``, ``rank_digests``, ``optimizer``, ``data`` and ``pools`` summaries.

:func:`ganprint.contrastive.restore.apply_checkpoint` (beside the model it rebuilds) turns a
checkpoint into the embedder ``embed --checkpoint`` runs; this module only stores and reads,
so it imports nothing from the stages above it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ganprint.artifacts import atomic_path
from ganprint.errors import GanprintError

META_KEY = "ganprint"
FORMAT = 1


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors, in sorted name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(module) -> str:
    """Identity of a model: digest of its state dict."""
    return tensors_digest(module.state_dict())


def prefixed(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    # clone: safetensors refuses tensors that share storage
    return {f"{prefix}{k}": v.detach().cpu().clone().contiguous() for k, v in state.items()}


def unprefixed(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(opt) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flatten an optimizer state dict into tensors ``optim.<i>.<key>`` + JSON metadata."""
    import torch

    sd = opt.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write atomically (temp file in the same folder, then rename)."""
    from ganprint.artifacts import save_safetensors

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p, "checkpoint", "choose another --out") as tmp:
        save_safetensors(tensors, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)})
    return p


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON only (reads the header, not the tensors)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise GanprintError(f"{p}: checkpoint not found; pass the checkpoint.safetensors written by `ganprint train`")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise GanprintError(f"{p}: not a safetensors file ({exc}); pass a checkpoint written by `ganprint train`") from exc
    if META_KEY not in meta:
        raise GanprintError(f"{p}: no ganprint metadata; pass a checkpoint written by `ganprint train`")
    prov = json.loads(meta[META_KEY])
    if prov.get("kind") != "checkpoint":
        raise GanprintError(f"{p}: is a '{prov.get('kind')}' file, not a training checkpoint; pass checkpoint.safetensors")
    return prov


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metadata)."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise GanprintError(f"{path}: cannot read checkpoint tensors ({exc}); the file is damaged, re-run train") from exc
    return tensors, meta


def verify_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metadata) after checking the online encoder's weights against the recorded ``digest``."""
    tensors, meta = read_checkpoint(path)
    if meta.get("digest") and tensors_digest(unprefixed(tensors, "online.")) != meta["digest"]:
        raise GanprintError(f"{path}: weights do not match the digest recorded at training (damaged file?); re-run train")
    return tensors, meta


def checkpoint_load_args(path: str | os.PathLike, backbone: str, weights: str | None,
                         image_size: int | None) -> tuple[str | None, int | None]:
    """Defaults for loading the backbone a checkpoint goes into: its weights are replaced by the
    checkpoint's, so none need fetching (``weights`` defaults to ``none``), and the image size
    defaults to the one it was trained at.  Refuses a checkpoint of another backbone early."""
    meta = read_checkpoint_meta(path)
    if meta.get("backbone") != backbone:
        raise GanprintError(f"{path}: checkpoint was trained from backbone '{meta.get('backbone')}', not "
                            f"'{backbone}'; pass --backbone {meta.get('backbone')}")
    size = image_size if image_size is not None else meta.get("image_size")
    return (weights if weights is not None else "none"), size
