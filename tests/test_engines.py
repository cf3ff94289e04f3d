"""simmatrix's engine registry; the faiss-ivf engine's recall, measured and stored."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ganprint.artifacts import artifact_paths, read_artifact
from ganprint.cli.main import app
from ganprint.distributed import Group
from ganprint.errors import GanprintError
from ganprint.similarity import (
    ENGINES,
    Engine,
    compute_similarity,
    get_engine,
    register_engine,
    run_simmatrix,
    topk_search,
)
from test_distributed import _random_embeddings

faiss = pytest.importorskip("faiss")


def clustered(n, d, centres, seed):
    """Unit vectors around ``centres`` [c, d]: the structure an inverted file exploits."""
    g = torch.Generator().manual_seed(seed)
    c = centres[torch.randint(0, len(centres), (n,), generator=g)]
    return torch.nn.functional.normalize(c + 0.06 * torch.randn(n, d, generator=g), dim=1)


def test_registry_validates_and_resolves():
    assert list(ENGINES)[:3] == ["exact", "faiss", "faiss-ivf"]
    assert get_engine("torch") is ENGINES["exact"]  # the old name still works
    assert ENGINES["exact"].exact and ENGINES["faiss"].exact and not ENGINES["faiss-ivf"].exact
    with pytest.raises(GanprintError, match="unknown; use one of exact, faiss, faiss-ivf"):
        get_engine("hnsw")
    with pytest.raises(ValueError, match="already registered"):
        register_engine(Engine("exact", lambda *a, **k: None, True, ""))
    with pytest.raises(ValueError, match="already registered"):
        register_engine(Engine("torch", lambda *a, **k: None, True, ""))
    with pytest.raises(ValueError, match="not callable"):
        register_engine(Engine("new-one", None, True, ""))
    with pytest.raises(ValueError, match="not a valid engine"):
        register_engine(Engine("bad name!", lambda *a, **k: None, True, ""))
    assert "new-one" not in ENGINES


def test_faiss_ivf_recall_is_measured_honestly():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1)
    gen, real = clustered(8000, 32, centres, 1), clustered(1600, 32, centres, 2)
    info: dict = {}
    t = compute_similarity(gen, real, k=10, engine="faiss-ivf", full=False, realref=False, info=info)
    exact, _, _ = topk_search(real, gen, 10)
    hits = [len(set(a.tolist()) & set(e.tolist())) / 10 for a, e in zip(t["real_topk_indices"], exact.indices)]
    true_recall = sum(hits) / len(hits)
    meta = info["real_topk"]
    assert meta["recall_target"] == 0.99 and meta["recall_sample"] == 1024 and meta["calibration_sample"] == 512
    assert meta["recall_at_k"] >= 0.98 and true_recall >= 0.98
    assert abs(meta["recall_at_k"] - true_recall) < 0.02  # the held-out estimate tracks the whole set
    assert 1 <= meta["nprobe"] < meta["nlist"]  # fewer lists than all: an approximate, cheaper search
    # the neighbours found carry exact scores
    found = t["real_topk_indices"]
    exact_scores = (torch.nn.functional.normalize(real, dim=1).unsqueeze(1)
                    * torch.nn.functional.normalize(gen, dim=1)[found]).sum(-1)
    assert torch.allclose(t["real_topk_values"], exact_scores, atol=1e-5)
    assert "gen_topk" in info and t["gen_topk_indices"].shape == (8000, 10)
    # a lower target probes fewer lists
    low: dict = {}
    from ganprint.similarity import _faiss_ivf_search, _prepare

    _faiss_ivf_search(_prepare(real, "cosine"), _prepare(gen, "cosine"), 10, info=low, recall=0.5)
    assert low["queries"]["nprobe"] < meta["nprobe"]


def test_cli_engine_faiss_ivf_provenance_and_errors(tmp_path):
    emb = _random_embeddings(tmp_path / "emb", 400, 40)
    runner = CliRunner()
    res = runner.invoke(app, ["simmatrix", str(emb), "-o", str(tmp_path / "ivf"), "--engine", "faiss-ivf", "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    prov = read_artifact(tmp_path / "ivf").provenance
    assert out["engine"] == prov["engine"] == "faiss-ivf" and prov["engine_exact"] is False
    assert set(prov["engine_info"]) == {"real_topk", "gen_topk", "realref_topk"}
    assert 0.0 <= prov["engine_info"]["real_topk"]["recall_at_k"] <= 1.0
    res = runner.invoke(app, ["simmatrix", str(emb), "-o", str(tmp_path / "t"), "--engine", "torch", "-q"])
    assert res.exit_code == 0 and read_artifact(tmp_path / "t").provenance["engine"] == "exact"
    res = runner.invoke(app, ["simmatrix", str(emb), "-o", str(tmp_path / "x"), "--engine", "annoy"])
    assert res.exit_code == 2 and res.stderr.startswith("Error: --engine annoy: unknown")
    assert len(res.stderr.strip().splitlines()) == 1
    assert not any(p.exists() for p in artifact_paths(tmp_path / "x"))


def test_approximate_engine_refused_under_torchrun(tmp_path):
    emb = _random_embeddings(tmp_path / "emb", 50, 10)
    fake = Group(rank=0, world=2, device=torch.device("cpu"), enabled=True)  # refused before any collective
    with pytest.raises(GanprintError, match="runs in one process"):
        run_simmatrix(tmp_path / "s", emb, engine="faiss-ivf", group=fake)
