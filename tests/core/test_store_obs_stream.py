"""StoreWriter streams obs to parquet: same file contents as the whole-table writer, flat memory.

The reference is what the writer did before it streamed: ``pd.concat`` of every obs chunk at
``close`` and one ``to_parquet`` through ``_write_obs`` (which is unchanged and still used for
tables without rows). Each case appends chunks whose column types differ in one way and compares
what ``ActivationStore.open`` and ``pandas.read_parquet`` read back from both files.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sciscope.core import ActivationStore, StoreWriter, merge_shards
from sciscope.core import store as store_module
from sciscope.core.errors import ConfigError, ShapeError


def _old_obs(chunks: list[pd.DataFrame], path) -> pd.DataFrame:
    """What the whole-table writer stored for these chunks, read back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pandas: concat with all-NA entries
        obs = pd.concat([c.reset_index(drop=True) for c in chunks], ignore_index=True)
    store_module._write_obs(obs, path)
    return pd.read_parquet(path)


def _write(path, chunks: list[pd.DataFrame], row_group: int = 3) -> ActivationStore:
    with StoreWriter(path, ["a"], obs_row_group=row_group) as w:
        for c in chunks:
            w.append({"a": np.ones((len(c), 2), dtype=np.float32)}, c)
        return w.close()


def _rich(n: int, seed: int = 0) -> pd.DataFrame:
    """One obs table with every common dtype (nulls included), sliced into chunks by the cases."""
    rng = np.random.default_rng(seed)
    region = pd.CategoricalDtype(["south", "north", "east", "unused"], ordered=True)
    return pd.DataFrame({
        "example": np.arange(n),
        "small": np.arange(n, dtype=np.int16),
        "x": np.where(rng.random(n) < 0.3, np.nan, rng.normal(size=n)),
        "f32": rng.normal(size=n).astype(np.float32),
        "token": rng.choice(np.array(["a", "bb", "ccc"], dtype=object), n),
        "motif": rng.choice(np.array(["GATA", None], dtype=object), n),
        "region": pd.Categorical.from_codes(rng.integers(0, 3, n), dtype=region),
        "split": pd.Categorical(rng.choice(["train", "test"], n), categories=["train", "test"]),
        "flag": rng.random(n) < 0.5,
        "when": pd.date_range("2024-01-01", periods=n, freq="h", tz="UTC"),
        "name": pd.array(rng.choice(["p", "q", None], n), dtype="string"),
        "count": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(0, 9, n)), dtype="Int64"),
    })


