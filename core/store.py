"""ActivationStore: the one data object of sciscope (what AnnData is to scanpy).

A store is a folder::

    store/
      manifest.json        # provenance: model identity + hash, sites, pooling, dtype, seed, versions
      obs.parquet          # one row per observation (example, or example x position)
      arrays/<site>.npy    # one (n_obs, d) array per site, memory-mapped on open

Arrays and obs rows are written in chunks while capturing (:class:`StoreWriter`), so memory does not
grow with the number of rows, and arrays are read back memory-mapped, so a store larger than RAM
streams. How obs chunks whose column types differ are joined is described under :class:`StoreWriter`.
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
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, IntegrityError, NonFiniteError, SciscopeError, ShapeError, SiteError, close_matches

_HEADER_BYTES = 256  # fixed .npy header size, so the final shape can be written after streaming
_MANIFEST = "manifest.json"
_OBS = "obs.parquet"
_OBS_ROW_GROUP = 65_536  # obs rows buffered before a parquet row group is written (a few MB for 20 columns)
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

    def check(self, chunk: np.ndarray, site: str) -> None:
        """Raise :class:`ShapeError` unless ``chunk`` is ``(rows, d)`` with the width of earlier chunks."""
        if chunk.ndim != 2:
            raise ShapeError(f"site {site!r}: expected a (rows, d) chunk, got shape {chunk.shape}")
        if self.width is not None and chunk.shape[1] != self.width:
            raise ShapeError(
                f"site {site!r}: chunk has width {chunk.shape[1]}, earlier chunks had {self.width}"
            )

    def append(self, chunk: np.ndarray, site: str) -> None:
        self.check(chunk, site)
        if self.width is None:
            self.width = chunk.shape[1]
        self._fh.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.n_rows += chunk.shape[0]

    def close(self) -> None:
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, (self.n_rows, self.width or 0)))
        self._fh.close()


class _ObsChunk:
    """One obs chunk made ready to write: its arrow table and what the close-time join needs."""

    __slots__ = ("table", "dtypes", "value_types")

    def __init__(
        self, table: pa.Table, dtypes: dict[str, Any], value_types: dict[str, frozenset[type]]
    ) -> None:
        self.table = table
        self.dtypes = dtypes  # column -> pandas dtype of this chunk
        self.value_types = value_types  # column -> Python types of its non-null values


def _value_types(col: pd.Series) -> frozenset[type]:
    """The Python types of a column's non-null values, as ``pd.concat`` with an object column sees them.

    Object columns are scanned value by value (the check the whole-table writer made); any other
    dtype holds one type, that of its first non-null value converted to a Python object (an int64
    column gives ``int``, a categorical of strings ``str``, a datetime column ``Timestamp``).
    Called on every column of every chunk, so the common dtypes take vectorised shortcuts.
    """
    dtype = col.dtype
    if len(col) == 0:
        return frozenset()
    if isinstance(dtype, np.dtype) and dtype.kind in "iub":  # numpy ints and bools hold no nulls
        return frozenset({bool if dtype.kind == "b" else int})
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return frozenset({float}) if not np.isnan(col.to_numpy()).all() else frozenset()
    if dtype == object:
        values = col.to_numpy()
        types = set(map(type, values)) - {type(None), type(pd.NA), type(pd.NaT)}
        if not any(issubclass(t, float) for t in types):
            return frozenset(types)
        # a float may be NaN (null): only then look at the values one by one
        return frozenset(map(type, values[pd.notna(values)]))
    if isinstance(dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy()
        valid = codes >= 0
        if not valid.any():
            return frozenset()
        first = codes[int(valid.argmax())]
        return frozenset({type(np.asarray(col.cat.categories[first : first + 1], dtype=object)[0])})
    valid = col.notna().to_numpy()
    if not valid.any():
        return frozenset()
    pos = int(valid.argmax())
    return frozenset({type(col.iloc[pos : pos + 1].astype(object).iloc[0])})


def _as_strings(values: Sequence[Any]) -> list[str | None]:
    # str(v) as the whole-table writer did (1 -> "1", 2.5 -> "2.5"), but a null stays null
    # rather than becoming the text "None" or "nan".
    return [None if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v) else str(v)
            for v in values]


def _pandas_meta(schema: pa.Schema) -> dict[str, Any]:
    return json.loads(schema.metadata[b"pandas"]) if schema.metadata and b"pandas" in schema.metadata else {}


def _with_pandas_meta(schema: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    return schema.with_metadata({**(schema.metadata or {}), b"pandas": json.dumps(meta).encode()})


def _object_column_meta(name: str, typ: pa.DataType) -> dict[str, Any]:
    """The pandas-metadata entry ``Table.from_pandas`` gives an object column holding ``typ`` values."""
    from pyarrow.pandas_compat import get_logical_type

    return {"name": name, "field_name": name, "pandas_type": get_logical_type(typ), "numpy_type": "object",
            "metadata": None}


class _ObsWriter:
    """Stream obs chunks to parquet: a row group per ``row_group`` buffered rows, memory flat in the rows.

    Chunks go to a part file whose arrow schema is that of the chunk that opened it. A later chunk
    whose arrow types differ (a column int64 in one chunk and float64 in the next, or all-None
    here and strings there) opens a new part. On :meth:`finish` every column gets the type
    ``pd.concat`` of all chunks would have given it (see :class:`StoreWriter` for the policy);
    when that is the one part's own schema (the usual case: every chunk a slice of one table) the
    part becomes ``obs.parquet`` as it is, otherwise the parts are rewritten row group by row group
    into ``obs.parquet``, cast to the joined schema, so memory stays flat either way.
    """

    def __init__(self, folder: Path, row_group: int) -> None:
        if row_group < 1:
            raise ConfigError(f"obs_row_group must be >= 1, got {row_group}")
        self.folder = folder
        self.row_group = row_group
        self.columns: list[str] | None = None  # fixed by the first chunk
        self._empty: pd.DataFrame | None = None  # first chunk, no rows: written when no row ever comes
        self._dtypes: dict[str, list[Any]] = {}  # column -> distinct pandas dtypes of non-empty chunks
        self._value_types: dict[str, set[type]] = {}
        self._parts: list[tuple[Path, pa.Schema, set[str]]] = []  # closed parts, in row order
        self._valued: set[str] = set()  # columns with a non-null value in the part being filled
        self._schema: pa.Schema | None = None  # schema of the part being filled
        self._writer: pq.ParquetWriter | None = None  # opened at the part's first row group
        self._part_path = folder / ".obs.part-0.parquet"
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    # -- per chunk ------------------------------------------------------------------------------
    def prepare(self, obs: pd.DataFrame, first_row: int) -> _ObsChunk | None:
        """Check and convert one chunk (None for a chunk without rows or columns).

        Raises :class:`ShapeError` when its columns differ from the first chunk's or a column cannot
        be converted to arrow. Only the first chunk leaves a trace (its columns) before :meth:`push`.
        """
        names = [str(c) for c in obs.columns]
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ShapeError(f"obs chunk at row {first_row} has duplicate column names {dup}")
        if self.columns is not None and names != self.columns:
            missing = [c for c in self.columns if c not in names]
            extra = [c for c in names if c not in self.columns]
            if missing or extra:
                raise ShapeError(
                    f"obs chunk at row {first_row} "
                    + (f"lacks column(s) {missing}" if missing else "")
                    + (" and " if missing and extra else "")
                    + (f"has new column(s) {extra}" if extra else "")
                    + f"; every obs chunk must have the columns of the first: {self.columns}"
                )
        if list(obs.columns) != names:
            obs = obs.set_axis(names, axis=1)  # a new frame: the caller's keeps its labels
        if self.columns is not None and names != self.columns:
            obs = obs[self.columns]  # same columns in another order: the first chunk's order
        if len(obs) == 0 or not names:
            self._first(obs)
            return None
        dtypes = {c: obs[c].dtype for c in names}
        value_types = {c: _value_types(obs[c]) for c in names}
        converted = {}
        for c in names:
            if dtypes[c] == object and len(value_types[c]) > 1:
                # Parquet holds one type per column: mixed values are written as their text.
                converted[c] = pd.Series(_as_strings(obs[c].to_numpy()), index=obs.index, dtype=object)
        if converted:
            obs = obs.assign(**converted)
        try:
            # one thread: a chunk is small, and a thread pool per chunk costs more than it saves
            table = pa.Table.from_pandas(obs, preserve_index=False, nthreads=1)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise ShapeError(f"obs chunk at row {first_row} cannot be written to parquet: {e}") from e
        self._first(obs)
        return _ObsChunk(table, dtypes, value_types)

    def _first(self, obs: pd.DataFrame) -> None:
        # the first chunk accepted fixes the columns (a refused one fixes nothing)
        if self.columns is None:
            self.columns = list(obs.columns)
            self._empty = obs.iloc[:0].copy()  # a copy: a view would keep the whole chunk alive

    def push(self, chunk: _ObsChunk) -> None:
        """Add a prepared chunk: record its types, buffer its table, write a row group when due."""
        for c, dt in chunk.dtypes.items():
            seen = self._dtypes.setdefault(c, [])
            if not any(dt == s for s in seen):
                seen.append(dt)
            self._value_types.setdefault(c, set()).update(chunk.value_types[c])
        table = chunk.table
        if self._schema is not None:
            fitted = self._fit(table)
            if fitted is None:
                self._close_part()
            else:
                table = fitted
        if self._schema is None:
            self._schema = table.schema
        self._valued.update(n for n, col in zip(table.column_names, table.columns) if col.null_count < len(col))
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group:
            self._flush()

    def _fit(self, table: pa.Table) -> pa.Table | None:
        """``table`` in the current part's schema, or None when it needs a part of its own.

        Only nulls are reconciled here, losslessly: an all-None column takes the part's type, and
        while the part has no row group on disk yet, its all-None column takes the new chunk's.
        """
        assert self._schema is not None
        fill: dict[int, pa.DataType] = {}  # all-None columns of the chunk -> the part's type
        widen: dict[int, pa.DataType] = {}  # all-None columns of the (unwritten) part -> the chunk's
        for i, (mine, theirs) in enumerate(zip(self._schema.types, table.schema.types)):
            if mine == theirs:
                continue
            if pa.types.is_null(theirs):
                fill[i] = mine
            elif pa.types.is_null(mine) and self._writer is None:
                widen[i] = theirs
            else:
                return None
        for i, typ in fill.items():
            table = table.set_column(i, self._schema.field(i), pa.nulls(table.num_rows, typ))
        if widen:
            schema, meta = self._schema, _pandas_meta(self._schema)
            for i, typ in widen.items():
                schema = schema.set(i, schema.field(i).with_type(typ))
                self._buffer = [t.set_column(i, schema.field(i), pa.nulls(t.num_rows, typ)) for t in self._buffer]
                if meta:
                    meta["columns"][i] = _object_column_meta(schema.field(i).name, typ)
            self._schema = _with_pandas_meta(schema, meta) if meta else schema
        return table

    def _flush(self) -> None:
        if not self._buffer:
            return
        assert self._schema is not None
        if self._writer is None:
            self._part_path = self.folder / f".obs.part-{len(self._parts)}.parquet"
            self._writer = pq.ParquetWriter(self._part_path, self._schema)
        table = pa.concat_tables(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._writer.write_table(table, row_group_size=table.num_rows)  # one row group
        self._buffer, self._buffered = [], 0

    def _close_part(self) -> None:
        self._flush()
        if self._writer is not None:
            self._parts.append((self._part_path, self._schema, self._valued))
            self._writer.close()
        self._writer, self._schema, self._valued = None, None, set()

    # -- at the end -----------------------------------------------------------------------------
    def finish(self, path: Path, n_obs: int) -> None:
        """Write ``obs.parquet`` at ``path`` from the parts (see the class docstring)."""
        self._close_part()
        if not self._parts:
            # no chunk, no row or no column: the whole-table writer's result
            if not self.columns:
                _write_obs(pd.DataFrame(index=pd.RangeIndex(n_obs)), path)
            else:
                _write_obs(self._empty if self._empty is not None else pd.DataFrame(), path)
            return
        target, render = self._joined_schema()
        first_path, first_schema, _ = self._parts[0]
        same = first_schema.equals(target) and _pandas_meta(first_schema) == _pandas_meta(target)
        if len(self._parts) == 1 and same:
            os.replace(first_path, path)
            return
        with pq.ParquetWriter(path, target) as out:
            for part, _, _ in self._parts:
                pf = pq.ParquetFile(part)
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g)
                    out.write_table(self._cast(table, target, render), row_group_size=max(table.num_rows, 1))
                del pf
                part.unlink()

    def _joined_schema(self) -> tuple[pa.Schema, set[str]]:
        """The schema of the joined obs and the columns whose values are written as text."""
        assert self.columns is not None
        fields, entries, render = [], [], set()
        first_meta = _pandas_meta(self._parts[0][1])
        for i, name in enumerate(self.columns):
            dtypes = self._dtypes[name]
            # the dtype pd.concat of the chunks gives the column, from empty frames of its dtypes (it
            # depends on the dtypes only; frames, not series: concat joins bool + int64 to int64 in
            # frames but to object in series)
            empties = [pd.DataFrame({name: pd.Series([], dtype=d)}) for d in dtypes]
            joined = pd.concat(empties, ignore_index=True)[name].dtype
            if joined != object:
                empty = pd.DataFrame({name: pd.Series([], dtype=joined)})
                sample = pa.Schema.from_pandas(empty, preserve_index=False)
                typ, entry = sample.field(0).type, _pandas_meta(sample)["columns"][0]
                if len(dtypes) == 1 and first_meta:
                    entry = first_meta["columns"][i]  # the chunks' own entry (e.g. a tz, categories)
            elif len(self._value_types[name]) > 1:
                typ, entry = pa.string(), _object_column_meta(name, pa.string())
                render.add(name)
            else:
                # the types of the parts that hold values: a chunk of NaN floats joins strings
                types = [_decoded(sch.field(i).type) for _, sch, valued in self._parts if name in valued]
                types = types or [_decoded(self._parts[0][1].field(i).type)]
                try:
                    schemas = [pa.schema([(name, t)]) for t in types]
                    typ = pa.unify_schemas(schemas, promote_options="permissive").field(0).type
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                    raise ShapeError(f"obs column {name!r} holds types {sorted(set(map(str, types)))} in "
                                     f"different chunks that cannot be joined: {e}") from e
                entry = _object_column_meta(name, typ)
            fields.append(pa.field(name, typ))
            entries.append(entry)
        meta = {**first_meta, "columns": entries} if first_meta else {"columns": entries}
        return _with_pandas_meta(pa.schema(fields), meta), render

    @staticmethod
    def _cast(table: pa.Table, target: pa.Schema, render: set[str]) -> pa.Table:
        columns = []
        for i, field in enumerate(target):
            col = table.column(i)
            if col.type != field.type:
                if field.name in render and not pa.types.is_string(col.type):
                    col = pa.chunked_array([pa.array(_as_strings(col.to_pylist()), pa.string())], pa.string())
                else:
                    if pa.types.is_dictionary(col.type) and not pa.types.is_dictionary(field.type):
                        col = col.cast(col.type.value_type)
                    # int -> float rounds beyond 2**53 as numpy does (safe=False) instead of refusing
                    to_float = pa.types.is_floating(field.type) and pa.types.is_integer(col.type)
                    col = col.cast(field.type, safe=not to_float)
            columns.append(col)
        return pa.Table.from_arrays(columns, schema=target)

    def discard(self) -> None:
        """Close an open part (the caller removes the folder)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
        self._writer, self._schema, self._buffer = None, None, []


