"""The audit report: figures (matplotlib PNGs), the evidence gallery and one self-contained HTML file.

``render_run(RUN, report)`` (re)draws every figure from ``RUN/scores.parquet``, writes
``RUN/report.json`` and ``RUN/report.html``; ``render_report(RUN)`` does it from the run's own
artifacts (``ganprint report RUN/``).
"""

from ganprint.report.gallery import build_gallery
from ganprint.report.render import render_report, render_run

__all__ = ["build_gallery", "render_report", "render_run"]
