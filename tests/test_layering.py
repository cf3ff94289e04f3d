"""Infrastructure modules import nothing from the stages above them (issue 15: checkpoint.py used
to reach up into contrastive/heads.py to rebuild the fine-tuned model)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ganprint"
# bottom layer -> package prefixes it must not import (the stages and the CLI above it)
ABOVE = ("ganprint.contrastive", "ganprint.fusion", "ganprint.cli", "ganprint.embed", "ganprint.similarity",
         "ganprint.predict", "ganprint.attacks", "ganprint.demo")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("module", ["checkpoint.py", "artifacts.py", "errors.py", "submission.py", "data.py"])
def test_infrastructure_does_not_reach_up(module):
    bad = sorted(n for n in _imports(PKG / module) if n.startswith(ABOVE))
    assert bad == [], f"{module} imports {bad}"


def test_checkpoint_restore_lives_beside_the_model():
    from ganprint.contrastive import restore

    assert "ganprint.contrastive.heads" in _imports(PKG / "contrastive" / "restore.py")
    assert callable(restore.apply_checkpoint)