def _slices(df: pd.DataFrame, sizes: list[int]) -> list[pd.DataFrame]:
    bounds = np.cumsum([0, *sizes])
    return [df.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# chunk lists whose joined obs the streamed file must reproduce exactly
CASES = {
    "slices of one table": _slices(_rich(23), [5, 7, 1, 6, 4]),
    "int then float with NaN": [pd.DataFrame({"v": [1, 2]}), pd.DataFrame({"v": [np.nan, 2.5]}),
                                pd.DataFrame({"v": [7, 8, 9]})],
    "int32 then int64": [pd.DataFrame({"v": np.array([1, 2], np.int32)}), pd.DataFrame({"v": np.array([2**40])})],
    "float32 then float64": [pd.DataFrame({"v": np.array([0.5], np.float32)}), pd.DataFrame({"v": [0.1, 0.2]})],
    "categories differ": [pd.DataFrame({"c": pd.Categorical(["a", "b"])}), pd.DataFrame({"c": pd.Categorical(["c", "a"])}),
                          pd.DataFrame({"c": pd.Categorical(["b"], categories=["b", "z"])})],
    "categorical then plain strings": [pd.DataFrame({"c": pd.Categorical(["a", "b"])}), pd.DataFrame({"c": ["z", "a"]})],
    "ints and strings in one column": [pd.DataFrame({"m": [1, "a", 2]}), pd.DataFrame({"m": ["b", "c"]})],
    "int chunk then string chunk": [pd.DataFrame({"m": [1, 2]}), pd.DataFrame({"m": ["b", "c", "d"]}),
                                    pd.DataFrame({"m": [3.5]})],
    "ints and floats as objects": [pd.DataFrame({"m": pd.Series([1, 2], dtype=object)}),
                                   pd.DataFrame({"m": pd.Series([1.5], dtype=object)})],
    "bool chunk then int chunk": [pd.DataFrame({"b": [True, False]}), pd.DataFrame({"b": [0, 1]})],
    "all-None first, strings later": [pd.DataFrame({"s": [None] * 4, "k": range(4)}),
                                      pd.DataFrame({"s": ["x", None], "k": [4, 5]}),
                                      pd.DataFrame({"s": [None], "k": [6]}), pd.DataFrame({"s": ["y"], "k": [7]})],
    "all-None first, strings within the row group": [pd.DataFrame({"s": [None]}), pd.DataFrame({"s": ["x", None]})],
    "object ints, then all-None": [pd.DataFrame({"o": pd.Series([1, 2], dtype=object)}),
                                   pd.DataFrame({"o": pd.Series([None, None], dtype=object)})],
    "floats, then all-None objects": [pd.DataFrame({"o": [1.5, np.nan]}), pd.DataFrame({"o": [None, None]})],
    "all NaN floats, then strings": [pd.DataFrame({"o": [np.nan, np.nan]}), pd.DataFrame({"o": ["u", "v"]})],
    "columns reordered": [pd.DataFrame({"p": [1], "q": ["a"]}), pd.DataFrame({"q": ["b", "c"], "p": [2, 3]})],
    "integer column labels": [pd.DataFrame({0: [1, 2], 1: ["a", "b"]}), pd.DataFrame({0: [3], 1: ["c"]})],
    "empty slices between": _slices(_rich(6), [2, 0, 3, 0, 1]),
}


@pytest.mark.parametrize("row_group", [1, 3, 65536])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_obs_equals_the_whole_table_writer(tmp_path, case, row_group):
    chunks = CASES[case]
    expected = _old_obs(chunks, tmp_path / "old.parquet")
    store = _write(tmp_path / "s", chunks, row_group)
    pd.testing.assert_frame_equal(store.obs, expected)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s" / "obs.parquet"), expected)
    reopened = ActivationStore.open(tmp_path / "s")  # verifies the sha256 of obs.parquet too
    pd.testing.assert_frame_equal(reopened.obs, expected)
    assert reopened.n_obs == len(expected) == sum(map(len, chunks))
    assert [p.name for p in (tmp_path / "s").iterdir()] and not list((tmp_path / "s").glob(".obs.part-*"))


def test_one_part_file_is_kept_and_row_groups_bound_the_buffer(tmp_path, monkeypatch):
    """Chunks that agree are written once (no rewrite at close), one row group per ``obs_row_group`` rows."""
    casts = []
    real_cast = store_module._ObsWriter._cast
    monkeypatch.setattr(store_module._ObsWriter, "_cast",
                        staticmethod(lambda *a: casts.append(1) or real_cast(*a)))
    chunks = _slices(_rich(40), [4] * 10)
    _write(tmp_path / "s", chunks, row_group=8)
    assert casts == []  # the part written while appending became obs.parquet as it was
    meta = pq.ParquetFile(tmp_path / "s" / "obs.parquet").metadata
    assert meta.num_rows == 40 and meta.num_row_groups == 5
    assert all(meta.row_group(i).num_rows == 8 for i in range(5))
    # chunks that disagree are rewritten at close, still row group by row group
    _write(tmp_path / "t", CASES["int then float with NaN"], row_group=2)
    assert len(casts) >= 2


def test_nulls_stay_null_in_a_column_written_as_text(tmp_path):
    """Deliberate difference from the whole-table writer, which wrote None and NaN as "None" and "nan"."""
    chunks = [pd.DataFrame({"m": [1, "a", None]}), pd.DataFrame({"m": [np.nan, 2.5]}), pd.DataFrame({"m": [None]})]
    store = _write(tmp_path / "s", chunks)
    assert store.obs.m.tolist() == ["1", "a", None, None, "2.5", None]
    old = _old_obs(chunks, tmp_path / "old.parquet")
    assert old.m.tolist() == ["1", "a", "None", "nan", "2.5", "None"]


def test_a_chunk_without_rows_does_not_change_the_dtypes(tmp_path):
    """Deliberate difference: an empty object chunk made pd.concat turn an int column into float64."""
    chunks = [pd.DataFrame({"v": [1, 2], "s": ["a", "b"]}), pd.DataFrame({"v": [], "s": []}),
              pd.DataFrame({"v": [3], "s": ["c"]})]
    store = _write(tmp_path / "s", chunks)
    assert store.obs.v.dtype == np.int64 and store.obs.v.tolist() == [1, 2, 3]
    assert _old_obs(chunks, tmp_path / "old.parquet").v.dtype == np.float64
    pd.testing.assert_frame_equal(store.obs, _old_obs([chunks[0], chunks[2]], tmp_path / "old2.parquet"))


def test_a_chunk_with_other_columns_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ShapeError, match=r"obs chunk at row 2 lacks column\(s\) \['g'\]; every obs chunk must have "
                                         r"the columns of the first: \['i', 'g'\]"):
        with StoreWriter(tmp_path / "s", ["a"]) as w:
            w.append({"a": np.zeros((2, 2))}, pd.DataFrame({"i": [0, 1], "g": ["x", "y"]}))
            w.append({"a": np.zeros((1, 2))}, pd.DataFrame({"i": [2]}))
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())
    w = StoreWriter(tmp_path / "s", ["a"], obs_row_group=1)
    w.append({"a": np.zeros((2, 2))}, pd.DataFrame({"i": [0, 1]}))
    with pytest.raises(ShapeError, match=r"row 2 has new column\(s\) \['extra'\]"):
        w.append({"a": np.ones((1, 2))}, pd.DataFrame({"i": [2], "extra": [1.0]}))
    with pytest.raises(ShapeError, match=r"lacks column\(s\) \['i'\] and has new column\(s\) \['j'\]"):
        w.append({"a": np.ones((1, 2))}, pd.DataFrame({"j": [2]}))
    with pytest.raises(ShapeError, match=r"duplicate column names \['i'\]"):
        w.append({"a": np.ones((1, 2))}, pd.DataFrame([[1, 2]], columns=["i", "i"]))
    with pytest.raises(ShapeError, match=r"obs chunk at row 2 cannot be written to parquet.*column i"):
        w.append({"a": np.ones((1, 2))}, pd.DataFrame({"i": [object()]}))
    # a refused chunk wrote nothing: neither its activations nor its rows
    w.append({"a": np.full((1, 2), 3.0)}, pd.DataFrame({"i": [9]}))
    store = w.close()
    assert store.obs.i.tolist() == [0, 1, 9]
    np.testing.assert_array_equal(store["a"][:, 0], [0, 0, 3])


