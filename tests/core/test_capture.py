"""Sites, hooks, capture and collect on HF encoder/decoder models and plain PyTorch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sciscope.core import (
    ActivationStore,
    NonFiniteError,
    Site,
    SiteError,
    capture,
    collect,
    count_hooks,
    list_sites,
    pool,
    resolve_site,
)
from sciscope.core.errors import ShapeError


def test_capture_matches_output_hidden_states_bert(bert, token_batches):
    batch = token_batches[0]
    with capture(bert, ["encoder.layer.0", "encoder.layer.1"]) as cap:
        out = bert(**batch, output_hidden_states=True)
    assert count_hooks(bert) == 0
    torch.testing.assert_close(cap["encoder.layer.0"], out.hidden_states[1])
    torch.testing.assert_close(cap["encoder.layer.1"], out.hidden_states[2])


@pytest.mark.parametrize("fixture,layers", [("gpt2", "transformer.h.{i}"), ("llama", "model.layers.{i}")])
def test_capture_decoders_and_aliases(request, fixture, layers, token_batches):
    model = request.getfixturevalue(fixture)
    aliases = {"resid_post.{i}": layers}
    with capture(model, ["resid_post.1"], aliases=aliases) as cap:
        out = model(**token_batches[0], output_hidden_states=True)
    # the last hidden state of HF decoders has the final norm applied; layer 0's output does not
    with capture(model, ["resid_post.0"], aliases=aliases) as cap0:
        model(**token_batches[0])
    torch.testing.assert_close(cap0["resid_post.0"], out.hidden_states[1])
    assert cap["resid_post.1"].shape == (4, 6, 32)


def test_input_side_is_ffn_neurons(llama, token_batches):
    site = "model.layers.0.mlp.down_proj:input"
    with capture(llama, [site, "model.layers.0.mlp.down_proj"]) as cap:
        llama(**token_batches[0])
    neurons, out = cap[site], cap["model.layers.0.mlp.down_proj"]
    assert neurons.shape[-1] == 64 and out.shape[-1] == 32
    w = llama.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(neurons @ w.T, out, atol=1e-5, rtol=1e-4)


def test_plain_module_and_layout(mlp, conv):
    x = torch.randn(5, 8)
    with capture(mlp, ["layers.1", "layers"]) as cap:
        mlp(x)
    assert cap["layers"].shape == (5, 1, 16)  # no position axis: P = 1
    field = torch.randn(3, 2, 5, 7)
    site = Site("conv1", layout="b c h w")
    with capture(conv, [site]) as cap:
        conv(field)
    acts = cap["conv1"]
    assert acts.shape == (3, 35, 4)  # positions = pixels, features = channels
    ref = conv.conv1(field)
    torch.testing.assert_close(acts[1, 5 * 0 + 2], ref[1, :, 0, 2])


def test_hooks_removed_after_exception(bert, token_batches):
    assert count_hooks(bert) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with capture(bert, ["encoder.layer.0"]):
            bert(**token_batches[0])
            raise RuntimeError("boom")
    assert count_hooks(bert) == 0


def test_unknown_site_lists_close_matches(bert):
    with pytest.raises(SiteError) as e:
        resolve_site(bert, "encoder.layers.1")
    assert "encoder.layer.1" in str(e.value)
    with pytest.raises(SiteError, match="side"):
        Site.parse("encoder.layer.1:sideways")
    assert "encoder.layer.1.output.dense" in list_sites(bert)
    assert all("." in s or s for s in list_sites(bert, leaves_only=True))


def test_pooling_modes():
    acts = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean, _ = pool(acts, "mean", attention_mask=mask)
    torch.testing.assert_close(mean[0], acts[0, :2].mean(0))
    torch.testing.assert_close(mean[1], acts[1].mean(0))
    last, _ = pool(acts, "last", attention_mask=mask)
    torch.testing.assert_close(last, torch.stack([acts[0, 1], acts[1, 2]]))
    first, _ = pool(acts, "first")
    torch.testing.assert_close(first, acts[:, 0])
    rows, kept = pool(acts, "none", attention_mask=mask)
    assert rows.shape == (5, 2) and kept.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
    pm = torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    masked, _ = pool(acts, "masked", position_mask=pm)
    torch.testing.assert_close(masked, torch.stack([acts[0, 1], acts[1, 2]]))
    with pytest.raises(ShapeError, match="position_mask"):
        pool(acts, "masked")


def test_collect_streams_to_store_and_reopens(bert, token_batches, tmp_path):
    obs = pd.DataFrame({"label": list("abcdefgh"), "y": np.arange(8.0)})
    store = collect(bert, token_batches, ["encoder.layer.0", "encoder.layer.1"], out=tmp_path / "s",
                    obs=obs, pooling="mean", seed=3, progress=False)
    assert isinstance(store["encoder.layer.1"], np.memmap)
    assert store.n_obs == 8 and store.dim("encoder.layer.1") == 32
    assert store.manifest["pooling"] == "mean" and store.manifest["seed"] == 3
    assert len(store.manifest["model"]["hash"]) == 64
    # equal to pooling the hidden states by hand
    with torch.no_grad():
        hs = bert(**token_batches[1], output_hidden_states=True).hidden_states[2]
    m = token_batches[1]["attention_mask"].unsqueeze(-1).float()
    expected = (hs * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(store["encoder.layer.1"][4:], expected.numpy(), rtol=1e-5, atol=1e-6)
    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.equals(store)
    assert list(reopened.obs.label) == list("abcdefgh")


def test_collect_pooling_none_expands_obs(gpt2, token_batches, tmp_path):
    obs = pd.DataFrame({"label": list("abcdefgh")})
    store = collect(gpt2, token_batches, ["transformer.h.0"], out=tmp_path / "s", obs=obs,
                    pooling="none", progress=False)
    n_valid = sum(int(b["attention_mask"].sum()) for b in token_batches)
    assert store.n_obs == n_valid
    assert {"example", "position", "label"} <= set(store.obs.columns)
    assert store.obs.groupby("example").position.max().tolist()[:4] == [5, 3, 5, 2]


def test_collect_nan_is_named_and_old_store_survives(mlp, tmp_path):
    good = [torch.randn(4, 8)]
    collect(mlp, good, ["layers.0"], out=tmp_path / "s", progress=False)
    bad = [torch.randn(4, 8), torch.full((4, 8), float("nan"))]
    with pytest.raises(NonFiniteError, match="layers.0"):
        collect(mlp, bad, ["layers.0"], out=tmp_path / "s", progress=False)
    assert ActivationStore.open(tmp_path / "s").n_obs == 4  # the finished store is intact
    assert count_hooks(mlp) == 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_collect_obs_row_mismatch(mlp, tmp_path):
    with pytest.raises(ShapeError, match=r"more examples than obs has rows \(3\)"):
        collect(mlp, [torch.randn(4, 8)], ["layers.0"], out=tmp_path / "s", obs=pd.DataFrame({"a": range(3)}), progress=False)


def test_collect_stop_early_same_values(bert, token_batches, tmp_path):
    a = collect(bert, token_batches, ["encoder.layer.0"], out=tmp_path / "a", progress=False)
    b = collect(bert, token_batches, ["encoder.layer.0"], out=tmp_path / "b", progress=False, stop_early=True)
    np.testing.assert_array_equal(a["encoder.layer.0"], b["encoder.layer.0"])


@pytest.mark.parametrize("pooling,n_shards", [("mean", 2), ("none", 3)])
def test_sharded_collect_merges_to_the_unsharded_store(gpt2, pooling, n_shards, tmp_path):
    """Workers each run every n-th batch; merging their stores gives exactly one collect's store."""
    from sciscope.core import merge_shards

    g = torch.Generator().manual_seed(1)
    batches = []
    for rows in (3, 4, 2, 4, 1):  # ragged batch sizes, padding in some rows
        ids = torch.randint(1, 50, (rows, 5), generator=g)
        mask = torch.ones(rows, 5, dtype=torch.long)
        mask[0, 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    obs = pd.DataFrame({"label": [f"x{i}" for i in range(14)]})
    sites = ["transformer.h.0", "transformer.h.1"]
    whole = collect(gpt2, batches, sites, out=tmp_path / "whole", obs=obs, pooling=pooling, progress=False)
    parts = [collect(gpt2, batches, sites, out=tmp_path / f"shard{i}", obs=obs, pooling=pooling, progress=False,
                     shard=(i, n_shards)) for i in range(n_shards)]
    assert sum(p.n_obs for p in parts) == whole.n_obs and all(p.n_obs < whole.n_obs for p in parts)
    merged = merge_shards(list(reversed(parts)), tmp_path / "merged", remove=True)
    assert merged.equals(whole)
    pd.testing.assert_frame_equal(merged.obs, whole.obs)
    assert merged.manifest["merged_from_shards"] == n_shards and "shard" not in merged.manifest
    assert not (tmp_path / "shard0").exists()  # removed once merged


def test_merge_shards_names_missing_and_foreign_shards(gpt2, token_batches, tmp_path):
    from sciscope.core import SciscopeError, merge_shards

    a = collect(gpt2, token_batches, ["transformer.h.0"], out=tmp_path / "a", progress=False, shard=(0, 2))
    with pytest.raises(SciscopeError, match=r"missing \[1\]"):
        merge_shards([a], tmp_path / "m")
    plain = collect(gpt2, token_batches, ["transformer.h.0"], out=tmp_path / "p", progress=False)
    with pytest.raises(SciscopeError, match="not a capture shard"):
        merge_shards([a, plain], tmp_path / "m")
    other = collect(gpt2, token_batches, ["transformer.h.1"], out=tmp_path / "b", progress=False, shard=(1, 2))
    with pytest.raises(SciscopeError, match="sites/widths/dtype differ"):
        merge_shards([a, other], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="shard must be"):
        collect(gpt2, token_batches, ["transformer.h.0"], out=tmp_path / "x", progress=False, shard=(2, 2))


def test_collect_refuses_to_replace_what_is_not_a_store(mlp, tmp_path):
    """An existing folder or file at ``out`` that is not a store is kept; no batch is run."""
    from sciscope.core import SciscopeError

    ran = []

    def batches():
        ran.append(1)
        yield torch.randn(4, 8)

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    afile = tmp_path / "acts.npy"
    afile.write_bytes(b"data")
    for out in (folder, afile):
        with pytest.raises(SciscopeError, match="exists and is not an activation store; choose another path or delete it"):
            collect(mlp, batches(), ["layers.0"], out=out, progress=False)
    assert ran == [] and (folder / "thesis.tex").read_text() == "years of work" and afile.read_bytes() == b"data"
    collect(mlp, batches(), ["layers.0"], out=tmp_path / "s", progress=False)
    assert collect(mlp, batches(), ["layers.1"], out=tmp_path / "s", progress=False).sites == ["layers.1"]  # a rerun


def test_bad_arguments_are_config_errors(mlp, tmp_path):
    from sciscope.core import ConfigError
    from sciscope.core.capture import pooled_activations

    acts = torch.zeros(2, 3, 4)
    with pytest.raises(ConfigError, match=r"'maen'.*'none', 'mean', 'last', 'first', 'masked'"):
        pool(acts, "maen")
    with pytest.raises(ConfigError, match="'avg'"):
        collect(mlp, [torch.randn(4, 8)], ["layers.0"], out=tmp_path / "s", pooling="avg", progress=False)
    with pytest.raises(ConfigError, match="shard must be"):
        collect(mlp, [torch.randn(4, 8)], ["layers.0"], out=tmp_path / "s", shard=(0, 0), progress=False)
    with pytest.raises(ConfigError, match="one row per example"):
        pooled_activations(mlp, [torch.randn(4, 8)], "layers.0", pooling="none")
    store = ActivationStore.from_arrays(None, {"a": np.zeros((3, 2))})
    with pytest.raises(ConfigError, match="batch_size"):
        next(store.iter_batches("a", batch_size=0))


def test_mean_pooling_leaves_out_the_rule_s_positions_and_massive_norms():
    from sciscope.core.capture import pool

    acts = torch.ones(2, 4, 3)
    acts[:, 0] = 500.0  # a sink at the first position of every example
    acts[1, 2] = 7.0  # an ordinary position that differs
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    plain, _ = pool(acts, "mean", attention_mask=mask)
    assert plain[0, 0] > 100  # the sink dominates the plain mean
    by_rule, _ = pool(acts, "mean", attention_mask=mask, positions=slice(1, None))
    torch.testing.assert_close(by_rule, torch.tensor([[1.0] * 3, [4.0] * 3]))  # padding stays out too
    by_norm, _ = pool(acts, "mean", attention_mask=mask, outlier_norm=10.0)
    torch.testing.assert_close(by_norm, by_rule)  # 500 > 10 x the median norm; 7 is not an outlier
    one_token, _ = pool(acts[:1, :1], "mean", positions=slice(1, None))
    assert one_token[0, 0] == 500.0  # an example left with no position keeps what it had
    assert torch.equal(pool(acts, "last", attention_mask=mask, positions=slice(1, None))[0], pool(acts, "last", attention_mask=mask)[0])
