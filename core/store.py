"""ActivationStore: the one data object of sciscope (what AnnData is to scanpy).

A store is a folder::

    store/
      manifest.json        # provenance: model identity + hash, sites, pooling, dtype, seed, versions
      obs.parquet          # one row per observation (example, or example x position)
      arrays/<site>.npy    # one (n_obs, d) array per site, memory-mapped on open

Arrays are written in chunks while capturing (:class:`StoreWriter`), so memory does not grow with
the number of examples, and read back memory-mapped, so a store larger than RAM streams.
The folder appears atomically: a crash leaves either no store or a complete one.

Nothing is lost and nothing is silently wrong: a store is written only over nothing, an empty folder
or another store; the manifest records the sha256 of every file (``manifest["sha256"]``, keyed by
the file's path inside the store, as ``sha256sum`` prints it), and :meth:`ActivationStore.open`
checks every file's size and hash before anything is read from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, IntegrityError, NonFiniteError, SciscopeError, ShapeError, SiteError, close_matches

_HEADER_BYTES = 256  # fixed .npy header size, so the final shape can be written after streaming
_MANIFEST = "manifest.json"
_OBS = "obs.parquet"
_log = logging.getLogger(__name__)
_warned_unverified = False  # say once per process that stores without checksums are not verified


def _sha256(path: Path) -> str:
    # file_digest reads through one small buffer: memory stays flat for any file size
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _is_store(path: Path) -> bool:
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "sites" in manifest


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`SciscopeError` unless a store may be written at ``path``.

    Allowed: nothing there, an empty folder, or an activation store (reruns replace their store).
    Anything else -- a folder of other files, a regular file -- would be lost, so it is refused.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and (_is_store(path) or not any(path.iterdir())):
        return
    raise SciscopeError(f"{path} exists and is not an activation store; choose another path or delete it")


def _remove_stale_temp(path: Path) -> None:
    """Remove ``.<name>.writing-<pid>`` folders beside ``path`` left by writers that were killed."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.writing-(\d+)")
    for tmp in path.parent.iterdir():
        m = pattern.fullmatch(tmp.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # a live writer, not ours: leave it alone
        except PermissionError:
            continue  # alive, another user's
        except (ProcessLookupError, OverflowError):
            shutil.rmtree(tmp, ignore_errors=True)


def site_filename(site: str) -> str:
    """A file-system-safe name for a site (``"encoder.layer.3:input"`` -> ``encoder.layer.3-input.npy``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", site) + ".npy"


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """An .npy v1.0 header padded to exactly ``_HEADER_BYTES`` bytes."""
    body = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(dtype),
        tuple(int(s) for s in shape),
    )
    magic = b"\x93NUMPY\x01\x00"
    pad = _HEADER_BYTES - len(magic) - 2 - len(body) - 1
    if pad < 0:
        raise ShapeError(f"shape {shape} too long for the fixed .npy header")
    header = body + " " * pad + "\n"
    return magic + len(header).to_bytes(2, "little") + header.encode("latin1")


class _ArrayAppender:
    """Append (rows, d) chunks to an .npy file whose row count is known only at the end."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.n_rows = 0
        self.width: int | None = None
        self._fh = open(path, "wb")
        self._fh.write(_npy_header(self.dtype, (0, 0)))

    def append(self, chunk: np.ndarray, site: str) -> None:
        if chunk.ndim != 2:
            raise ShapeError(f"site {site!r}: expected a (rows, d) chunk, got shape {chunk.shape}")
        if self.width is None:
            self.width = chunk.shape[1]
        elif chunk.shape[1] != self.width:
            raise ShapeError(
                f"site {site!r}: chunk has width {chunk.shape[1]}, earlier chunks had {self.width}"
            )
        self._fh.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.n_rows += chunk.shape[0]

    def close(self) -> None:
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, (self.n_rows, self.width or 0)))
        self._fh.close()


