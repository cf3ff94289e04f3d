"""Reading positive pools from a similarity artifact (by tensor names of docs/ARTIFACTS.md)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ganprint.artifacts import base_provenance, sha256_bytes, write_artifact
from ganprint.contrastive.pools import pools_from_similarity_artifact
from ganprint.errors import GanprintError


def _emb_artifact(path, hashes, subsets):
    n = len(hashes)
    table = pd.DataFrame({"row": range(n), "image_id": [f"i{j}" for j in range(n)], "subset": subsets,
                          "sha256": hashes})
    prov = base_provenance("embeddings", "embed", rows=n, backbone="x", dim=4)
    return write_artifact(path, {"embeddings": torch.randn(n, 4)}, table, prov)


def _hashes(prefix, n):
    return [sha256_bytes(f"{prefix}{i}".encode()) for i in range(n)]


def test_pools_are_mapped_by_content_and_skip_non_members(tmp_path):
    gen_h, used_h, not_h = _hashes("g", 3), _hashes("u", 3), _hashes("n", 1)
    # the similarity run saw the images in another order, and real_not_used among its real rows
    src = _emb_artifact(tmp_path / "emb", [gen_h[2], gen_h[0], gen_h[1], used_h[1], not_h[0], used_h[0], used_h[2]],
                        ["generated"] * 3 + ["real_used", "real_not_used", "real_used", "real_used"])
    gen_rows = torch.tensor([0, 1, 2])        # sim row i -> manifest row
    real_rows = torch.tensor([3, 4, 5, 6])    # sim col j -> manifest row: used1, not0, used0, used2
    values = torch.tensor([[0.9, 0.8, 0.3, 0.1],   # gen2: cols 1 (not_used!) and 0 pass
                           [0.5, 0.4, 0.3, 0.2],   # gen0: nothing passes -> top-1 top-up
                           [0.95, 0.7, 0.65, 0.1]])
    indices = torch.tensor([[1, 0, 2, 3], [3, 2, 0, 1], [2, 3, 0, 1]])
    prov = base_provenance("similarity", "simmatrix", metric="cosine", k=4,
                           generated={"path": str(src)}, real={"path": str(src)})
    write_artifact(tmp_path / "sim", {"gen_topk_values": values, "gen_topk_indices": indices,
                                      "gen_rows": gen_rows, "real_rows": real_rows,
                                      "real_topk_values": torch.zeros(4, 1), "real_topk_indices": torch.zeros(4, 1).long()},
                   None, prov)
    pools, info = pools_from_similarity_artifact(str(tmp_path / "sim"), gen_h, used_h, 0.6, 1)
    # ours: gen0 <- sim row 1, gen1 <- sim row 2, gen2 <- sim row 0; used index = position in used_h
    assert pools[2].tolist() == [1]            # col 0 = used1 passes; col 1 (real_not_used) is skipped
    assert pools[0].tolist() == [2]            # top-up: col 3 = used2
    assert pools[1].tolist() == [0, 2, 1]      # cols 2, 3, 0 pass 0.6
    assert info["unmatched_generated"] == 0

    # with the full matrix stored, it is used instead of the top-k
    matrix = torch.tensor([[0.1, 0.2, 0.9, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    write_artifact(tmp_path / "simfull", {"gen_topk_values": values, "gen_topk_indices": indices,
                                          "gen_rows": gen_rows, "real_rows": real_rows, "matrix": matrix},
                   None, prov)
    pools, info = pools_from_similarity_artifact(str(tmp_path / "simfull"), gen_h, used_h, 0.6, 1)
    assert pools[2].tolist() == [0] and info["stored"] == "matrix"


def test_similarity_of_other_images_or_l2_is_refused(tmp_path):
    src = _emb_artifact(tmp_path / "emb", _hashes("other", 2), ["generated", "real_used"])
    base = {"gen_topk_values": torch.ones(1, 1), "gen_topk_indices": torch.zeros(1, 1).long(),
            "gen_rows": torch.tensor([0]), "real_rows": torch.tensor([1])}
    prov = base_provenance("similarity", "simmatrix", metric="cosine", generated={"path": str(src)},
                           real={"path": str(src)})
    write_artifact(tmp_path / "sim", base, None, prov)
    with pytest.raises(GanprintError, match="other images"):
        pools_from_similarity_artifact(str(tmp_path / "sim"), _hashes("g", 1), _hashes("u", 1), 0.6, 1)
    write_artifact(tmp_path / "l2", base, None, {**prov, "metric": "l2"})
    with pytest.raises(GanprintError, match="cosine"):
        pools_from_similarity_artifact(str(tmp_path / "l2"), _hashes("g", 1), _hashes("u", 1), 0.6, 1)


def test_train_with_a_simmatrix_artifact(tmp_path, imageclef_folder):
    """embed -> simmatrix -> train --similarity (skipped while ganprint.similarity is absent)."""
    sim = pytest.importorskip("ganprint.similarity")
    from ganprint.contrastive import run_training
    from ganprint.embed import run_embed

    emb = run_embed([str(imageclef_folder)], tmp_path / "emb", backbone="test_resnet", weights="none",
                    image_size=32, workers=0, progress=False)
    s = sim.run_simmatrix(tmp_path / "sim", dataset=emb.base, k=3)
    res = run_training({"data": str(imageclef_folder), "out": str(tmp_path / "run"), "similarity": str(s.base),
                        "backbone": "test_resnet", "weights": "none", "image_size": 32, "proj_hidden": 16,
                        "batch_size": 2, "max_steps": 1, "sim_threshold": 0.99, "min_pos_samples": 2,
                        "threads": 2})
    from ganprint.checkpoint import read_checkpoint_meta

    pools = read_checkpoint_meta(res.checkpoint)["pools"]
    assert pools["source"] == str(s.base) and pools["min"] >= 2 and pools["empty"] == 0
