"""Submission CSV: every rule its own error, checked before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from ganprint.submission import (
    SubmissionError,
    read_submission,
    render_submission,
    validate_submission,
    write_submission,
)

IDS = ["real_unknown_0001", "real_unknown_0002", "real_unknown_0003"]


def test_default_format_has_no_header_and_plain_ids(tmp_path):
    out = write_submission(tmp_path / "sub.csv", IDS, [1, 0, np.int64(1)], expected=IDS)
    assert out.read_bytes() == b"real_unknown_0001,1\nreal_unknown_0002,0\nreal_unknown_0003,1\n"
    assert read_submission(out, expected=IDS) == (IDS, [1, 0, 1])


def test_header_variant(tmp_path):
    out = write_submission(tmp_path / "sub.csv", ["a.png", "b.png"], [0, 1], header=True)
    assert out.read_text() == "original_image,label\na.png,0\nb.png,1\n"
    assert read_submission(out) == (["a.png", "b.png"], [0, 1])
    assert read_submission(out, header=True) == (["a.png", "b.png"], [0, 1])


@pytest.mark.parametrize("ids,labels,kw,rule", [
    ([], [], {}, "empty"),
    (["a", "b"], [1], {}, "length"),
    (["a", "b c"], [1, 0], {}, "bad_id"),
    (["a", "b,c"], [1, 0], {}, "bad_id"),
    (["a", ""], [1, 0], {}, "bad_id"),
    (["a.png", "b"], [1, 0], {}, "extension"),
    (["a", "B.DCM"], [1, 0], {}, "extension"),
    (["a", "a"], [1, 0], {}, "duplicate"),
    (["a", "b"], [1, 2], {}, "label"),
    (["a", "b"], [1, 1.0], {}, "label"),
    (["a", "b"], [1, "1"], {}, "label"),
    (["a", "b"], [1, True], {}, "label"),
    (["a", "b"], [1, 0], {"expected": ["a", "b", "c"]}, "missing"),
    (["a", "b", "z"], [1, 0, 1], {"expected": ["a", "b"]}, "unknown"),
])
def test_each_rule_is_a_distinct_error(tmp_path, ids, labels, kw, rule):
    path = tmp_path / "sub.csv"
    with pytest.raises(SubmissionError) as ei:
        write_submission(path, ids, labels, **kw)
    assert ei.value.rule == rule
    assert "\n" not in str(ei.value) and str(path) in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_extension_allowed_in_header_variant():
    assert validate_submission(["a.png"], [1], header=True) == [1]


@pytest.mark.parametrize("text,kw,rule", [
    ("", {}, "empty"),
    ("original_image,label\na,1\n", {"header": False}, "header"),
    ("a,1\nb,0\n", {"header": True}, "header"),
    ("a,1\n\nb,0\n", {}, "empty_line"),
    ("a,1,x\n", {}, "columns"),
    ("a\n", {}, "columns"),
    ("a,1\nb,1.0\n", {}, "label"),
    ("a,1\nb, 1\n", {}, "label"),
    ("a,1\na,0\n", {}, "duplicate"),
    ("a.png,1\n", {}, "extension"),
    ("a,1\n", {"expected": ["a", "b"]}, "missing"),
])
def test_reading_enforces_the_rules(tmp_path, text, kw, rule):
    p = tmp_path / "s.csv"
    p.write_text(text)
    with pytest.raises(SubmissionError) as ei:
        read_submission(p, **kw)
    assert ei.value.rule == rule


def test_crlf_and_missing_final_newline_are_read(tmp_path):
    p = tmp_path / "s.csv"
    p.write_bytes(b"a,1\r\nb,0")
    assert read_submission(p) == (["a", "b"], [1, 0])


def test_render_is_plain_lines():
    assert render_submission(["x", "y"], [0, 1]) == "x,0\ny,1\n"


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "sub.csv"
    write_submission(path, ["a"], [1])
    with pytest.raises(SubmissionError):
        write_submission(path, ["a", "a"], [1, 1])
    assert path.read_text() == "a,1\n"
