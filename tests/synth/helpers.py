"""Shared by the synth tests: the CLI runner and per-file digests of a synth output."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from ganprint.cli.main import app


def run_cli(*args: str):
    return CliRunner().invoke(app, ["synth", *args])


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but synth.json (its timings differ between runs)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synth.json"}
