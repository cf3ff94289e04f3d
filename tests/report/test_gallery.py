"""Evidence gallery: a rotated + shifted copy is verified, its transform recovered, and the
difference image is taken after alignment."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("cv2")
pytest.importorskip("ganprint.verify")


def _copy_pair(tmp_path, angle=6.0, shift=(5, -4)):
    import cv2
    from PIL import Image

    from ganprint.synth.phantoms import make_patient, render_slice

    rng = np.random.default_rng(0)
    real = render_slice(make_patient(rng), 0.5, 256, rng)  # a CT-like phantom slice
    m = cv2.getRotationMatrix2D((128, 128), angle, 1.0)
    m[:, 2] += shift
    gen = cv2.warpAffine(real, m, (256, 256), borderMode=cv2.BORDER_REFLECT)
    rp, gp = tmp_path / "real_0.png", tmp_path / "gen_0.png"
    Image.fromarray(real).save(rp)
    Image.fromarray(gen).save(gp)
    return rp, gp


def test_gallery_recovers_the_transform_and_aligns(tmp_path):
    from ganprint.report.gallery import _align, _thumb, build_gallery
    from ganprint.report.render import _transform_text

    rp, gp = _copy_pair(tmp_path)
    df = pd.DataFrame({"image_id": ["real_0"], "role": ["unknown"], "split": ["dev"], "label": pd.array([None], "Int8"),
                       "score": [1.0], "p_value": [0.01], "q_value": [0.01], "flag": [True]})
    tab = pd.DataFrame({"path": [str(rp)]})
    cards = build_gallery(tmp_path / "g", df, tab, {"generated": [str(gp)]}, np.array([[0, -1, -1]]),
                          np.array([[0.9, np.nan, np.nan]]), n=3, verify_kind="sift")
    (m,) = cards[0]["matches"]
    assert m["inliers"] >= 30 and m["aligned"]
    a, b, tx, c, d, ty = m["transform"]
    assert abs(math.degrees(math.atan2(-c, a)) - 6.0) < 1.0  # the rotation that made the copy
    assert abs(math.hypot(a, c) - 1.0) < 0.03
    assert "verified fit: rotation +6." in _transform_text(m) or "rotation +5.9" in _transform_text(m)
    al = m["alignment"]
    a2, _, _, c2, _, _ = al["warp"]
    assert abs(math.degrees(math.atan2(-c2, a2)) - 6.0) < 1.0 and al["ecc"] > 0.9
    real, gen = _thumb(str(rp)), _thumb(str(gp))
    aligned = _align(gen, np.array(al["warp"]).reshape(2, 3), al["frame"])
    inner = (slice(20, -20), slice(20, -20))  # away from the border the warp had to invent
    assert np.abs(real - aligned)[inner].mean() < 0.4 * np.abs(real - gen)[inner].mean()
    assert (tmp_path / "g" / m["diff"]).is_file() and (tmp_path / "g" / cards[0]["real"]).is_file()


def test_gallery_without_verification_says_unaligned(tmp_path):
    from ganprint.report.gallery import build_gallery
    from ganprint.report.render import _transform_text

    rp, gp = _copy_pair(tmp_path)
    df = pd.DataFrame({"image_id": ["real_0"], "role": ["unknown"], "split": ["dev"], "label": pd.array([None], "Int8"),
                       "score": [1.0], "p_value": [0.5], "q_value": [0.5], "flag": [False]})
    cards = build_gallery(tmp_path / "g", df, pd.DataFrame({"path": [str(rp)]}), {"generated": [str(gp)]},
                          np.array([[0, -1, -1]]), np.array([[0.9, np.nan, np.nan]]), n=3)
    (m,) = cards[0]["matches"]
    assert m["inliers"] is None and not m["aligned"]
    assert "unaligned" in _transform_text(m)