class StoreWriter:
    """Write a store chunk by chunk; the folder appears (atomically) only on :meth:`close`.

    Parameters
    ----------
    path
        Destination folder. An existing store there is replaced only when this writer closes
        successfully; anything else there (files, a non-empty folder) is refused
        (:class:`SciscopeError`). Temporary folders of killed writers beside it are removed.
    sites
        The sites whose arrays will be written.
    dtype
        On-disk dtype of the arrays (``float32`` by default; ``float16`` halves the disk).
    check_finite
        Raise :class:`NonFiniteError` naming the site and row when a chunk holds NaN or inf.

    Examples
    --------
    >>> with StoreWriter("acts", ["layer1"]) as w:  # doctest: +SKIP
    ...     w.append({"layer1": chunk}, obs_chunk)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sites: Sequence[str],
        *,
        dtype: Any = np.float32,
        check_finite: bool = True,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.sites = list(sites)
        if len(set(self.sites)) != len(self.sites):
            raise SiteError(f"duplicate sites in {self.sites}")
        check_replaceable(self.path)
        self.dtype = np.dtype(dtype)
        self.check_finite = check_finite
        self.manifest: dict[str, Any] = dict(manifest or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp(self.path)
        self._tmp = self.path.with_name(f".{self.path.name}.writing-{os.getpid()}")
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        (self._tmp / "arrays").mkdir(parents=True)
        self._arrays = {
            s: _ArrayAppender(self._tmp / "arrays" / site_filename(s), self.dtype) for s in self.sites
        }
        self._obs_chunks: list[pd.DataFrame] = []
        self.n_obs = 0
        self._closed = False

    def append(self, arrays: Mapping[str, np.ndarray], obs: pd.DataFrame) -> None:
        """Append one chunk: an array ``(rows, d)`` per site and the matching ``rows`` obs rows."""
        missing = set(self.sites) - set(arrays)
        if missing:
            raise SiteError(f"chunk lacks sites {sorted(missing)}")
        for site in self.sites:
            chunk = np.asarray(arrays[site])
            if chunk.shape[0] != len(obs):
                raise ShapeError(
                    f"site {site!r}: chunk has {chunk.shape[0]} rows but obs chunk has {len(obs)}"
                )
            if self.check_finite and chunk.dtype.kind == "f":
                bad = ~np.isfinite(chunk).all(axis=tuple(range(1, chunk.ndim)))
                if bad.any():
                    row = self.n_obs + int(np.flatnonzero(bad)[0])
                    raise NonFiniteError(
                        f"site {site!r}: NaN or inf activations in {int(bad.sum())} rows "
                        f"(first at obs row {row})"
                    )
            self._arrays[site].append(chunk, site)
        self._obs_chunks.append(obs.reset_index(drop=True))
        self.n_obs += len(obs)

    def close(self) -> "ActivationStore":
        """Finish the files, write obs + manifest and move the folder into place."""
        for appender in self._arrays.values():
            appender.close()
        obs = (
            pd.concat(self._obs_chunks, ignore_index=True) if self._obs_chunks else pd.DataFrame()
        )
        _write_obs(obs, self._tmp / _OBS)
        manifest = dict(self.manifest)
        files = {s: f"arrays/{site_filename(s)}" for s in self.sites}
        manifest.update(
            n_obs=self.n_obs,
            dtype=self.dtype.name,
            sites={s: {"file": files[s], "d": a.width} for s, a in self._arrays.items()},
            sha256={rel: _sha256(self._tmp / rel) for rel in [_OBS, *files.values()]},
        )
        manifest.setdefault("sciscope_version", _version())
        (self._tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        check_replaceable(self.path)  # again: something else may have appeared there while we wrote
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)
        self._closed = True
        return ActivationStore.open(self.path, verify=False)  # hashed a moment ago

    def abort(self) -> None:
        """Drop everything written so far; an existing store at ``path`` stays untouched."""
        for appender in self._arrays.values():
            if not appender._fh.closed:
                appender._fh.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._closed:
            return
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()  # a failed close leaves no temporary folder behind either
                raise
        else:
            self.abort()


def _write_obs(obs: pd.DataFrame, path: Path) -> None:
    # Parquet needs string column names and no mixed-type object columns.
    obs = obs.copy()
    obs.columns = [str(c) for c in obs.columns]
    for col in obs.columns:
        if obs[col].dtype == object:
            types = {type(v) for v in obs[col].dropna()}
            if len(types) > 1:
                obs[col] = obs[col].astype(str)
    obs.to_parquet(path, index=False)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sciscope")
    except Exception:  # pragma: no cover - running from a bare checkout
        return "unknown"


class ActivationStore:
    """Observations (``obs``) row-aligned with one ``(n_obs, d)`` activation array per site.

    Open one from disk with :meth:`open`, make one in memory with :meth:`from_arrays`, or get one
    from :func:`sciscope.core.collect`. Arrays opened from disk are memory-mapped.

    Attributes
    ----------
    obs : pandas.DataFrame
        One row per observation, with a fresh RangeIndex.
    manifest : dict
        Provenance (model, hash, sites, pooling, dtype, seed, versions).
    path : pathlib.Path or None
        Folder on disk, or None for an in-memory store.
    """

    def __init__(
        self,
        obs: pd.DataFrame,
        arrays: Mapping[str, np.ndarray],
        manifest: Mapping[str, Any] | None = None,
        *,
        path: Path | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        self._arrays = dict(arrays)
        self._rows = rows  # None = all rows; otherwise indices into the underlying arrays
        self.manifest = dict(manifest or {})
        self.path = path
        n = len(obs)
        for site, arr in self._arrays.items():
            base_rows = arr.shape[0] if rows is None else len(rows)
            if arr.ndim != 2:
                raise ShapeError(f"site {site!r}: arrays must be (n_obs, d), got shape {arr.shape}")
            if base_rows != n:
                raise ShapeError(f"site {site!r} has {base_rows} rows but obs has {n}")
        self.obs = obs.reset_index(drop=True)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        obs: pd.DataFrame | None,
        arrays: Mapping[str, Any],
        manifest: Mapping[str, Any] | None = None,
    ) -> "ActivationStore":
        """An in-memory store from ``{site: (n_obs, d) array}``; ``obs`` defaults to an empty table."""
        arrays = {s: _as_numpy(a) for s, a in arrays.items()}
        if obs is None:
            n = next(iter(arrays.values())).shape[0] if arrays else 0
            obs = pd.DataFrame(index=pd.RangeIndex(n))
        return cls(obs, arrays, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True) -> "ActivationStore":
        """Reopen a store written to ``path``; arrays are memory-mapped (read-only).

        Parameters
        ----------
        path
            The store folder.
        verify
            Check every file against the sha256 the manifest recorded when the store was written
            (reads each file once). Stores written before checksums were recorded open unchecked.
            Array file sizes are checked either way.

        Raises
        ------
        IntegrityError
            A file is missing, truncated, or changed since the store was written (the message
            names the file).
        """
        global _warned_unverified
        path = Path(path)
        manifest_file = path / _MANIFEST
        if not manifest_file.is_file():
            raise SciscopeError(f"{path} is not an activation store (no {_MANIFEST})")
        manifest = json.loads(manifest_file.read_text())
        # sizes first: a truncated file is named as such, not as merely 'changed'
        arrays = {site: _open_array(path / info["file"]) for site, info in manifest.get("sites", {}).items()}
        sums = manifest.get("sha256") if verify else None
        if verify and sums is None and not _warned_unverified:
            _log.warning("store %s has no checksums (written by an older sciscope): its files are not verified", path)
            _warned_unverified = True
        for rel, expected in (sums or {}).items():
            if not (path / rel).is_file():
                raise IntegrityError(f"store file {path / rel} is missing")
            if _sha256(path / rel) != expected:
                raise IntegrityError(
                    f"store file {path / rel} changed since the store was written (sha256 differs from "
                    "the manifest's: rows shuffled, edited or overwritten?); recapture the store"
                )
        obs = pd.read_parquet(path / _OBS) if (path / _OBS).exists() else pd.DataFrame()
        if len(obs.columns) == 0:
            obs = pd.DataFrame(index=pd.RangeIndex(manifest.get("n_obs", 0)))
        return cls(obs, arrays, manifest, path=path)

    def save(self, path: str | os.PathLike[str], *, chunk_rows: int = 65536) -> "ActivationStore":
        """Write this store (or this selection of one) to ``path`` and return the reopened store.

        ``path`` may hold nothing, an empty folder or a store (replaced); anything else is refused.
        """
        with StoreWriter(path, self.sites, dtype=self.dtype, manifest=self.manifest, check_finite=False) as w:
            for start in range(0, self.n_obs, chunk_rows):
                stop = min(start + chunk_rows, self.n_obs)
                w.append({s: self.array(s, slice(start, stop)) for s in self.sites}, self.obs.iloc[start:stop])
            return w.close()

    # -- access ---------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """The sites held, in capture order."""
        return list(self._arrays)

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def dtype(self) -> np.dtype:
        arrays = list(self._arrays.values())
        return arrays[0].dtype if arrays else np.dtype(np.float32)

    def dim(self, site: str) -> int:
        """Width ``d`` of a site's array."""
        return int(self._array(site).shape[1])

    def _array(self, site: str) -> np.ndarray:
        try:
            return self._arrays[site]
        except KeyError:
            hint = close_matches(site, self._arrays)
            raise SiteError(
                f"site {site!r} is not in this store"
                + (f"; did you mean {hint}?" if hint else f"; it holds {self.sites}")
            ) from None

    def array(self, site: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """The ``(n, d)`` array of ``site`` (optionally only ``rows`` of the current selection).

        Without a selection and without ``rows`` this is the memory map itself (no copy).
        """
        arr = self._array(site)
        if self._rows is None:
            return arr if rows is None else np.asarray(arr[rows])
        idx = self._rows if rows is None else self._rows[rows]
        return np.asarray(arr[idx])

    def __getitem__(self, key: str | np.ndarray | pd.Series | slice) -> Any:
        """``store[site]`` gives an array; ``store[mask_or_rows]`` gives a selection (a new store)."""
        if isinstance(key, str):
            return self.array(key)
        return self.select(key)

    def __contains__(self, site: object) -> bool:
        return site in self._arrays

    def __len__(self) -> int:
        return self.n_obs

    def select(self, rows: np.ndarray | pd.Series | slice | Sequence[int]) -> "ActivationStore":
        """A lazy selection of rows (boolean mask, integer indices or slice) sharing the arrays."""
        if isinstance(rows, pd.Series):
            rows = rows.to_numpy()
        if isinstance(rows, slice):
            idx = np.arange(self.n_obs)[rows]
        else:
            rows = np.asarray(rows)
            if rows.dtype == bool:
                if rows.shape != (self.n_obs,):
                    raise ShapeError(f"boolean mask has shape {rows.shape}, store has {self.n_obs} rows")
                idx = np.flatnonzero(rows)
            else:
                idx = rows.astype(np.int64)
                if idx.size and (idx.min() < -self.n_obs or idx.max() >= self.n_obs):
                    raise IndexError(f"row index out of range for a store of {self.n_obs} rows")
                idx = np.where(idx < 0, idx + self.n_obs, idx)
        base = idx if self._rows is None else self._rows[idx]
        return ActivationStore(
            self.obs.iloc[idx].reset_index(drop=True), self._arrays, self.manifest, path=self.path, rows=base
        )

    def query(self, expr: str) -> "ActivationStore":
        """Select rows with a pandas query on ``obs`` (``store.query("split == 'test'")``)."""
        return self.select(self.obs.eval(expr).to_numpy(dtype=bool))

    def iter_batches(
        self,
        site: str,
        batch_size: int = 4096,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        as_tensor: bool = True,
        dtype: Any = None,
    ) -> Iterator[Any]:
        """Yield ``(batch, d)`` blocks of one site's activations, e.g. to train an SAE or a probe.

        Parameters
        ----------
        site
            Which array.
        batch_size
            Rows per block.
        shuffle, seed
            Visit rows in a seeded random order (the same seed gives the same order). Rows are
            read in sorted order within each block, which keeps memory-mapped reads local.
        drop_last
            Skip a final incomplete block.
        as_tensor
            Yield ``torch.Tensor`` (default) or numpy arrays.
        dtype
            Cast to this dtype (default float32).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        arr = self._array(site)
        order = np.arange(self.n_obs) if self._rows is None else self._rows.copy()
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        contiguous = self._rows is None and not shuffle
        for start in range(0, len(order), batch_size):
            stop = min(start + batch_size, len(order))
            if drop_last and stop - start < batch_size:
                break
            if contiguous:
                block = np.asarray(arr[start:stop])
            else:
                idx = order[start:stop]
                sort = np.argsort(idx, kind="stable")
                block = np.empty((len(idx), arr.shape[1]), dtype=arr.dtype)
                block[sort] = arr[idx[sort]]
            if as_tensor:
                import torch

                t = torch.from_numpy(np.array(block, dtype=dtype or np.float32, copy=True))
                yield t
            else:
                yield block.astype(dtype or np.float32, copy=False)

    def to_anndata(self, site: str | None = None) -> Any:
        """An AnnData with ``obs``, ``X`` = one site's array and ``obsm[site]`` for every site.

        Parameters
        ----------
        site
            Which site becomes ``X`` (default: the first). ``uns['sciscope']`` gets the manifest.
        """
        import anndata as ad

        if not self.sites:
            raise SciscopeError("this store holds no arrays")
        site = site or self.sites[0]
        obs = self.obs.copy()
        obs.index = obs.index.astype(str)
        adata = ad.AnnData(X=np.asarray(self.array(site)), obs=obs)
        for s in self.sites:
            adata.obsm[s] = np.asarray(self.array(s))
        adata.uns["sciscope"] = json.loads(json.dumps(self.manifest, default=str))
        return adata

    def equals(self, other: "ActivationStore") -> bool:
        """True if both stores hold the same sites, identical arrays and identical obs."""
        if self.sites != other.sites or self.n_obs != other.n_obs:
            return False
        if not self.obs.reset_index(drop=True).equals(other.obs.reset_index(drop=True)):
            return False
        return all(np.array_equal(self.array(s), other.array(s)) for s in self.sites)

    def __repr__(self) -> str:
        where = f" at {self.path}" if self.path else " (in memory)"
        sites = ", ".join(f"{s} ({self.dim(s)})" for s in self.sites)
        return f"ActivationStore: {self.n_obs} obs x [{sites}]{where}\n  obs: {list(self.obs.columns)}"


def _open_array(file: Path) -> np.memmap:
    """Memory-map one store array, first checking that the file holds all the bytes its header says."""
    try:
        with open(file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
            expected = fh.tell() + int(np.prod(shape)) * dtype.itemsize
    except FileNotFoundError:
        raise IntegrityError(f"store file {file} is missing") from None
    except ValueError as e:  # no .npy magic or header: not (or no longer) an array file
        raise IntegrityError(f"store file {file} is damaged: {e}") from None
    actual = file.stat().st_size
    if actual != expected:
        raise IntegrityError(
            f"store file {file} is truncated or damaged: expected {expected} bytes for a {tuple(shape)} "
            f"{dtype} array, found {actual} bytes"
        )
    return np.load(file, mmap_mode="r", allow_pickle=False)


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    return a


def merge_shards(
    shards: Sequence[str | os.PathLike[str] | ActivationStore],
    out: str | os.PathLike[str],
    *,
    remove: bool = False,
) -> ActivationStore:
    """Join the stores written by ``collect(..., shard=(i, n))`` workers into one, in batch order.

    Parameters
    ----------
    shards
        The ``n`` shard stores (folders or opened stores), in any order.
    out
        Folder of the merged store; it appears atomically when complete. It may hold nothing, an
        empty folder or a store (replaced); anything else is refused before a shard is read.
    remove
        Delete the shard folders once the merged store is in place.

    Returns
    -------
    ActivationStore
        The merged store: rows and obs exactly as one ``collect`` over all batches would give.

    Raises
    ------
    SciscopeError
        A shard is missing or duplicated, or the shards disagree on sites, widths, dtype, pooling
        or model (the message names the shard).
        Also when ``out`` exists and is not a store.
    """
    check_replaceable(out)
    stores = [s if isinstance(s, ActivationStore) else ActivationStore.open(s) for s in shards]
    if not stores:
        raise SciscopeError("merge_shards: no shard stores given")
    infos = []
    for st in stores:
        info = st.manifest.get("shard")
        if info is None:
            raise SciscopeError(f"{st.path or 'an in-memory store'} is not a capture shard (no 'shard' in its manifest)")
        infos.append(info)
    count = int(infos[0]["count"])
    seen = sorted(int(i["index"]) for i in infos)
    if seen != list(range(count)) or any(int(i["count"]) != count for i in infos):
        missing = sorted(set(range(count)) - set(seen))
        dup = sorted({i for i in seen if seen.count(i) > 1})
        raise SciscopeError(f"merge_shards: expected shards 0..{count - 1} once each; missing {missing}, duplicated {dup}")
    first = stores[0]
    for st in stores[1:]:
        for key in ("pooling",):
            if st.manifest.get(key) != first.manifest.get(key):
                raise SciscopeError(f"shard {st.path}: {key} {st.manifest.get(key)!r} differs from {first.manifest.get(key)!r}")
        h_a = (st.manifest.get("model") or {}).get("hash")
        h_b = (first.manifest.get("model") or {}).get("hash")
        if h_a != h_b:
            raise SciscopeError(f"shard {st.path} was captured from another model (hash {str(h_a)[:12]} vs {str(h_b)[:12]})")
        if st.sites != first.sites or any(st.dim(s) != first.dim(s) for s in first.sites) or st.dtype != first.dtype:
            raise SciscopeError(f"shard {st.path}: sites/widths/dtype differ from shard {first.path}")
    # (batch index, store, first row, n rows): the original batch order across workers
    pieces: list[tuple[int, ActivationStore, int, int]] = []
    for st, info in zip(stores, infos):
        start = 0
        for b, rows in info["batches"]:
            pieces.append((int(b), st, start, int(rows)))
            start += int(rows)
        if start != st.n_obs:
            raise SciscopeError(f"shard {st.path}: its manifest lists {start} rows but it holds {st.n_obs}")
    pieces.sort(key=lambda p: p[0])
    n_batches = int(infos[0]["n_batches"])
    if [p[0] for p in pieces] != list(range(n_batches)):
        raise SciscopeError(f"merge_shards: the shards do not cover batches 0..{n_batches - 1} exactly once")
    manifest = {k: v for k, v in first.manifest.items() if k not in ("shard", "n_obs", "sites", "dtype")}
    manifest["merged_from_shards"] = count
    with StoreWriter(out, first.sites, dtype=first.dtype, manifest=manifest, check_finite=False) as w:
        for _, st, start, rows in pieces:
            sl = slice(start, start + rows)
            w.append({s: st.array(s, sl) for s in first.sites}, st.obs.iloc[sl])
        merged = w.close()
    if remove:
        for st in stores:
            if st.path is not None and Path(st.path).resolve() != Path(out).resolve():
                shutil.rmtree(st.path, ignore_errors=True)
    return merged
