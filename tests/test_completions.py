"""The shipped completion scripts match what the app generates now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_completions_are_fresh():
    r = subprocess.run([sys.executable, str(ROOT / "completions" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("ganprint.bash", "_ganprint.zsh", "ganprint.fish"):
        text = (ROOT / "completions" / name).read_text()
        assert "_GANPRINT_COMPLETE" in text
