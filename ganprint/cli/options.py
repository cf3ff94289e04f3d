"""Shared CLI helpers: error mapping, JSON output, common options. No heavy imports here."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a one-line ``Error:`` on stderr and return the Exit to raise."""
    from ganprint.errors import one_line

    print(f"Error: {one_line(message)}", file=sys.stderr)
    return typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn GanprintError (and a few OS errors) into ``Error: ...`` + exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ganprint.errors import GanprintError

        try:
            return fn(*args, **kwargs)
        except GanprintError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        finally:
            artifacts = sys.modules.get("ganprint.artifacts")
            if artifacts is not None:  # outputs claimed by a stage that stopped before writing them
                artifacts.release_output_locks()

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def complete_backbone(incomplete: str) -> list[str]:
    from ganprint.backbones import backbone_names

    return [n for n in backbone_names() if n.startswith(incomplete)]


DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
WEIGHTS_HELP = "imagenet, none (seeded random init) or PATH to a local .safetensors file"


def parse_fraction(value: str) -> float | None:
    """--null-fraction: ``auto`` (None) or a number (its range is checked by ganprint.conformal)."""
    from ganprint.errors import GanprintError

    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise GanprintError(f"--null-fraction {value}: not a number; use a share in [0, 1), e.g. 0.5, or auto") from None
