"""The HTML run report: self-contained, escaped, agreeing with the run's tables, and it renders."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest

from sciscope.core.errors import SciscopeError
from sciscope.core.io import write_json, write_table, write_text
from sciscope.pipelines.layout import STAGES, write_headline
from sciscope.pipelines.report import build_report, format_number, headline_values, main

EVIL = "<script>alert(1)</script>"


def _figure(path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=60)
    ax.plot(rng.standard_normal(20).cumsum(), color="C0", lw=2)
    ax.set_title(f"figure {seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A fake run: examples, probes and steering ran (with tables, figures, notes); the rest did not."""
    run = tmp_path / "runs" / "chemistry" / "quick"
    write_json(run / "run.json", {
        "domain": "chemistry", "run": "quick",
        "model": {"name": "tiny-roberta", "class": "RobertaForMaskedLM", "params": 123456, "hash": "ab12cd34"},
        "data": {"description": "molecules bundled with rdkit", "n_examples": 512},
        "config": {"seed": 0, "probe": {"alpha": 1.0}, "comment": EVIL},
        "stages": {"examples": 0.51234, "probes": 12.3456, "steering": 3.0},
    })

    rng = np.random.default_rng(0)
    write_table(run / "examples" / "obs.csv", pd.DataFrame({"smiles": ["CCO", "c1ccccc1", "CC(=O)O"],
                                                            "logp": [-0.14, 1.69, 0.09]}))
    write_json(run / "examples" / "done.json", {"seconds": 0.51, "params": {"n": 3}})

    scores = pd.DataFrame({"layer": range(4), "r2": rng.uniform(0.2, 0.9, 4), "r2_shuffled": rng.uniform(-0.1, 0.05, 4)})
    write_table(run / "probes" / "scores.csv", scores)
    big = pd.DataFrame({"i": range(40), "x": rng.standard_normal(40)})
    write_table(run / "probes" / "per_example.parquet", big)
    _figure(run / "probes" / "score_vs_layer.png", 1)
    _figure(run / "probes" / "extra" / "nested.png", 2)
    write_text(run / "probes" / "notes.md", f"Probes ran fine. {EVIL} & more\n")
    best = scores.loc[scores.r2.idxmax()]
    write_headline(run / "probes", [{
        "stage": "probes", "name": "best layer R2 (logp)", "value": float(best.r2),
        "control": float(best.r2_shuffled), "control_label": "shuffled labels", "unit": "R2",
        "note": "ridge probe, 5-fold", "source": "probes/scores.csv"}])
    write_json(run / "probes" / "done.json", {"seconds": 12.3456, "params": {"alpha": 1.0}})

    sweep = pd.DataFrame({"alpha": [0.0, 1.0, 2.0], "score": [0.1, 0.4, 0.7], "random": [0.1, 0.11, 0.09]})
    write_table(run / "steering" / "sweep.csv", sweep)
    _figure(run / "steering" / "sweep.png", 3)
    write_headline(run / "steering", [{
        "stage": "steering", "name": f"shift at alpha=2 {EVIL}", "value": float(sweep.score.iloc[-1]),
        "control": float(sweep.random.iloc[-1]), "control_label": "random direction", "unit": "",
        "note": "", "source": "steering/sweep.csv"}])
    os.makedirs(run / "logs")
    (run / "logs" / "probes.log").write_text("ok\n")
    return run


def test_one_self_contained_file(run: Path):
    out = build_report(run)
    assert out == run / "report" / "report.html"
    assert [p.name for p in (run / "report").iterdir()] == ["report.html"]
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # every figure embedded as a data URI, byte for byte
    pngs = sorted(run.rglob("*.png"))
    assert len(pngs) == 3
    for p in pngs:
        assert base64.b64encode(p.read_bytes()).decode() in text
    assert text.count('src="data:image/png;base64,') == 3
    # nothing external: no remote sources or links, no scripts, no CSS imports or url()
    lowered = text.lower()
    for bad in ('src="http', "src='http", 'href="http', "href='http", "<script", "@import", "url(", "<link"):
        assert bad not in lowered, bad
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', text))


def test_tables_linked_relative_and_previewed(run: Path):
    out = build_report(run)
    text = out.read_text()
    hrefs = {unquote(h) for h in re.findall(r'href="([^"#][^"]*)"', text)}
    tables = sorted(list(run.rglob("*.csv")) + list(run.rglob("*.parquet")))
    assert len(tables) == 4
    for t in tables:
        rel = os.path.relpath(t, out.parent)
        assert rel in hrefs, rel
    for h in hrefs:
        assert not os.path.isabs(h) and (out.parent / h).is_file(), h
    assert "first 15 rows" in text  # the 40-row parquet table is cut
    assert "40 rows" in text
    assert "c1ccccc1" in text  # a small table shown in full


