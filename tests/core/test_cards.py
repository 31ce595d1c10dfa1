"""Feature cards: which features get one, what a card holds, and the offline browser in a real browser."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sciscope.core.cards import (DUPLICATE_COSINE, PER_BAND, FeatureCard, Panel, _examples, feature_browser_html,
                                 read_cards, select_features, write_cards)
from sciscope.core.features import FeatureAnalysis, analyze_features

EVIL = "<script>alert(1)</script>"


def _analysis(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, FeatureAnalysis]:
    rng = np.random.default_rng(seed)
    n, f = 300, 40
    label = rng.integers(0, 2, n)
    acts = np.maximum(rng.standard_normal((n, f)) - 0.5, 0)
    acts[:, 3] = np.where(label == 1, 2.0 + rng.random(n), 0.0)  # planted: fires on the label only
    acts[:, 7] = np.where(label == 1, 0.3 * rng.random(n), 0.0) + np.where(label == 0, rng.random(n), 0.0)
    acts[:, [10, 11, 12]] = 0.0  # dead
    obs = pd.DataFrame({"label": label, "name": [f"ex{i}" for i in range(n)]})
    return acts, obs, analyze_features(acts, obs, concepts=["label"], control=True, seed=0)


def test_the_top_cards_follow_the_interest_and_the_controls_are_other_live_features():
    _, _, analysis = _analysis()
    chosen = select_features(analysis, n_top=3, n_control=5, seed=1, always=[20])
    top = [f for f, sel, _, _ in chosen if sel == "top"]
    controls = [f for f, sel, _, _ in chosen if sel == "control"]
    assert top[0] == 3 and 20 in top  # the planted feature leads; a feature a plan used is always carded
    assert len(controls) == 5 and not set(controls) & set(top) and not set(controls) & {10, 11, 12}  # live, disjoint
    assert select_features(analysis, n_top=3, n_control=5, seed=1, always=[20]) == chosen  # seeded
    assert "strongest concept: label=1 (auroc" in chosen[0][2]
    assert [c[0] for c in select_features(analysis, n_top=3, n_control=5, seed=2)] != [c[0] for c in chosen]
    # a declared ranking column is used, and a missing one is named
    analysis.extra = pd.DataFrame({"feature": np.arange(40), "moran": np.where(np.arange(40) == 30, -5.0, 0.1)})
    assert select_features(analysis, ranking="moran", n_top=1, n_control=0)[0][0] == 30  # ranked by |value|
    with pytest.raises(Exception, match="'nope' is not a column"):
        select_features(analysis, ranking="nope")
    # a statistic undefined for some features ranks the others; undefined for all, the default ranks and says so
    analysis.extra["moran"] = np.where(np.arange(40) == 30, np.nan, analysis.extra["moran"])
    assert 30 not in [c[0] for c in select_features(analysis, ranking="moran", n_top=5, n_control=0)]
    analysis.extra["moran"] = np.nan
    first = select_features(analysis, ranking="moran", n_top=1, n_control=0)[0]
    assert first[0] == 3 and "'moran' is undefined for every feature" in first[2]


def test_top_cards_spread_over_concepts_before_repeating_one():
    acts, obs, _ = _analysis()
    rng = np.random.default_rng(5)
    obs = obs.assign(other=rng.integers(0, 2, len(obs)))
    for j in range(20, 26):  # six strong detectors of the label, one weaker detector of another concept
        acts[:, j] = np.where(obs.label == 1, 3.0 + rng.random(len(obs)), 0.0)
    acts[:, 30] = np.where(obs.other == 1, 1.0 + rng.random(len(obs)), 0.2 * rng.random(len(obs)))
    analysis = analyze_features(acts, obs, concepts=["label", "other"], control=False)
    plain = [f for f, *_ in select_features(analysis, n_top=3, n_control=0, per_concept=None)]
    spread = [f for f, *_ in select_features(analysis, n_top=3, n_control=0, per_concept=2)]
    best = analysis.features.set_index("feature")["best_concept"]
    assert set(best[plain]) == {"label"}  # the plain ranking: all three on one concept
    assert spread[2] == 30 and list(best[spread]) == ["label", "label", "other"]
    # with no other concept left, the ranking fills the places
    more = [f for f, *_ in select_features(analysis, n_top=5, n_control=0, per_concept=2)]
    assert more[:3] == spread and list(best[more[3:]]) == ["label", "label"]


def test_examples_are_the_top_rows_then_rows_near_lower_quantiles_of_the_nonzero_values():
    rng = np.random.default_rng(0)
    column = np.where(rng.random(200) < 0.5, rng.exponential(1.0, 200), 0.0)
    obs = pd.DataFrame({"name": [f"ex{i}" for i in range(200)]})
    ex = _examples(column, obs, k=5)
    top = ex[ex.band == "top"]
    assert list(top.row) == list(np.argsort(-column, kind="stable")[:5]) and list(top["name"]) == [f"ex{r}" for r in top.row]
    nz = column[column > 0]
    for band, q in (("q75", 0.75), ("q50", 0.5), ("q25", 0.25)):
        rows = ex[ex.band == band]
        assert len(rows) == PER_BAND and (rows.activation > 0).all()
        # nearest to the quantile among the non-zero values (the zeros are not what the feature does)
        assert abs(rows.activation.iloc[0] - np.quantile(nz, q)) <= np.sort(np.abs(nz - np.quantile(nz, q)))[PER_BAND + 5]
    assert ex.row.is_unique
    # a feature that fires on fewer rows than k: its top rows only, no lower bands, integer rows
    rare = np.zeros(50)
    rare[[4, 9]] = [1.0, 2.0]
    ex = _examples(rare, obs.iloc[:50], k=5)
    assert list(ex.row) == [9, 4] and ex.row.dtype.kind == "i" and set(ex.band) == {"top"}
    assert len(_examples(np.zeros(50), obs.iloc[:50], k=5)) == 0  # a dead feature: nothing to show


def _png(color: str = "C0") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1], color=color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    plt.close(fig)
    return buf.getvalue()


def _cards() -> list[FeatureCard]:
    cards = []
    for f, sel, concept in ((3, "top", "halogen"), (8, "top", "nitro"), (21, "control", None)):
        assoc = [{"concept": concept, "value": True, "statistic": 0.9, "effect": 0.8, "q": 1e-5, "significant": True}] if concept else []
        cards.append(FeatureCard(feature=f, selection=sel, reason=f"reason {EVIL}", interest=0.8 if concept else 0.01,
                                 stats={"density": 0.1, "mean_active": 1.0, "max": 2.0, "n_rows": 100},
                                 examples=[{"band": "top", "rank": 1, "activation": 2.0, "row": 5, "name": f"mol{f}"}],
                                 columns=["name"], associations=assoc, lens=[{"token": "[Cl]", "score": 1.5}] if f == 3 else [],
                                 duplicates=[{"feature": 9, "cosine": 0.95}] if f == 8 else [],
                                 histogram=Panel("activations", _png()), panels=[Panel("examples", _png("C1"), "coloured")]))
    return cards


def test_cards_round_trip_through_json_and_escape_what_they_show(tmp_path: Path):
    cards = _cards()
    back = read_cards(write_cards(cards, tmp_path / "cards.json"))
    assert [c.to_dict() for c in back] == [c.to_dict() for c in cards]
    assert back[0].panels[0].png == cards[0].panels[0].png
    html = back[0].html()
    assert EVIL not in html and "&lt;script&gt;" in html
    assert back[0].concepts == ["halogen=True"] and "[cl]" in back[0].search_text()
    assert f"cosine &gt; {DUPLICATE_COSINE}" in back[1].html() and "feature 9 (0.95)" in back[1].html()


def test_the_browser_works_offline_its_search_narrows_and_it_counts_broken_images(tmp_path: Path):
    from tests.browser import dump_dom

    page = tmp_path / "features.html"
    page.write_text(feature_browser_html(_cards(), title="cards", report_href="report.html"))
    text = page.read_text().lower()
    for bad in ('src="http', 'href="http', "@import", "url(", "<link"):
        assert bad not in text, bad  # nothing fetched: it opens from a file with no network

    def shown(dom: str) -> list[int]:
        return [int(m) for m in re.findall(r'<article class="card" id="card-(\d+)"', dom)
                if not re.search(rf'id="card-{m}"[^>]*\shidden', dom)]

    everything = dump_dom(page, tmp_path / "profile")
    assert re.search(r'data-shown="3"', everything) and 'data-broken-images="0"' in everything
    assert 'data-images="6"' in everything and shown(everything) == [3, 8, 21]
    for query, expected in (("halogen", [3]), ("f21", [21]), ("%5Bcl%5D", [3]), ("nothing-matches", [])):
        dom = dump_dom(page, tmp_path / "profile", query=query)
        assert shown(dom) == expected, (query, shown(dom))
        assert f'data-shown="{len(expected)}"' in dom
    # the control: a page with a broken picture is caught by the same DOM check
    cards = _cards()
    cards[1].panels[0] = Panel("broken", b"not a png")
    page.write_text(feature_browser_html(cards, title="cards"))
    assert 'data-broken-images="1"' in dump_dom(page, tmp_path / "profile")
