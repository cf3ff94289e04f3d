"""``ganprint demo``: runnable showcases on data that ships with the dependencies.

``dicom_neighbours``: embed real CT/MR/X-ray DICOM files bundled by pydicom-data, plus a
horizontally flipped copy of each, with the offline ImageNet backbone; each original's nearest
neighbour should be its own flip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ganprint.errors import GanprintError

DICOM_DEMO_FILES = (
    "693_UNCI.dcm", "MR2_UNCI.dcm", "RG1_UNCI.dcm", "RG3_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "JPEG2000_UNC.dcm", "vlut_04.dcm", "CT_small.dcm",
)


def pydicom_data_dir() -> Path:
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        raise GanprintError("the demo needs the package pydicom-data; pip install pydicom-data")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def dicom_neighbours(out: Path, backbone: str = "efficientnet_lite0", progress: bool = True) -> list[dict]:
    """Write originals + flips as DICOM under ``out/dicom``, embed, and return one row per original:
    ``{image, modality, nearest, cosine, flip_rank}`` (flip_rank 1 = its flip is the nearest)."""
    import numpy as np
    import pydicom
    import pydicom.data
    import torch

    from ganprint.artifacts import read_artifact
    from ganprint.embed import run_embed

    src = pydicom_data_dir()
    folder = out / "dicom"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)  # the demo's own folder: stale files would join the embedding
    folder.mkdir(parents=True)
    modality = {}
    for name in DICOM_DEMO_FILES:
        f = src / name
        if not f.exists():
            f = Path(pydicom.data.get_testdata_file(name, download=False) or "")
        if not f.is_file():
            continue
        ds = pydicom.dcmread(f)
        modality[f.stem] = str(ds.get("Modality", "?"))
        (folder / f.name).write_bytes(f.read_bytes())
        arr = ds.pixel_array
        ds.PixelData = np.ascontiguousarray(arr[..., ::-1]).tobytes()
        ds.save_as(folder / f"{f.stem}_flip.dcm")
    res = run_embed([str(folder)], out / "dicom_emb", backbone=backbone, progress=progress)
    art = read_artifact(res.base)
    x = torch.nn.functional.normalize(art.tensor("embeddings"), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-2.0)
    ids = list(art.table.image_id)
    rows = []
    for i, name in enumerate(ids):
        if name.endswith("_flip"):
            continue
        j = int(sim[i].argmax())
        order = sim[i].argsort(descending=True).tolist()
        rows.append({
            "image": name, "modality": modality.get(name, "?"), "nearest": ids[j],
            "cosine": round(float(sim[i, j]), 4), "flip_rank": order.index(ids.index(name + "_flip")) + 1,
        })
    return rows
