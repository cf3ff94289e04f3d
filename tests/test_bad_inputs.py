"""Hostile inputs through the CLI, one table row each: the exact one-line ``Error:``, the exit code,
and no output or temp file left behind (issue 15)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import random_gray, write_png
from test_data import bomb_png
from test_similarity import make_emb

from ganprint.cli.main import app

TINY_EMBED = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "-q"]
TEST_IDS = [f"real_unknown_{i:04d}" for i in range(1, 7)]
SUBSETS = ["generated"] * 6 + ["real_used"] * 3 + ["real_not_used"] * 3


def _images(tmp: Path) -> Path:
    folder = tmp / "imgs"
    for i in range(4):
        write_png(folder / f"img_{i}.png", random_gray(i, 24))
    return folder


def _truth(tmp: Path) -> Path:
    p = tmp / "truth.csv"
    p.write_text("".join(f"{i},{n % 2}\n" for n, i in enumerate(TEST_IDS)))
    return p


def _pred(tmp: Path, text: str | bytes) -> Path:
    p = tmp / "pred.csv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _good_lines() -> str:
    return "".join(f"{i},{n % 2}\n" for n, i in enumerate(TEST_IDS))


def _sim(tmp: Path, scale: float = 1.0) -> Path:
    from ganprint.similarity import run_simmatrix

    rng = np.random.default_rng(0)
    emb = make_emb(tmp / "emb", scale * rng.normal(size=(12, 4)), SUBSETS)
    return run_simmatrix(tmp / "sim", dataset=emb, k=3, device="cpu").base


def _nan_sim(tmp: Path) -> Path:
    """A well-formed similarity artifact (valid digest) whose similarities are NaN."""
    from ganprint.artifacts import read_artifact, write_artifact

    art = read_artifact(_sim(tmp))
    tensors = dict(art.tensors)
    for name in tensors:
        if tensors[name].is_floating_point():
            tensors[name] = tensors[name] * float("nan")
    prov = {k: v for k, v in art.provenance.items() if k not in ("pair_id", "digest_scheme")}
    return write_artifact(tmp / "nansim", tensors, art.table, prov)


def _full_disk(monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


_HELD: list = []  # locks a row holds (from another thread, as another run would) while its command runs


def _held_lock(base: Path) -> None:
    from test_artifacts import LockHolder

    _HELD.append(LockHolder(base))


# each row: (name, setup(tmp, out, monkeypatch) -> argv, the Error text it must contain)
def r_bom(t, o, m):
    return ["score", str(_pred(t, "\ufeff" + _good_lines())), "--truth", str(_truth(t))]


def r_header(t, o, m):
    return ["score", str(_pred(t, "original_image,label\n" + _good_lines())), "--truth", str(_truth(t))]


def r_float_label(t, o, m):
    return ["score", str(_pred(t, _good_lines().replace(",1\n", ",1.0\n", 1))), "--truth", str(_truth(t))]


def r_spaced_label(t, o, m):
    return ["score", str(_pred(t, _good_lines().replace(",1\n", ",2   \n", 1))), "--truth", str(_truth(t))]


def r_png_ids_after_normalisation(t, o, m):
    text = "original_image,label\n" + "".join(f"{i}.png,{n % 2}\n" for n, i in enumerate(TEST_IDS))
    text += f"{TEST_IDS[0]}.PNG,1\n"
    return ["score", str(_pred(t, text)), "--truth", str(_truth(t)), "--header"]


def r_max_fpr_nan(t, o, m):
    return ["score", str(_pred(t, _good_lines())), "--truth", str(_truth(t)), "--max-fpr", "nan"]


def r_max_fpr_2(t, o, m):
    return ["score", str(_pred(t, _good_lines())), "--truth", str(_truth(t)), "--max-fpr", "2"]


def r_fifo(t, o, m):
    f = _images(t)
    os.mkfifo(f / "pipe.png")
    return ["embed", str(f), "--out", str(o / "e"), *TINY_EMBED]


def r_dev_zero(t, o, m):
    f = _images(t)
    os.symlink("/dev/zero", f / "zero.png")
    return ["embed", str(f), "--out", str(o / "e"), *TINY_EMBED]


def r_link_loop(t, o, m):
    f = _images(t)
    os.symlink("loop.png", f / "loop.png")
    return ["embed", str(f), "--out", str(o / "e"), *TINY_EMBED]


def r_bomb(t, o, m):
    f = _images(t)
    (f / "bomb.png").write_bytes(bomb_png())
    return ["embed", str(f), "--out", str(o / "e"), *TINY_EMBED]


def r_full_disk_embed(t, o, m):
    _full_disk(m)
    return ["embed", str(_images(t)), "--out", str(o / "e"), *TINY_EMBED]


def r_full_disk_predict(t, o, m):
    sim = _sim(t)
    _full_disk(m)
    return ["predict", str(sim), "--out", str(o / "p"), "--balanced", "-q"]


def r_missing_submission_folder(t, o, m):
    return ["predict", str(_sim(t)), "--out", str(o / "p"), "--balanced", "--submission", str(o / "no" / "s.csv"), "-q"]


def r_second_writer(t, o, m):
    sim = _sim(t)
    _held_lock(o / "p")
    return ["predict", str(sim), "--out", str(o / "p"), "--balanced", "--no-csv", "-q"]


def r_eps_negative(t, o, m):
    return ["predict", str(_sim(t)), "--out", str(o / "p"), "--attack", "dist_ratio", "-p", "eps=-1", "--balanced", "-q"]


def r_param_nan(t, o, m):
    return ["predict", str(_sim(t)), "--out", str(o / "p"), "--attack", "monte_carlo", "-p", "quantile=nan",
            "--balanced", "-q"]


def r_nan_similarity(t, o, m):
    return ["predict", str(_nan_sim(t)), "--out", str(o / "p"), "--attack", "monte_carlo", "--balanced", "-q"]


def r_edited_provenance(t, o, m):
    from test_predict import _edit_provenance

    sim = _sim(t)
    _edit_provenance(sim, lambda prov: prov["real"].update(path=str(t / "elsewhere")))
    return ["predict", str(sim), "--out", str(o / "p"), "--attack", "domias", "--balanced", "-q"]


def r_l2_overflow(t, o, m):
    emb = make_emb(t / "emb", 1e20 * np.random.default_rng(0).normal(size=(12, 4)), SUBSETS)
    return ["simmatrix", str(emb), "--out", str(o / "s"), "--metric", "l2", "-q"]


def _train_cfg(t, text: bytes):
    from conftest import make_imageclef

    data = make_imageclef(t / "dev", (("generated", 2), ("real_used", 2)), size=16)
    cfg = t / "bad.toml"
    cfg.write_bytes(text)
    return data, cfg


def r_train_lr_nan(t, o, m):
    data, cfg = _train_cfg(t, b"lr = nan\n")
    return ["train", str(data), "--config", str(cfg), "--out", str(o / "run"), "-q"]


def r_train_epochs_inf(t, o, m):
    data, cfg = _train_cfg(t, b"epochs = inf\n")
    return ["train", str(data), "--config", str(cfg), "--out", str(o / "run"), "-q"]


def r_train_not_utf8(t, o, m):
    data, cfg = _train_cfg(t, b"# \xff\xfe\nlr = 0.1\n")
    return ["train", str(data), "--config", str(cfg), "--out", str(o / "run"), "-q"]


def r_train_unknown_backbone(t, o, m):
    data, cfg = _train_cfg(t, b'backbone = "resnet9000"\n')
    return ["train", str(data), "--config", str(cfg), "--out", str(o / "run"), "-q"]


ROWS = [
    (r_bom, "pred.csv: starts with a UTF-8 byte-order mark"),
    (r_header, "pred.csv: line 1 is a header line 'original_image,label'"),
    (r_float_label, "pred.csv: label '1.0' of 'real_unknown_0002' is not the integer 0 or 1"),
    (r_spaced_label, "pred.csv: label '2   ' of 'real_unknown_0002' is not the integer 0 or 1"),
    (r_png_ids_after_normalisation, "image ids 'real_unknown_0001.png' and 'real_unknown_0001.PNG' both name the image"),
    (r_max_fpr_nan, "--max-fpr nan: must be a false-positive rate strictly between 0 and 1"),
    (r_max_fpr_2, "--max-fpr 2.0: must be a false-positive rate strictly between 0 and 1"),
    (r_fifo, "pipe.png: not a regular file (a FIFO (named pipe)); only image files are read"),
    (r_dev_zero, "zero.png: not a regular file (a device)"),
    (r_link_loop, "loop.png: symbolic link loop (the link points back to itself)"),
    (r_bomb, "bomb.png: claims more pixels than the decompression-bomb limit"),
    (r_full_disk_embed, "e: cannot write artifact (No space left on device); choose another --out"),
    (r_full_disk_predict, "p: cannot write artifact (No space left on device); choose another --out"),
    (r_missing_submission_folder, "no: folder does not exist; create it or choose another --submission"),
    (r_second_writer, "p: another ganprint process"),
    (r_eps_negative, "--param eps=-1.0: must be a small positive number"),
    (r_param_nan, "--param quantile=nan: must be a finite number"),
    (r_nan_similarity, "nansim.safetensors: holds NaN similarities"),
    (r_edited_provenance, "sim.safetensors: tensor data or provenance does not match its digest (corrupt or edited?)"),
    (r_l2_overflow, "embeddings too large for --metric l2"),
    (r_train_lr_nan, "bad.toml: lr = nan must be a finite number"),
    (r_train_epochs_inf, "bad.toml: epochs = inf must be a finite number"),
    (r_train_not_utf8, "bad.toml: is not UTF-8 text"),
    (r_train_unknown_backbone, "bad.toml: backbone = 'resnet9000' is not a known backbone"),
]


# rows whose command used to hang (a blocked open() in a worker thread): run in a child process
# with a timeout, so a regression fails the row instead of hanging the suite
IN_CHILD = {r_fifo, r_dev_zero, r_link_loop, r_bomb}


@pytest.mark.parametrize("setup,needle", ROWS, ids=[r[0].__name__[2:] for r in ROWS])
def test_bad_input_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch, setup, needle):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    argv = setup(inputs, out, monkeypatch)
    if setup in IN_CHILD:
        from test_data import run_cli

        r = run_cli(argv)
        code, stderr, stdout, exc = r.returncode, r.stderr, r.stdout, None
    else:
        def _timeout(signum, frame):
            raise TimeoutError("command hung")

        old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(120)
        try:
            res = CliRunner().invoke(app, argv)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            while _HELD:
                _HELD.pop().close()
        code, stderr, stdout, exc = res.exit_code, res.stderr, res.stdout, res.exception
    assert code == 2, (code, stderr, exc)
    assert stderr.startswith("Error: ") and stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert needle in stderr, stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    left = sorted(p.name for p in out.rglob("*"))
    assert left == [], left  # no output, no temp file, no lock, no empty folder
    assert not [p for p in inputs.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]


def test_tiny_image_embeds_with_a_warning(tmp_path):
    folder = _images(tmp_path)
    write_png(folder / "dot.png", np.zeros((1, 1), np.uint8))
    res = CliRunner().invoke(app, ["embed", str(folder), "--out", str(tmp_path / "e"), "--backbone", "test_resnet",
                                   "--image-size", "32", "--workers", "0", "-q"])
    assert res.exit_code == 0, res.stderr
    assert "1 image(s) are smaller than 8 px on a side" in res.stderr and "dot.png" in res.stderr


def test_a_library_stage_that_fails_leaves_no_lock(tmp_path):
    from ganprint.embed import run_embed
    from ganprint.errors import BadImageError

    folder = _images(tmp_path)
    (folder / "notes.txt").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadImageError):
        run_embed([str(folder)], out / "e", backbone="test_resnet", image_size=32, workers=0, progress=False)
    assert list(out.iterdir()) == []
    run_embed([str(folder / "img_0.png")], out / "e", backbone="test_resnet", image_size=32, workers=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["e.parquet", "e.safetensors"]