def test_headlines_agree_with_run_tables(run: Path):
    from sciscope.pipelines.layout import read_headlines

    rows = headline_values(build_report(run))
    expected = read_headlines(run)
    assert [(r["stage"], r["name"], r["value"], r["control"]) for r in rows] == \
        [(r["stage"], r["name"], r["value"], r["control"]) for r in expected]
    # and the numbers are the ones in their source tables
    scores = pd.read_csv(run / rows[0]["source"])
    best = scores.loc[scores.r2.idxmax()]
    assert rows[0]["value"] == pytest.approx(best.r2, rel=1e-12)
    assert rows[0]["control"] == pytest.approx(best.r2_shuffled, rel=1e-12)
    assert rows[0]["control_label"] == "shuffled labels"
    sweep = pd.read_csv(run / rows[1]["source"])
    assert rows[1]["value"] == pytest.approx(sweep.score.iloc[-1])
    assert rows[1]["control"] == pytest.approx(sweep.random.iloc[-1])


def test_everything_from_the_run_is_escaped(run: Path):
    text = build_report(run).read_text()
    assert EVIL not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&amp; more" in text  # notes.md rendered as escaped text


def test_findings_first_then_numbers_stages_run_details_and_appendix(run: Path):
    text = build_report(run).read_text()
    for needle in ("tiny-roberta", "RobertaForMaskedLM", "123456", "ab12cd34", "molecules bundled with rdkit",
                   "<details", "12.3"):
        assert needle in text, needle
    order = [text.index(s) for s in ('id="findings"', 'id="headlines"', 'id="stage-examples"', 'id="stage-probes"',
                                    'id="stage-steering"', 'id="summary"', 'id="appendix"')]
    assert order == sorted(order)
    # the first screen is the title, one line, and the findings: no metadata table, no table preview before them
    before = text[text.index("<body>"):text.index('<section id="findings">')]
    assert "<table" not in before and "<h2" not in before and len(re.sub(r"<[^>]+>", "", before).strip()) < 300
    # table previews live in the appendix, the stage sections point there
    assert text.index('class="preview"') > text.index('id="appendix"')
    assert 'href="#appendix-probes"' in text[text.index('id="stage-probes"'):text.index('id="stage-steering"')]
    assert 'href="#stage-probes"' in text  # table of contents
    assert "logs/probes.log" in text


def test_missing_stages_say_not_run(run: Path):
    text = build_report(run).read_text()
    for stage in ("model", "activations", "sae", "features"):
        assert f"{stage}: not run" in text
    for stage in ("examples", "probes", "steering", "report"):
        assert f"{stage}: not run" not in text
    assert set(STAGES) >= {"model", "sae"}


def test_rebuild_and_custom_out(run: Path, tmp_path: Path):
    first = build_report(run)
    again = build_report(run)  # the report folder now exists: still not "run" as a stage, no self-embedding
    assert first == again and "report: not run" not in again.read_text()
    other = build_report(run, out=tmp_path / "elsewhere" / "r.html")
    hrefs = [unquote(h) for h in re.findall(r'href="([^"#][^"]*)"', other.read_text())]
    assert hrefs and all((other.parent / h).is_file() for h in hrefs)


def test_missing_run_dir_raises_naming_path(tmp_path: Path):
    missing = tmp_path / "no" / "such" / "run"
    with pytest.raises(SciscopeError, match=re.escape(str(missing))):
        build_report(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SciscopeError, match=re.escape(str(tmp_path / "empty"))):
        build_report(tmp_path / "empty")


