"""report.html in a real headless browser (Debian's chromium): every gallery image decodes and the
verdict is shown. Skipped, with the reason, only where no chromium binary exists (`.ci/run`
installs it with apt-get)."""

from __future__ import annotations

import html as H
import json
import re
import shutil
import subprocess

import pytest

from audit_data import make_audit_folders
from ganprint.audit import AuditOptions, resolve_inputs, run_audit

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.querySelectorAll('img'));
  var gal = Array.from(document.querySelectorAll('#gallery img'));
  var out = {n_img: imgs.length, n_gallery: gal.length,
             undecoded: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
             verdict: (document.getElementById('verdict') || {}).textContent || null};
  var pre = document.createElement('pre'); pre.id = 'browser-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def dump_dom(browser: str, page, tmp_path) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    f = make_audit_folders(tmp / "d", n_known=10, n_unknown=6, n_generated=24, size=24)
    inp = resolve_inputs(generated=f["generated"], members=f["members"], non_members=f["non_members"],
                         unknown=f["unknown"])
    return run_audit(tmp / "run", inp, AuditOptions(backbones=("pixels",), bootstrap=20, repeats=1, folds=3,
                                                    gallery=4), progress=False).run


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium binary on PATH (install Debian's chromium: apt-get install -y chromium)")
    report = json.loads((run_dir / "report.json").read_text())
    page = tmp_path / "report_check.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", CHECK_JS + "</body>"))
    dom = dump_dom(browser, page, tmp_path)
    m = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert m, "the check script did not run in the browser"
    res = json.loads(H.unescape(m.group(1)))
    n_cards = len(report["gallery"])
    n_matches = sum(len(c["matches"]) for c in report["gallery"])
    assert n_cards == 4 and res["n_gallery"] == n_cards + 2 * n_matches  # real + (generated, difference) each
    assert res["n_img"] == res["n_gallery"] + 3  # + ROC, score and p-value figures
    assert res["undecoded"] == []
    assert res["verdict"].strip() == report["verdict"]


def test_report_is_self_contained(run_dir):
    text = (run_dir / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:)?//', text)
