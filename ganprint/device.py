"""Device selection: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:i``, ``mps``."""

from __future__ import annotations

from ganprint.errors import GanprintError


def resolve_device(spec: str = "auto"):
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GanprintError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        try:
            dev = torch.device(spec)
        except RuntimeError:
            raise GanprintError(f"--device {spec}: not a valid device; use cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GanprintError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0..{torch.cuda.device_count() - 1}"
            )
        return dev
    if spec == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise GanprintError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise GanprintError(f"--device {spec}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def rank_device(spec: str, local_rank: int):
    """The device of one torchrun rank: ``cuda:LOCAL_RANK`` (mod the GPUs here) for auto/cuda where
    CUDA exists, the CPU for auto elsewhere, else ``spec`` as :func:`resolve_device` reads it."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if spec == "auto":
        return torch.device("cpu")
    return resolve_device(spec)


def autocast_context(device):
    """AMP on CUDA (bf16 where supported, else fp16); a no-op elsewhere (bf16 did not help on CPU)."""
    import contextlib

    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