def test_obs_row_group_is_checked_before_anything_is_made(tmp_path):
    with pytest.raises(ConfigError, match="obs_row_group must be >= 1, got 0"):
        StoreWriter(tmp_path / "s", ["a"], obs_row_group=0)
    assert not list(tmp_path.iterdir())


def test_abort_removes_the_part_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(tmp_path / "s", ["a"], obs_row_group=1) as w:
            for i in range(3):
                w.append({"a": np.zeros((2, 2))}, pd.DataFrame({"s": [None, None] if i == 1 else ["x", "y"]}))
            tmp = w._tmp
            assert list(tmp.glob(".obs.part-*.parquet"))  # rows already on disk
            raise RuntimeError("boom")
    assert not tmp.exists() and not (tmp_path / "s").exists()
    assert not list(tmp_path.iterdir())


def test_tables_without_rows_or_columns(tmp_path):
    store = _write(tmp_path / "nocols", [pd.DataFrame(index=range(3)), pd.DataFrame(index=range(2))])
    assert store.n_obs == 5 and list(store.obs.columns) == []
    no_rows = pd.DataFrame({"v": pd.Series([], dtype=np.int32), "s": pd.Series([], dtype=object)})
    empty = _write(tmp_path / "norows", [no_rows, no_rows])
    assert empty.n_obs == 0 and list(empty.obs.columns) == ["v", "s"] and empty.obs.v.dtype == np.int32
    with StoreWriter(tmp_path / "nothing", ["a"]) as w:
        nothing = w.close()
    assert nothing.n_obs == 0


def test_merge_shards_and_save_keep_a_rich_obs(tmp_path):
    df = _rich(18)
    parts = []
    for i in range(2):
        batches = [[b, 3] for b in range(6) if b % 2 == i]
        shard = {"index": i, "count": 2, "n_batches": 6, "batches": batches}
        with StoreWriter(tmp_path / f"p{i}", ["a"], manifest={"shard": shard}, obs_row_group=2) as w:
            for b, _ in batches:
                w.append({"a": np.full((3, 2), b, dtype=np.float32)}, df.iloc[3 * b : 3 * b + 3])
        parts.append(tmp_path / f"p{i}")
    merged = merge_shards(parts, tmp_path / "m")
    pd.testing.assert_frame_equal(merged.obs, df)
    np.testing.assert_array_equal(merged["a"][:, 0], np.repeat(np.arange(6), 3))
    sel = merged.query("flag").save(tmp_path / "sel", chunk_rows=4)
    pd.testing.assert_frame_equal(ActivationStore.open(tmp_path / "sel").obs, df[df.flag].reset_index(drop=True))
    assert sel.n_obs == int(df.flag.sum())


def test_obs_memory_does_not_grow_with_rows(tmp_path):
    """30x more rows of a string-rich obs must not raise the writer's peak memory much.

    Peak = Python allocations (tracemalloc: pandas and numpy) + Arrow's pool, both measured in a
    child interpreter (tracemalloc races with other threads on CPython < 3.12.9, gh-128679).
    Holding every chunk until close, as the writer used to, grows the first ~30x.
    """
    script = textwrap.dedent(
        """
        import sys, tracemalloc
        from pathlib import Path
        import numpy as np, pandas as pd, pyarrow as pa
        from sciscope.core import StoreWriter

        def chunk(i, rows=2000):
            rng = np.random.default_rng(i)
            return pd.DataFrame({
                "id": [f"seq_{i}_{r}" for r in range(rows)],
                "token": [f"tok{v}" for v in rng.integers(0, 50000, rows)],
                "g": pd.Categorical(rng.choice(["a", "b", "c"], rows), categories=["a", "b", "c"]),
                "x": rng.normal(size=rows), "k": np.arange(rows) + i * rows,
            })

        def peak(n_chunks):
            chunk(0)
            pool = pa.default_memory_pool()
            base = pool.bytes_allocated()
            tracemalloc.start()
            w = StoreWriter(Path(sys.argv[1]) / f"m{n_chunks}", ["a"], obs_row_group=4000)
            for i in range(n_chunks):
                w.append({"a": np.ones((2000, 4), dtype=np.float32)}, chunk(i))
            _, p = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            arrow = pool.max_memory() - base
            w.close()
            return p + arrow

        print(peak(2), peak(60))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    small, large = map(int, out.stdout.split())
    assert large < 2 * small, (small, large)
