"""Self-describing artifacts: tensors in safetensors, tables in parquet, shared provenance.

An artifact is addressed by a *base* path ``X`` and stored as two files:

- ``X.safetensors``: named tensors (e.g. ``embeddings`` float32 [N, D]); the provenance JSON
  is in the safetensors metadata under ``ganprint``.
- ``X.parquet``: a table (e.g. the manifest, row i describes tensor row i); the same provenance
  JSON is in the parquet schema metadata under ``ganprint``.

Both files carry ``pair_id``, a digest of the tensor bytes, so a reader refuses a parquet file
that belongs to another tensor file.  Writes are atomic: both files are written to temporary
names in the destination folder and renamed only when both are complete, so a failure never
leaves a half-written artifact behind.

Provenance (a JSON object) always holds ``ganprint_version``, ``kind`` and ``stage``; stages add
what they know (backbone, weights digest, preprocessing, inputs' content hash, seed, ...).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ganprint import __version__
from ganprint.errors import ArtifactError

META_KEY = "ganprint"
TENSOR_SUFFIX = ".safetensors"
TABLE_SUFFIX = ".parquet"
_KNOWN_SUFFIXES = (TENSOR_SUFFIX, TABLE_SUFFIX)


def artifact_base(path: str | os.PathLike) -> Path:
    """``emb``, ``emb.safetensors`` and ``emb.parquet`` all name the artifact ``emb``."""
    p = Path(path)
    if p.suffix in _KNOWN_SUFFIXES:
        return p.with_suffix("")
    return p


def artifact_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = artifact_base(path)
    return Path(str(base) + TENSOR_SUFFIX), Path(str(base) + TABLE_SUFFIX)


def resolve_artifact_arg(arg: str, stdin=None) -> Path:
    """Turn a CLI argument into an artifact base; ``-`` reads one path from stdin.

    Stages print the base path of what they wrote on stdout, so
    ``ganprint embed ... | ganprint simmatrix - ...`` chains.
    """
    if arg == "-":
        stream = stdin if stdin is not None else sys.stdin
        lines = [ln.strip() for ln in stream.read().splitlines() if ln.strip()]
        if not lines:
            raise ArtifactError("stdin: expected an artifact path, got nothing; pipe the output of a ganprint stage")
        arg = lines[-1]
    return artifact_base(arg)


def ensure_writable(path: str | os.PathLike, claim: bool = True) -> None:
    """Fail early (before any work) when the artifact's folder can't take new files, or when
    another process is writing the same output; ``claim`` then locks the output until this
    process writes it (:func:`claim_output`).

    Probes with a real temporary file: ``os.access`` says yes to root even on read-only mounts.
    """
    tpath, _ = artifact_paths(path)
    folder = tpath.parent
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder}: is a file, not a folder; choose another --out")
    if not folder.exists():
        raise ArtifactError(f"{folder}: output folder does not exist; create it or choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ganprint-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ArtifactError(f"{folder}: output folder is not writable ({exc.strerror}); choose another --out") from exc
    if claim:
        claim_output(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a temp file (``mkstemp``: always 0600) the mode a plain ``open()`` would: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~_umask())


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temp files (``.NAME.XXXXXXXX.tmp``, as ``mkstemp`` names them) that a killed
    writer of ``path`` left behind.  Call only while holding :func:`output_lock` on ``path``."""
    import re

    p = Path(path)
    pattern = re.compile(re.escape(f".{p.name}.") + r"[a-z0-9_]{8}\.tmp")
    removed = []
    try:
        names = os.listdir(p.parent)
    except OSError:
        return removed
    for name in names:
        if pattern.fullmatch(name):
            try:
                os.unlink(p.parent / name)
                removed.append(name)
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file", fix: str = "choose another path"):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, otherwise delete it.

    ``with atomic_path(p, "checkpoint", "choose another --out") as tmp: save_file(..., tmp)`` leaves
    either the complete new file or nothing; an OSError becomes a one-line ArtifactError.  The
    write holds :func:`output_lock` on ``path`` and first removes temp files of killed writers."""
    p = Path(path)
    with output_lock(p, "path"):
        remove_stale_temps(p)
        with _atomic_path(p, what, fix) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_path(p: Path, what: str, fix: str):
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
        yield tmp
        follow_umask(tmp)
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise ArtifactError(f"{p}: cannot write {what} ({exc.strerror or exc}); {fix}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its write errors turned into ``OSError`` (errno and
    text kept: ``No space left on device``) so every writer reports them like any other I/O error."""
    import re

    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    except OSError:
        raise
    except Exception as exc:  # SafetensorError("Error while serializing: I/O error: ... (os error 28)")
        if type(exc).__name__ != "SafetensorError":
            raise
        m = re.search(r"os error (\d+)|code:\s*(\d+)", str(exc))
        if m:
            code = int(m.group(1) or m.group(2))
            raise OSError(code, os.strerror(code)) from exc
        raise OSError(errno.EIO, f"safetensors could not write the file: {exc}") from exc