def test_main_prints_path_or_one_line_error(run: Path, tmp_path: Path, capsys):
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "report.html")
    assert main([str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and len(err.strip().splitlines()) == 1


def test_format_number():
    assert format_number(0.123456) == "0.123"
    assert format_number(12345.6) == "12300"
    assert format_number(123456) == "123456"
    assert format_number(1.5e-7) == "1.5e-07"
    assert format_number(float("nan")) == "nan"
    assert format_number(None) == ""
    assert format_number(np.float32(2.5)) == "2.5"


def test_report_renders_in_headless_chromium(run: Path, tmp_path: Path):
    from tests.browser import screenshot

    out = build_report(run)
    shot = screenshot(out, tmp_path / "shot.png", tmp_path / "chromium-profile")
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000, img.shape
    assert img.std() > 20, f"screenshot looks blank (pixel std {img.std():.1f})"
    non_white = (img < 245).mean()
    assert 0.02 < non_white < 0.9, f"fraction of non-white pixels {non_white:.3f}"


def test_headline_rows_with_a_baseline_get_their_verdict_written(tmp_path):
    import json

    from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER
    from sciscope.pipelines.layout import HEADLINE_FILE

    write_headline(tmp_path, [
        {"name": "model beats", "value": 0.9, "baseline": 0.5},
        {"name": "baseline wins", "value": 0.5, "baseline": 0.9, "baseline_label": "bag of words"},
        {"name": "error, lower is better", "value": 120.0, "baseline": 300.0, "higher_is_better": False},
        {"name": "no baseline", "value": 1.0},
        {"name": "stated verdict kept", "value": 0.9, "baseline": 0.5, "verdict": NO_BETTER},
        {"name": "within the stated margin", "value": 0.9965, "baseline": 0.9970, "tolerance": 0.005},
        {"name": "no margin stated", "value": 0.9965, "baseline": 0.9970},
    ])
    rows = {r["name"]: r for r in json.loads((tmp_path / HEADLINE_FILE).read_text())}
    assert rows["model beats"]["verdict"] == ABOVE
    assert rows["baseline wins"]["verdict"] == BELOW and rows["baseline wins"]["baseline_label"] == "bag of words"
    assert rows["error, lower is better"]["verdict"] == ABOVE
    assert rows["no baseline"]["verdict"] is None and "higher_is_better" not in rows["no baseline"]
    assert rows["stated verdict kept"]["verdict"] == NO_BETTER
    assert rows["within the stated margin"]["verdict"] == NO_BETTER and "tolerance" not in rows["within the stated margin"]
    assert rows["no margin stated"]["verdict"] == BELOW


def test_baseline_and_verdict_reach_the_report_and_read_back(run: Path):
    write_headline(run / "probes", [{
        "stage": "probes", "name": "lat (r2)", "value": 0.618, "control": 0.01, "control_label": "shuffled labels",
        "baseline": 0.666, "baseline_label": "country one-hot", "note": "constructed: the baseline wins",
        "source": "probes/scores.csv"}])
    out = build_report(run)
    row = next(r for r in headline_values(out) if r["name"] == "lat (r2)")
    assert row["baseline"] == 0.666 and row["baseline_label"] == "country one-hot"
    assert row["verdict"] == "below baseline"
    assert '<td class="verdict">below baseline</td>' in out.read_text()


def test_findings_group_the_judged_headlines_by_verdict(run: Path):
    text = build_report(run).read_text()
    assert "No headline number carries a baseline" in text  # the fixture's rows have none
    write_headline(run / "probes", [
        {"stage": "probes", "name": "lat (r2)", "value": 0.618, "baseline": 0.666, "baseline_label": "country one-hot"},
        {"stage": "probes", "name": "lon (r2)", "value": 0.675, "baseline": 0.599, "baseline_label": "country one-hot"},
        {"stage": "probes", "name": "no baseline", "value": 0.5}])
    text = build_report(run).read_text()
    findings = text[text.index('<section id="findings">'):text.index('<section id="headlines">')]
    assert "2 headline numbers are read against the strongest simple baseline: 1 above baseline, 0 no better than baseline, 1 below baseline." in findings
    assert re.findall(r'data-verdict="([^"]+)">probes: <b>([^<]+)</b>', findings) == [("above baseline", "lon (r2)"),
                                                                                        ("below baseline", "lat (r2)")]
    assert "no baseline" not in findings


def test_findings_are_sentences_with_control_baseline_and_a_link_to_their_figure(run: Path):
    from sciscope.pipelines.report import finding_sentence

    write_headline(run / "probes", [
        {"stage": "probes", "name": "lat (r2)", "value": 0.618, "control": -0.01, "control_label": "shuffled labels",
         "baseline": 0.666, "baseline_label": "the country named in the prompt", "source": "probes/scores.csv",
         "figure": "probes/score_vs_layer.png", "verdict": "no better than baseline"},
        {"stage": "probes", "name": "lon (r2)", "value": 0.7, "control": 0.0, "control_label": "shuffled labels",
         "baseline": 0.4, "baseline_label": "country one-hot", "source": "probes/scores.csv",
         "figure": "probes/no_such_figure.png"}])
    text = build_report(run).read_text()
    findings = text[text.index('<section id="findings">'):text.index('<section id="headlines">')]
    # a miss is stated as plainly as a hit, with its number, control and baseline
    assert ("<b>lat (r2)</b> is 0.618 (shuffled labels -0.01), but no better than the country named in the prompt, "
            "0.666.") in findings
    assert "<b>lon (r2)</b> is 0.7 (shuffled labels 0), above country one-hot, 0.4." in findings
    # the link goes to the figure embedded in the report; a missing figure gets no link
    links = re.findall(r'<a class="figlink" href="#([^"]+)">figure</a>', findings)
    assert links == ["fig-probes-score-vs-layer-png", "fig-steering-sweep-png"]  # lon's figure does not exist
    assert all(f'<figure id="{link}">' in text for link in links)
    # the steering row has a control but no baseline: read beside its control only
    assert "Beside their control only (1)" in findings and "(random direction 0.09)" in findings
    assert finding_sentence({"name": "x", "value": 1.0}) == "x is 1."