def _decoded(typ: pa.DataType) -> pa.DataType:
    return typ.value_type if pa.types.is_dictionary(typ) else typ


class StoreWriter:
    """Write a store chunk by chunk; the folder appears (atomically) only on :meth:`close`.

    Arrays go to their ``.npy`` files as each chunk arrives, obs rows to a parquet file a row group
    at a time (every ``obs_row_group`` rows), so the writer's memory does not grow with the rows.

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
    manifest
        Provenance to record; ``n_obs``, ``dtype``, ``sites`` and ``sha256`` are filled in on close.
    obs_row_group
        Obs rows buffered before they are written as one parquet row group.

    Notes
    -----
    Obs chunks are joined as ``pd.concat`` of all of them would join them (what this writer did
    when it held every chunk until ``close``), decided at ``close`` from each column's dtypes in
    every chunk, without holding the rows:

    * Every chunk must have the columns of the first (names as ``str``); a chunk that lacks one or
      adds one raises :class:`ShapeError` naming the columns and the chunk's first row -- never
      silently filled with nulls. The same columns in another order are put in the first's order.
    * A column with one dtype in every chunk keeps it (categoricals included, with their
      categories and order). Numeric dtypes widen as ``pd.concat`` widens them: int32 + int64 ->
      int64, int + float -> float64 (NaN kept), bool + int -> int64.
    * Any other mix makes an object column, written as its values: categoricals whose categories
      differ between chunks as their values (strings), all-None chunks in the type of the others;
      a column whose non-null values have more than one Python type over all chunks (ints and
      strings, bools and floats, ...) as ``str(value)``.
    * Nulls (None, NaN, NA) stay null, also in a column written as text (the whole-table writer
      wrote them as the strings ``"None"`` and ``"nan"`` there).
    * A chunk without rows only fixes the columns (and, when no row ever comes, the dtypes).

    When the chunks agree (every chunk a slice of one table, as in :func:`collect`), the parquet
    file written while capturing is the store's ``obs.parquet``; otherwise ``close`` rewrites it row
    group by row group in the joined schema. Either way ``pandas.read_parquet`` reads it.

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
        obs_row_group: int = _OBS_ROW_GROUP,
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
        self._obs = _ObsWriter(self._tmp, obs_row_group)  # checks obs_row_group before anything is made
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        (self._tmp / "arrays").mkdir(parents=True)
        self._arrays = {
            s: _ArrayAppender(self._tmp / "arrays" / site_filename(s), self.dtype) for s in self.sites
        }
        self.n_obs = 0
        self._closed = False

    def append(self, arrays: Mapping[str, np.ndarray], obs: pd.DataFrame) -> None:
        """Append one chunk: an array ``(rows, d)`` per site and the matching ``rows`` obs rows.

        Everything is checked before anything is written, so a chunk that raises leaves the
        files as they were.
        """
        missing = set(self.sites) - set(arrays)
        if missing:
            raise SiteError(f"chunk lacks sites {sorted(missing)}")
        chunks = {}
        for site in self.sites:
            chunk = np.asarray(arrays[site])
            if chunk.shape[0] != len(obs):
                raise ShapeError(
                    f"site {site!r}: chunk has {chunk.shape[0]} rows but obs chunk has {len(obs)}"
                )
            self._arrays[site].check(chunk, site)
            if self.check_finite and chunk.dtype.kind == "f":
                bad = ~np.isfinite(chunk).all(axis=tuple(range(1, chunk.ndim)))
                if bad.any():
                    row = self.n_obs + int(np.flatnonzero(bad)[0])
                    raise NonFiniteError(
                        f"site {site!r}: NaN or inf activations in {int(bad.sum())} rows "
                        f"(first at obs row {row})"
                    )
            chunks[site] = chunk
        obs_chunk = self._obs.prepare(obs, self.n_obs)
        for site, chunk in chunks.items():
            self._arrays[site].append(chunk, site)
        if obs_chunk is not None:
            self._obs.push(obs_chunk)
        self.n_obs += len(obs)

    def close(self) -> "ActivationStore":
        """Finish the files, write obs + manifest and move the folder into place."""
        for appender in self._arrays.values():
            appender.close()
        self._obs.finish(self._tmp / _OBS, self.n_obs)
        if self._obs.columns:  # a table without columns is stored without rows (open restores them)
            rows = pq.ParquetFile(self._tmp / _OBS).metadata.num_rows
            if rows != self.n_obs:
                raise IntegrityError(f"obs.parquet holds {rows} rows but {self.n_obs} were appended")
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
        self._obs.discard()
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
    # The whole-table writer, now only for obs without rows or columns (StoreWriter streams the rest
    # through _ObsWriter). Parquet needs string column names and no mixed-type object columns.
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