def lock_path(path: str | os.PathLike) -> Path:
    base = artifact_base(path)
    return base.parent / f".{base.name}.lock"


# output locks held by this process: lock path -> (fd, owning thread id)
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _acquire(path: str | os.PathLike, what: str) -> bool:
    """Take the lock of output ``path``; False when this thread already holds it (re-entrant)."""
    import fcntl

    lock = lock_path(path)
    key = str(lock)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[1] == me:
            return False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as exc:
            raise ArtifactError(f"{lock}: cannot create the lock file ({exc.strerror}); choose another {what}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            except OSError:
                holder = "?"
            os.close(fd)
            raise ArtifactError(f"{artifact_base(path)}: another ganprint process (pid {holder}) is writing this "
                                f"output right now; wait for it to finish or choose another {what}") from None
        try:  # the previous holder may have removed the file between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    with _HELD_GUARD:
        _HELD[key] = (fd, me)
    return True


def _release(path: str | os.PathLike) -> None:
    _release_key(str(lock_path(path)))


def _release_key(key: str) -> None:
    with _HELD_GUARD:
        held = _HELD.pop(key, None)
    if held is not None:
        try:
            os.unlink(key)
        except OSError:
            pass
        os.close(held[0])


def release_output_lock(path: str | os.PathLike) -> None:
    """End this process's claim on output ``path`` (no-op when it holds none)."""
    _release(path)


def releases_output_claim(*params: str):
    """Decorate a stage whose outputs (the arguments named ``params``) it claims via
    :func:`ensure_writable`: the claims end when the stage returns or raises, also when it
    stopped before writing them (a library caller keeps no stale lock)."""
    import functools
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            try:
                return fn(*args, **kwargs)
            finally:
                for name in params:
                    if bound.get(name) is not None:
                        release_output_lock(bound[name])

        return wrapper

    return deco


def release_output_locks() -> None:
    """Drop every output lock this process holds (a stage that failed before it wrote)."""
    for key in list(_HELD):
        _release_key(key)


atexit.register(release_output_locks)


def claim_output(path: str | os.PathLike, what: str = "--out") -> None:
    """Lock output ``path`` from now until this process's first write to it (or its exit), so a
    second run started on the same ``--out`` while this one computes fails at once."""
    _acquire(path, what)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "--out"):
    """Hold an exclusive lock on the output base ``path`` (file ``.X.lock`` beside it, removed
    afterwards) so two runs never interleave their writes; a second writer gets an ArtifactError
    at once instead of leaving a mismatched pair.  The kernel drops the lock if the process dies.
    When this thread already holds it (a :func:`claim_output` made at the stage's start), the
    write proceeds under that lock and ends the claim."""
    _acquire(path, what)
    try:
        yield lock_path(path)
    finally:
        _release(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """Stable digest of a JSON-able object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def base_provenance(kind: str, stage: str, **extra: Any) -> dict[str, Any]:
    prov: dict[str, Any] = {"ganprint_version": __version__, "kind": kind, "stage": stage}
    prov.update(extra)
    return prov


@dataclass
class Artifact:
    """A loaded artifact. ``tensors`` values are torch tensors (CPU); ``table`` is a DataFrame."""

    base: Path
    tensors: dict[str, Any]
    table: Any  # pandas.DataFrame | None
    provenance: dict[str, Any]
    table_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.provenance.get("kind", "?")

    def tensor(self, name: str):
        if name not in self.tensors:
            raise ArtifactError(
                f"{self.base}{TENSOR_SUFFIX}: no tensor named '{name}' (has {sorted(self.tensors)}); "
                "pass an artifact of the right kind"
            )
        return self.tensors[name]


def _tensor_digest(tensors: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().numpy().tobytes() if hasattr(t, "numpy") else bytes(t))
    return h.hexdigest()


DIGEST_SCHEME = 2  # 2: pair_id covers the tensors *and* the provenance (1: tensors only)


def _pair_digest(tensors: Mapping[str, Any], prov: Mapping[str, Any]) -> str:
    """sha256 over the tensors and the provenance (less ``pair_id`` itself): editing either, e.g.
    the embeddings paths a similarity artifact records, makes the artifact unreadable."""
    rest = {k: v for k, v in prov.items() if k != "pair_id"}
    return digest_json({"tensors": _tensor_digest(tensors), "provenance": rest})


def write_artifact(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    table: Any,
    provenance: Mapping[str, Any],
    table_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` (name -> torch tensor) and ``table`` (DataFrame or None) atomically.

    ``table_meta`` is extra JSON stored only in the parquet metadata (e.g. skipped files).
    Returns the artifact base path.
    """
    import pandas as pd
    import pyarrow as pa
    import torch

    base = artifact_base(path)
    tpath, ppath = artifact_paths(base)
    ensure_writable(base)

    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).contiguous().cpu()
               for k, v in tensors.items()}
    prov = json.loads(json.dumps(dict(provenance), sort_keys=True, default=str))  # as a reader will see it
    prov["digest_scheme"] = DIGEST_SCHEME
    prov["pair_id"] = _pair_digest(tensors, prov)
    prov_json = json.dumps(prov, sort_keys=True)
    if table is None:
        table = pd.DataFrame()
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[META_KEY.encode()] = prov_json.encode()
    meta[b"ganprint_table"] = json.dumps(dict(table_meta or {}), sort_keys=True).encode()
    arrow = arrow.replace_schema_metadata(meta)

    tmp_files: list[str] = []
    try:
        with output_lock(base):
            remove_stale_temps(tpath)
            remove_stale_temps(ppath)
            _write_pair(tpath, ppath, tensors, prov_json, arrow, tmp_files)
    except OSError as exc:
        raise ArtifactError(f"{base}: cannot write artifact ({exc.strerror or exc}); choose another --out") from exc
    finally:
        for f in tmp_files:
            try:
                os.unlink(f)
            except OSError:
                pass
    return base


