"""Restore a fine-tuning checkpoint into the model it was trained as (backbone + projection head).

Lives beside :mod:`ganprint.contrastive.heads` (the model it rebuilds); :mod:`ganprint.checkpoint`
below it only stores and reads the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ganprint.checkpoint import model_digest, read_checkpoint, read_checkpoint_meta, unprefixed
from ganprint.errors import GanprintError


def build_encoder(loaded, head_cfg: Mapping[str, int]):
    """ContrastiveEncoder around ``loaded.model`` with a fresh head of ``head_cfg``."""
    from ganprint.contrastive.heads import ContrastiveEncoder, ProjectionHead

    head = ProjectionHead(int(head_cfg["in_dim"]), int(head_cfg["hidden"]), int(head_cfg["out_dim"]),
                          int(head_cfg["layers"]))
    return ContrastiveEncoder(loaded.model, head)


def apply_checkpoint(loaded, path: str | os.PathLike):
    """Load a training checkpoint into ``loaded`` (a :class:`ganprint.backbones.LoadedBackbone`).

    Returns ``(model, provenance)``: ``model`` maps [B, C, H, W] -> [B, dim] L2-normalised
    (backbone + projection head, eval mode, no gradients); ``provenance`` holds ``digest``,
    ``dim``, ``path``, ``backbone``, ``step``, the starting weights and the training config
    digest.  ``loaded``'s weights fields are updated to describe the weights now in use
    (its ``model`` *is* the fine-tuned backbone afterwards)."""
    import torch

    from ganprint.artifacts import digest_json
    from ganprint.contrastive.heads import EmbeddingModel

    p = Path(path).expanduser().resolve()
    meta = read_checkpoint_meta(p)
    if meta.get("backbone") != loaded.spec.name:
        raise GanprintError(f"{p}: checkpoint was trained from backbone '{meta.get('backbone')}', not "
                            f"'{loaded.spec.name}'; pass --backbone {meta.get('backbone')}")
    want = (meta.get("preprocess") or {}).get("size")
    if want is not None and int(want) != loaded.preprocess.size:
        raise GanprintError(f"{p}: checkpoint was trained at {want} px, the backbone is loaded at "
                            f"{loaded.preprocess.size} px; pass --image-size {want}")
    head_cfg = meta.get("head") or {}
    if int(head_cfg.get("in_dim", -1)) != loaded.dim:
        raise GanprintError(f"{p}: head expects {head_cfg.get('in_dim')}-dim features but '{loaded.spec.name}' gives "
                            f"{loaded.dim}; the checkpoint does not fit this backbone build")
    tensors, _ = read_checkpoint(p)
    state = unprefixed(tensors, "online.")
    encoder = build_encoder(loaded, head_cfg)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GanprintError(f"{p}: weights do not fit backbone '{loaded.spec.name}' ({str(exc).splitlines()[0]}); "
                            "pass the --backbone it was trained from") from None
    digest = model_digest(encoder)
    if meta.get("digest") and digest != meta["digest"]:
        raise GanprintError(f"{p}: weights do not match the digest recorded at training (damaged file?); re-run train")
    for prm in encoder.parameters():
        prm.requires_grad_(False)
    model = EmbeddingModel(encoder).eval()
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, len(loaded.preprocess.mean), loaded.preprocess.size,
                                    loaded.preprocess.size)).shape[1])
    prov = {
        "digest": digest,
        "dim": dim,
        "path": str(p),
        "backbone": meta.get("backbone"),
        "step": meta.get("step"),
        "start_weights": meta.get("weights"),
        "start_weights_digest": meta.get("weights_digest"),
        "config_digest": digest_json(meta.get("config", {})),
    }
    from ganprint.backbones import state_digest

    loaded.weights_source = f"checkpoint:{p.name}@{digest[:16]}"
    loaded.weights_digest = state_digest(loaded.model)
    return model, prov
