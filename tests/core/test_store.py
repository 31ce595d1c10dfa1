"""ActivationStore: chunked writes, reopen, selection, batches, AnnData, flat memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from sciscope.core import ActivationStore, NonFiniteError, StoreWriter
from sciscope.core.errors import SciscopeError, ShapeError, SiteError


def _write(path, n_chunks=3, rows=10, seed=0):
    rng = np.random.default_rng(seed)
    chunks = []
    with StoreWriter(path, ["a", "b:input"], manifest={"seed": seed}) as w:
        for i in range(n_chunks):
            a, b = rng.normal(size=(rows, 4)), rng.normal(size=(rows, 2))
            obs = pd.DataFrame({"i": np.arange(i * rows, (i + 1) * rows), "g": rng.choice(["x", "y"], rows)})
            w.append({"a": a, "b:input": b}, obs)
            chunks.append((a, b, obs))
    return chunks


def test_reopened_store_equals_what_was_written(tmp_path):
    chunks = _write(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    np.testing.assert_array_equal(store["a"], np.concatenate([c[0] for c in chunks]).astype(np.float32))
    np.testing.assert_array_equal(store["b:input"], np.concatenate([c[1] for c in chunks]).astype(np.float32))
    pd.testing.assert_frame_equal(store.obs, pd.concat([c[2] for c in chunks], ignore_index=True))
    assert store.manifest["seed"] == 0 and store.manifest["n_obs"] == 30
    assert store.manifest["sites"]["a"]["d"] == 4
    copy = store.save(tmp_path / "copy")
    assert copy.equals(store)


def test_select_query_and_batches(tmp_path):
    _write(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    sel = store.query("g == 'x'")
    assert (sel.obs.g == "x").all()
    np.testing.assert_array_equal(sel["a"], store["a"][store.obs.g.to_numpy() == "x"])
    sub = store[np.array([5, 2, 7])]
    np.testing.assert_array_equal(sub["a"], store["a"][[5, 2, 7]])
    assert sub.select([1]).obs.i.tolist() == [2]
    batches = list(store.iter_batches("a", batch_size=8, shuffle=True, seed=1))
    assert [len(b) for b in batches] == [8, 8, 8, 6]
    stacked = np.concatenate([b.numpy() for b in batches])
    np.testing.assert_array_equal(np.sort(stacked, axis=0), np.sort(store["a"], axis=0))
    again = np.concatenate([b.numpy() for b in store.iter_batches("a", batch_size=8, shuffle=True, seed=1)])
    np.testing.assert_array_equal(stacked, again)
    assert not np.array_equal(stacked, np.asarray(store["a"]))  # shuffled
    assert len(list(store.iter_batches("a", batch_size=8, drop_last=True))) == 3


def test_to_anndata(tmp_path):
    _write(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    ad = store.to_anndata()
    assert ad.shape == (30, 4) and set(ad.obsm) == {"a", "b:input"}
    assert list(ad.obs.g) == list(store.obs.g)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(NonFiniteError, match="site 'a'.*obs row 3"):
        with StoreWriter(tmp_path / "s", ["a"]) as w:
            bad = np.zeros((5, 2))
            bad[3, 1] = np.inf
            w.append({"a": bad}, pd.DataFrame(index=range(5)))
    assert not (tmp_path / "s").exists()
    with pytest.raises(ShapeError, match="width 3"):
        with StoreWriter(tmp_path / "s", ["a"]) as w:
            w.append({"a": np.zeros((2, 2))}, pd.DataFrame(index=range(2)))
            w.append({"a": np.zeros((2, 3))}, pd.DataFrame(index=range(2)))
    with pytest.raises(ShapeError, match="obs chunk has 1"):
        with StoreWriter(tmp_path / "s", ["a"]) as w:
            w.append({"a": np.zeros((2, 2))}, pd.DataFrame(index=range(1)))
    store = ActivationStore.from_arrays(None, {"layer.1": np.zeros((3, 2))})
    with pytest.raises(SiteError, match="layer.1"):
        store["layer1"]
    with pytest.raises(SciscopeError, match="not an activation store"):
        ActivationStore.open(tmp_path)


def test_memory_does_not_grow_with_examples(tmp_path):
    """Writing 20x more rows must not raise peak traced memory 20x (chunks are flushed).

    tracemalloc runs in a child interpreter: on CPython < 3.12.9, ``tracemalloc.stop()`` races
    with any other Python thread that allocates (tqdm's monitor thread lives in this process by
    now) and can crash the interpreter later (CPython gh-128679).
    """
    script = textwrap.dedent(
        """
        import sys, tracemalloc
        from pathlib import Path
        import numpy as np, pandas as pd
        from sciscope.core import StoreWriter

        def peak(n_chunks):
            tracemalloc.start()
            with StoreWriter(Path(sys.argv[1]) / f"m{n_chunks}", ["a"]) as w:
                for _ in range(n_chunks):
                    w.append({"a": np.ones((1000, 64), dtype=np.float32)}, pd.DataFrame({"k": np.zeros(1000)}))
            _, p = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return p

        print(peak(2), peak(40))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    small, large = map(int, out.stdout.split())
    assert large < 3 * small  # obs rows are tiny; the activations are streamed to disk