def _write_pair(tpath: Path, ppath: Path, tensors, prov_json: str, arrow, tmp_files: list[str]) -> None:
    """Both files to temp names, then renamed; ``tmp_files`` lists what the caller must delete on failure."""
    import pyarrow.parquet as pq

    folder = tpath.parent
    fd, t_tmp = tempfile.mkstemp(prefix=f".{tpath.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_files.append(t_tmp)
    save_safetensors(tensors, t_tmp, metadata={META_KEY: prov_json})
    fd, p_tmp = tempfile.mkstemp(prefix=f".{ppath.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_files.append(p_tmp)
    pq.write_table(arrow, p_tmp)
    follow_umask(t_tmp)
    follow_umask(p_tmp)
    # parquet first: a reader that finds the tensor file finds a matching table too
    os.replace(p_tmp, ppath)
    os.replace(t_tmp, tpath)
    tmp_files.clear()


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance from the safetensors header only (cheap: no tensor data is read)."""
    from safetensors import safe_open

    tpath, _ = artifact_paths(path)
    if not tpath.exists():
        raise ArtifactError(f"{tpath}: artifact not found; run the stage that writes it or check the path")
    try:
        with safe_open(str(tpath), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{tpath}: not a valid safetensors file ({exc}); re-run the stage that wrote it") from exc
    if META_KEY not in meta:
        raise ArtifactError(f"{tpath}: no ganprint provenance; only artifacts written by ganprint are accepted")
    return json.loads(meta[META_KEY])


def read_artifact(path: str | os.PathLike, kind: str | None = None, with_table: bool = True) -> Artifact:
    """Load and validate an artifact; ``kind`` (e.g. ``"embeddings"``) is checked when given."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    base = artifact_base(path)
    tpath, ppath = artifact_paths(base)
    prov = read_provenance(base)
    if kind is not None and prov.get("kind") != kind:
        raise ArtifactError(
            f"{tpath}: is a '{prov.get('kind')}' artifact, expected '{kind}'; pass the output of the right stage"
        )
    try:
        tensors = load_file(str(tpath))
    except Exception as exc:
        raise ArtifactError(f"{tpath}: cannot read tensors ({exc}); re-run the stage that wrote it") from exc
    if _pair_digest(tensors, prov) != prov.get("pair_id"):
        if prov.get("digest_scheme") is None and _tensor_digest(tensors) == prov.get("pair_id"):
            raise ArtifactError(f"{tpath}: written by an older ganprint whose digest does not cover the provenance; "
                                "re-run the stage that wrote it")
        raise ArtifactError(f"{tpath}: tensor data or provenance does not match its digest (corrupt or edited?); "
                            "re-run the stage")
    table = None
    table_meta: dict[str, Any] = {}
    if with_table:
        if not ppath.exists():
            raise ArtifactError(f"{ppath}: table missing next to {tpath.name}; re-run the stage that wrote it")
        try:
            pf = pq.read_table(str(ppath))
        except Exception as exc:
            raise ArtifactError(f"{ppath}: not a valid parquet file ({exc}); re-run the stage") from exc
        meta = pf.schema.metadata or {}
        pprov = json.loads(meta.get(META_KEY.encode(), b"{}"))
        if pprov.get("pair_id") != prov.get("pair_id"):
            raise ArtifactError(
                f"{ppath}: belongs to a different run than {tpath.name}; re-run the stage to rewrite both"
            )
        table_meta = json.loads(meta.get(b"ganprint_table", b"{}"))
        table = pf.to_pandas()
        rows = prov.get("rows")
        if rows is not None and len(table) != rows:
            raise ArtifactError(f"{ppath}: has {len(table)} rows, provenance says {rows}; re-run the stage")
    return Artifact(base=base, tensors=tensors, table=table, provenance=prov, table_meta=table_meta)
