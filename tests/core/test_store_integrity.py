"""Nothing lost, nothing silently wrong: overwrite rule, checksums, truncation, stale temp folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from sciscope.core import ActivationStore, StoreWriter
from sciscope.core.errors import IntegrityError, SciscopeError


def _write(path, rows=12, seed=0):
    rng = np.random.default_rng(seed)
    with StoreWriter(path, ["a", "b:input"]) as w:
        w.append({"a": rng.normal(size=(rows, 4)), "b:input": rng.normal(size=(rows, 2))},
                 pd.DataFrame({"i": np.arange(rows)}))
    return ActivationStore.open(path)


# -- (a) an existing path that is not a store is never replaced ---------------------------------------


def test_writer_refuses_a_folder_or_file_that_is_not_a_store(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(SciscopeError, match=r"results exists and is not an activation store; choose another path"):
        StoreWriter(folder, ["a"])
    assert (folder / "notes.txt").read_text() == "keep me"
    afile = tmp_path / "table.csv"
    afile.write_text("x\n1\n")
    store = _write(tmp_path / "s")
    with pytest.raises(SciscopeError, match="table.csv exists and is not an activation store"):
        store.save(afile)
    assert afile.read_text() == "x\n1\n"
    # a store and an empty folder may be replaced (reruns rely on the first)
    assert store.save(tmp_path / "s2").equals(store)
    assert store.select([0, 1]).save(tmp_path / "s2").n_obs == 2
    (tmp_path / "empty").mkdir()
    assert store.save(tmp_path / "empty").n_obs == 12
    # something that appears at the path while the writer runs is kept too
    with pytest.raises(SciscopeError, match="late exists and is not an activation store"):
        with StoreWriter(tmp_path / "late", ["a"]) as w:
            w.append({"a": np.zeros((2, 2))}, pd.DataFrame(index=range(2)))
            (tmp_path / "late").write_text("arrived meanwhile")
    assert (tmp_path / "late").read_text() == "arrived meanwhile"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_shards_refuses_a_folder_that_is_not_a_store(tmp_path):
    from sciscope.core import merge_shards

    rng = np.random.default_rng(0)
    parts = []
    for i in range(2):
        shard = {"index": i, "count": 2, "n_batches": 2, "batches": [[i, 3]]}
        with StoreWriter(tmp_path / f"p{i}", ["a"], manifest={"shard": shard}) as w:
            w.append({"a": rng.normal(size=(3, 2))}, pd.DataFrame({"i": np.arange(3) + 3 * i}))
        parts.append(tmp_path / f"p{i}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(SciscopeError, match="not an activation store"):
        merge_shards(parts, out)
    assert (out / "data.bin").exists()
    merged = merge_shards(parts, tmp_path / "m")
    assert merged.obs.i.tolist() == list(range(6))
    assert set(merged.manifest["sha256"]) == {"obs.parquet", "arrays/a.npy"}


# -- (b) checksums --------------------------------------------------------------------------------------


def test_manifest_records_checksums_and_open_verifies_them(tmp_path):
    store = _write(tmp_path / "s")
    assert set(store.manifest["sha256"]) == {"obs.parquet", "arrays/a.npy", "arrays/b-input.npy"}
    assert all(len(h) == 64 for h in store.manifest["sha256"].values())
    before = np.array(store["a"])
    del store
    # shuffle the rows of one array in place: same size, same values, wrong rows
    arr = np.load(tmp_path / "s" / "arrays" / "a.npy", mmap_mode="r+")
    arr[:] = arr[np.random.default_rng(1).permutation(len(arr))]
    arr.flush()
    del arr
    with pytest.raises(IntegrityError, match=r"arrays/a\.npy.*changed since the store was written"):
        ActivationStore.open(tmp_path / "s")
    shuffled = ActivationStore.open(tmp_path / "s", verify=False)  # a caller may skip the check
    assert not np.array_equal(shuffled["a"], before)


def test_changed_obs_table_is_caught(tmp_path):
    _write(tmp_path / "s")
    obs = pd.read_parquet(tmp_path / "s" / "obs.parquet")
    obs.iloc[::-1].reset_index(drop=True).to_parquet(tmp_path / "s" / "obs.parquet", index=False)
    with pytest.raises(SciscopeError, match=r"obs\.parquet.*changed since"):
        ActivationStore.open(tmp_path / "s")


def test_store_without_checksums_still_opens(tmp_path):
    """Stores written before checksums existed open as before (the check is skipped)."""
    store = _write(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["sha256"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert ActivationStore.open(tmp_path / "s").equals(store)


# -- (c) truncated array file ---------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_array_names_file_and_sizes(tmp_path, verify):
    _write(tmp_path / "s")
    f = tmp_path / "s" / "arrays" / "a.npy"
    full = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(full - 20)
    with pytest.raises(SciscopeError, match=rf"a\.npy.*{full} bytes.*{full - 20}"):
        ActivationStore.open(tmp_path / "s", verify=verify)


# -- (e) stale temporary folders of killed writers ------------------------------------------------------


def test_stale_writing_folders_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f".s.writing-{2**31 - 1}"  # no process can have this pid
    alive = tmp_path / f".s.writing-{os.getppid()}"  # a live process that is not us: its business
    other = tmp_path / f".t.writing-{2**31 - 1}"  # another store's folder
    for d in (dead, alive, other):
        (d / "arrays").mkdir(parents=True)
        (d / "arrays" / "a.npy").write_bytes(b"partial")
    _write(tmp_path / "s")
    assert not dead.exists()
    assert alive.exists() and other.exists()
