"""One self-contained HTML report per run.

:func:`build_report` reads a run folder laid out as :mod:`sciscope.pipelines.layout` describes and
writes a single HTML file that renders offline: every PNG figure is embedded as a base64 data URI,
the page carries its own CSS and no scripts, fonts or network references. Tables (CSV, Parquet) are
linked by a path relative to the report, and the first rows of each are previewed inline.

The page tells the story first, then shows the evidence:

1. **Findings**: every headline number in one plain sentence with its control, its strongest simple
   baseline and the verdict (grouped: holds, no better, below), each linking its figure; then the
   numbers that have only a control;
2. the headline table, each number beside its control and baseline (``headline.json`` of every stage);
3. one section per stage, in :data:`~sciscope.pipelines.layout.STAGES` order: ``done.json``,
   notes, figures; stages without a folder are listed as "not run";
4. run details (``run.json``: model identity, data, config, timings);
5. an appendix with the first rows of every table and the other files, each linked.

The header links the feature browser (``report/features.html``) when the report stage wrote one.

Everything read from the run is treated as untrusted text and HTML-escaped. The headline table
carries the exact values in ``data-*`` attributes, so :func:`headline_values` can read them back
and a test can check that the report agrees with the run's tables.

Examples
--------
>>> from sciscope.pipelines.report import build_report  # doctest: +SKIP
>>> build_report("runs/chemistry/quick")                   # doctest: +SKIP
PosixPath('runs/chemistry/quick/report/report.html')
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sciscope.core.errors import SciscopeError
from sciscope.core.io import write_text
from sciscope.pipelines.layout import DONE_FILE, FEATURES_PAGE, HEADLINE_FILE, RUN_FILE, STAGES

__all__ = ["build_report", "finding_sentence", "headline_values", "format_number", "main", "REPORT_NAME", "PREVIEW_ROWS"]

REPORT_NAME = "report.html"
PREVIEW_ROWS = 15  # rows of each table shown inline
PREVIEW_COLS = 20  # columns of each table shown inline
MAX_CELL_CHARS = 80  # longer cell texts are cut in previews
MAX_NOTE_CHARS = 20_000  # longer notes are cut
MAX_COUNT_BYTES = 20 * 2**20  # CSVs larger than this are not scanned to count their rows
TABLE_SUFFIXES = (".csv", ".parquet")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_esc = html.escape  # quote=True by default: safe inside attribute values too


# ---------------------------------------------------------------------------------------------- #
# numbers
# ---------------------------------------------------------------------------------------------- #


def format_number(x: Any, digits: int = 3) -> str:
    """Format a number to about ``digits`` significant digits, for reading (not for round trips).

    Integers are printed in full, floats with ``digits`` significant digits and without an
    exponent between 1e-3 and 1e6; ``None`` is an empty string; anything else is ``str(x)``.

    Parameters
    ----------
    x
        The value.
    digits
        Significant digits for floats.

    Returns
    -------
    str
        The text (not yet HTML-escaped).

    Examples
    --------
    >>> format_number(0.123456), format_number(12345.6), format_number(7), format_number(1e-7)
    ('0.123', '12300', '7', '1e-07')
    """
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        import numpy as np

        if isinstance(x, np.integer):
            return str(int(x))
        if isinstance(x, np.floating):
            x = float(x)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if not isinstance(x, float):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    s = f"{x:.{digits}g}"
    if "e" in s and 1e-3 <= abs(x) < 1e6:
        s = f"{float(s):f}".rstrip("0").rstrip(".")
    return s


def _format_cell(text: str) -> tuple[str, bool]:
    """A CSV cell for display: numbers shortened to 3 significant digits. Returns (text, is_number)."""
    t = text.strip()
    if not t:
        return text, False
    try:
        int(t)
        return t, True
    except ValueError:
        pass
    try:
        v = float(t)
    except ValueError:
        return text, False
    return format_number(v), True


# ---------------------------------------------------------------------------------------------- #
# reading the run
# ---------------------------------------------------------------------------------------------- #


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SciscopeError(f"cannot read {path}: {e}") from e


def _read_json_soft(path: Path) -> tuple[Any, str | None]:
    """JSON content, or (None, error message): a broken stage file should not sink the whole report."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"cannot read {path.name}: {e}"


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root``: files linking out of the run are skipped."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (OSError, ValueError):
        return False


def _stage_files(folder: Path, root: Path, exclude: Path | None) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (recursively, sorted, links not followed)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if exclude is not None and p.resolve() == exclude:
                continue
            if p.is_file() and _inside(p, root):
                found.append(p)
    return found


def _href(target: Path, base: Path) -> str:
    """A relative, percent-quoted link from the folder ``base`` to ``target``."""
    rel = os.path.relpath(os.path.abspath(target), os.path.abspath(base))
    return quote(Path(rel).as_posix(), safe="/")  # ':' is quoted, so no "javascript:" can appear


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------------------------------------- #
# HTML pieces
# ---------------------------------------------------------------------------------------------- #

CSS = """
:root { --fg:#1d1f23; --muted:#5f6670; --line:#d9dde3; --soft:#f5f7fa; --accent:#2857a4; --warn:#9a4b00; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0 auto; padding: 1.5rem 1.25rem 4rem; max-width: 1100px; color: var(--fg); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
h4 { font-size: .95rem; margin: 1.1rem 0 .2rem; }
a { color: var(--accent); }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: .85em; }
pre { background: var(--soft); border: 1px solid var(--line); padding: .6rem .8rem; overflow-x: auto;
  white-space: pre-wrap; word-break: break-word; }
.n { font-variant-numeric: tabular-nums; }
.sub { color: var(--muted); margin: 0 0 1rem; }
.muted { color: var(--muted); }
.warn { color: var(--warn); }
nav.toc { background: var(--soft); border: 1px solid var(--line); padding: .6rem 1rem; margin: 1rem 0; }
nav.toc ol { margin: .2rem 0; padding-left: 1.4rem; columns: 2; }
nav.toc li.notrun a { color: var(--muted); }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .88rem; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 12rem; }
.tablewrap { overflow-x: auto; max-width: 100%; }
table.headlines td.value { font-weight: 600; }
figure { margin: 1rem 0 1.5rem; page-break-inside: avoid; break-inside: avoid; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .85rem; }
details { margin: .4rem 0 1rem; }
summary { cursor: pointer; color: var(--accent); }
.badge { display: inline-block; font-size: .75rem; padding: 0 .45rem; border-radius: .6rem;
  border: 1px solid var(--line); color: var(--muted); vertical-align: middle; margin-left: .4rem; }
.badge.ok { color: #1d6b36; border-color: #9fd3b0; }
.done { font-size: .85rem; color: var(--muted); margin: .2rem 0 .8rem; }
.done > span { margin-right: 1.2rem; }
.done details { margin: .2rem 0 0; }
p.lead { margin: .1rem 0 .6rem; color: var(--muted); }
#findings h2 { margin-top: 1rem; }
#findings li { margin: .15rem 0; }
#findings h3.verdict-above { color: #1d6b36; }
#findings h3.verdict-no, #findings h3.verdict-below { color: var(--warn); }
a.figlink { font-size: .8rem; }
.appendix-stage h3 { margin-top: 1.6rem; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; border-top: 1px solid var(--line); padding-top: .5rem; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; }
  nav.toc { display: none; }
  a { color: inherit; text-decoration: none; }
  h2 { page-break-after: avoid; break-after: avoid; }
  table, pre { page-break-inside: avoid; break-inside: avoid; }
  .tablewrap { overflow: visible; }
}
"""


def _kv_table(items: Iterable[tuple[str, Any]], cls: str = "kv") -> str:
    rows = []
    for k, v in items:
        rows.append(f"<tr><th>{_esc(str(k))}</th><td>{_value_html(v)}</td></tr>")
    if not rows:
        return ""
    return f'<table class="{cls}"><tbody>{"".join(rows)}</tbody></table>'


def _value_html(v: Any) -> str:
    """A JSON value as compact, escaped HTML (numbers shortened, containers as one-line JSON)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f'<span class="n" title="{_esc(repr(v))}">{_esc(format_number(v))}</span>'
    if isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, sort_keys=True, default=str)
        if len(text) > 300:
            text = text[:300] + " …"
        return f'<code>{_esc(text)}</code>'
    if v is None:
        return '<span class="muted">–</span>'
    return _esc(str(v))


def _table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A preview table of text cells (from CSV or Parquet), numbers right-aligned and shortened."""
    head = "".join(f"<th>{_esc(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, (int, float)) and not isinstance(cell, bool):
                shown, full, num = format_number(cell), repr(cell), True
            else:
                full = "" if cell is None else str(cell)
                shown, num = _format_cell(full)
            if len(shown) > MAX_CELL_CHARS:
                shown = shown[:MAX_CELL_CHARS] + "…"
            title = f' title="{_esc(full)}"' if full != shown else ""
            cls = ' class="num"' if num else ""
            cells.append(f"<td{cls}{title}>{_esc(shown)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="tablewrap"><table class="preview"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _preview_csv(path: Path) -> tuple[list[str], list[list[str]], int | None]:
    """Header, the first rows and the row count (None when the file is too large to scan)."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        rows: list[list[str]] = []
        n = 0
        count = path.stat().st_size <= MAX_COUNT_BYTES
        for row in reader:
            if n < PREVIEW_ROWS:
                rows.append(row)
            n += 1
            if n >= PREVIEW_ROWS and not count:
                return header, rows, None
    return header, rows, n


def _preview_parquet(path: Path) -> tuple[list[str], list[list[Any]], int | None]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    header = list(pf.schema_arrow.names)
    rows: list[list[Any]] = []
    for batch in pf.iter_batches(batch_size=PREVIEW_ROWS):
        cols = batch.to_pydict()
        rows = [[cols[h][i] for h in header] for i in range(batch.num_rows)]
        break
    return header, rows, pf.metadata.num_rows


def _table_section(path: Path, run_dir: Path, base: Path, idx: str) -> str:
    rel = path.relative_to(run_dir).as_posix()
    name = rel.split("/", 1)[-1]  # the path inside the stage folder
    link = f'<a href="{_esc(_href(path, base))}" class="table-link" data-path="{_esc(rel)}">{_esc(rel)}</a>'
    size = _human_size(path.stat().st_size)
    try:
        if path.suffix == ".parquet":
            header, rows, n = _preview_parquet(path)
        else:
            header, rows, n = _preview_csv(path)
    except Exception as e:  # noqa: BLE001 - a table we cannot read is reported, not fatal
        return (f'<h4 id="{idx}">{_esc(name)}</h4><p>{link} <span class="muted">({size})</span> '
                f'<span class="warn">— could not preview: {_esc(type(e).__name__)}: {_esc(str(e))}</span></p>')
    ncols = len(header)
    what = f"{n} rows" if n is not None else "rows not counted (large file)"
    what += f" × {ncols} columns, {size}"
    shown = ""
    if rows:
        cut_cols = ncols > PREVIEW_COLS
        h = header[:PREVIEW_COLS]
        r = [row[:PREVIEW_COLS] for row in rows]
        shown = _table_html(h, r)
        notes = []
        if n is None or n > len(rows):
            notes.append(f"first {len(rows)} rows")
        if cut_cols:
            notes.append(f"first {PREVIEW_COLS} of {ncols} columns")
        if notes:
            shown += f'<p class="muted">Showing {", ".join(notes)}; the full table is linked above.</p>'
    else:
        shown = '<p class="muted">(no rows)</p>'
    return f'<h4 id="{idx}">{_esc(name)}</h4><p>{link} <span class="muted">— {_esc(what)}</span></p>{shown}'


def _figure_html(path: Path, run_dir: Path) -> str:
    rel = path.relative_to(run_dir).as_posix()
    idx = _figure_id(rel)
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return f'<p class="warn" id="{idx}">{_esc(rel)}: not a PNG file, not embedded.</p>'
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure id="{idx}"><img src="data:image/png;base64,{b64}" alt="{_esc(rel)}" data-path="{_esc(rel)}">'
            f"<figcaption>{_esc(rel)}</figcaption></figure>")


def _note_html(path: Path, run_dir: Path) -> str:
    rel = path.relative_to(run_dir).as_posix()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f'<p class="warn">{_esc(rel)}: {_esc(str(e))}</p>'
    if len(text) > MAX_NOTE_CHARS:
        text = text[:MAX_NOTE_CHARS] + f"\n… (cut at {MAX_NOTE_CHARS} characters)"
    return f'<h3>{_esc(path.name)}</h3><pre class="note">{_esc(text)}</pre>'


def _done_html(path: Path) -> str:
    """``done.json`` compactly: scalars on one line, nested values folded away as JSON."""
    info, err = _read_json_soft(path)
    if err:
        return f'<p class="warn">{_esc(err)}</p>'
    if not isinstance(info, Mapping):
        return f'<p class="done">done: {_value_html(info)}</p>'
    spans, folded = [], []
    for k, v in info.items():
        if isinstance(v, (dict, list)) and v:
            if isinstance(v, Mapping) and len(v) <= 8 and all(not isinstance(x, (dict, list)) for x in v.values()):
                inner = ", ".join(f"{_esc(str(a))}={_value_html(b)}" for a, b in v.items())
                spans.append(f"<span><b>{_esc(str(k))}</b>: {inner}</span>")
            elif len(json.dumps(v, default=str)) <= 100:
                spans.append(f"<span><b>{_esc(str(k))}</b>: {_value_html(v)}</span>")
            else:
                text = json.dumps(v, indent=2, sort_keys=True, default=str)
                if len(text) > MAX_NOTE_CHARS:
                    text = text[:MAX_NOTE_CHARS] + "\n…"
                folded.append(f"<details><summary>{_esc(str(k))}</summary><pre>{_esc(text)}</pre></details>")
        else:
            spans.append(f"<span><b>{_esc(str(k))}</b>: {_value_html(v)}</span>")
    return f'<div class="done" data-done="1">{"".join(spans) or "finished"}{"".join(folded)}</div>'


# ---------------------------------------------------------------------------------------------- #
# the sections
# ---------------------------------------------------------------------------------------------- #

_MODEL_KEYS = (("name", "name"), ("class", "class"), ("cls", "class"), ("params", "parameters"),
               ("n_params", "parameters"), ("hash", "hash"), ("content_hash", "hash"))


def _summary_html(info: Mapping[str, Any], run_dir: Path) -> str:
    parts: list[str] = ['<section id="summary"><h2>Summary</h2>']
    run_name = info.get("run") or info.get("run_name") or info.get("name") or run_dir.name
    top = [("domain", info.get("domain", "")), ("run", run_name), ("folder", str(run_dir))]
    for key in ("adapter", "created", "started", "finished", "seed", "profile", "version", "code_version"):
        if key in info and not isinstance(info[key], (dict, list)):
            top.append((key, info[key]))
    parts.append(_kv_table(top))

    model = info.get("model")
    parts.append("<h3>Model</h3>")
    if isinstance(model, Mapping):
        seen: set[str] = set()
        items: list[tuple[str, Any]] = []
        for key, label in _MODEL_KEYS:
            if key in model and label not in {k for k, _ in items}:
                items.append((label, model[key]))
                seen.add(key)
        items += [(k, v) for k, v in model.items() if k not in seen]
        parts.append(_kv_table(items))
    elif model is not None:
        parts.append(f"<p>{_value_html(model)}</p>")
    else:
        parts.append('<p class="muted">run.json has no model entry.</p>')

    data = info.get("data")
    parts.append("<h3>Data</h3>")
    if isinstance(data, Mapping):
        parts.append(_kv_table(data.items()))
    elif data is not None:
        parts.append(f"<p>{_esc(str(data))}</p>")
    else:
        parts.append('<p class="muted">run.json has no data entry.</p>')

    stages = info.get("stages")
    if isinstance(stages, Mapping) and stages:
        parts.append("<h3>Stage timings</h3>")
        rows = []
        total = 0.0
        for st, sec in stages.items():
            if isinstance(sec, (int, float)) and not isinstance(sec, bool):
                total += float(sec)
                cell = f'<td class="num">{_esc(format_number(float(sec)))}</td>'
            else:
                cell = f"<td>{_value_html(sec)}</td>"
            rows.append(f"<tr><td>{_esc(str(st))}</td>{cell}</tr>")
        rows.append(f'<tr><th>total</th><th class="num">{_esc(format_number(total))}</th></tr>')
        parts.append(f'<table class="timings"><thead><tr><th>stage</th><th class="num">seconds</th></tr></thead>'
                     f'<tbody>{"".join(rows)}</tbody></table>')

    config = info.get("config")
    if config is not None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        parts.append(f'<details class="config"><summary>Configuration (resolved)</summary>'
                     f'<pre>{_esc(text)}</pre></details>')

    known = {"domain", "run", "run_name", "name", "model", "data", "stages", "config", "adapter",
             "created", "started", "finished", "seed", "profile", "version", "code_version"}
    rest = [(k, v) for k, v in info.items() if k not in known]
    if rest:
        parts.append("<h3>Other run information</h3>" + _kv_table(rest))
    parts.append("</section>")
    return "".join(parts)


_VERDICT_WORDS = {  # verdict -> (heading, the clause that joins the number to its baseline)
    "above baseline": ("Holds against the strongest simple baseline", "above"),
    "no better than baseline": ("No better than the strongest simple baseline", "but no better than"),
    "below baseline": ("Below the strongest simple baseline", "below"),
}


def _figure_id(rel: str) -> str:
    """The anchor of an embedded figure, from its run-relative path."""
    return "fig-" + "".join(c if c.isalnum() else "-" for c in rel)


def _row_figure(r: Mapping[str, Any], figures: set[str]) -> str | None:
    """The figure that shows a headline: the row's ``figure``, else a PNG named like its source, else
    the only PNG beside a source in a plan's folder (``steering/<plan>/``); None when unsure."""
    fig = r.get("figure")
    if isinstance(fig, str) and fig in figures:
        return fig
    src = str(r.get("source") or "")
    if not src:
        return None
    stem = src.rsplit(".", 1)[0]
    if f"{stem}.png" in figures:
        return f"{stem}.png"
    folder = src.rsplit("/", 1)[0] if "/" in src else ""
    beside = sorted(f for f in figures if f.rsplit("/", 1)[0] == folder)
    return beside[0] if folder.count("/") >= 1 and len(beside) == 1 else None


def finding_sentence(r: Mapping[str, Any]) -> str:
    """One headline row as a plain sentence (text, not HTML): its number, its control, and where a
    baseline is declared, how it stands against it.

    Examples
    --------
    >>> finding_sentence({"name": "lat (r2)", "value": 0.618, "control": -0.01, "control_label": "shuffled labels",
    ...                   "baseline": 0.666, "baseline_label": "country one-hot", "verdict": "no better than baseline"})
    'lat (r2) is 0.618 (shuffled labels -0.01), but no better than country one-hot, 0.666.'
    """
    unit = str(r.get("unit") or "")
    text = f"{r.get('name') or 'unnamed'} is {format_number(r.get('value'))}"
    if unit and unit.lower() not in str(r.get("name") or "").lower():
        text += f" {unit}"
    if r.get("control") is not None:
        text += f" ({r.get('control_label') or 'control'} {format_number(r.get('control'))})"
    words = _VERDICT_WORDS.get(str(r.get("verdict")))
    if words is not None:
        text += f", {words[1]} {r.get('baseline_label') or 'the baseline'}, {format_number(r.get('baseline'))}"
    return text + "."


def _findings_html(rows: list[dict[str, Any]], figures: set[str] | None = None) -> str:
    """The findings, in words, first: each headline in one sentence with its number, its control,
    its baseline and a link to its figure; judged ones grouped by verdict, misses as plainly as hits,
    then the numbers that have a control but no simple baseline."""
    from sciscope.core.verdict import VERDICTS

    figures = figures or set()
    rows = [r for r in rows if isinstance(r, Mapping)]
    judged = [r for r in rows if r.get("verdict") in VERDICTS]
    controlled = [r for r in rows if r.get("verdict") not in VERDICTS and r.get("control") is not None]
    parts = ['<section id="findings"><h2>Findings</h2>']

    def item(r: Mapping[str, Any]) -> str:
        fig = _row_figure(r, figures)
        link = f' <a class="figlink" href="#{_figure_id(fig)}">figure</a>' if fig else ""
        sentence = finding_sentence(r)
        name = str(r.get("name") or "unnamed")
        rest = sentence[len(name):] if sentence.startswith(name) else " " + sentence
        return (f'<li class="finding" data-verdict="{_esc(str(r.get("verdict") or ""))}">{_esc(str(r.get("stage") or ""))}: '
                f"<b>{_esc(name)}</b>{_esc(rest)}{link}</li>")

    if judged:
        counts = {v: sum(r["verdict"] == v for r in judged) for v in VERDICTS}
        parts.append(f'<p class="sub">{len(judged)} headline numbers are read against the strongest simple baseline: '
                     + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".</p>")
        for v in VERDICTS:
            items = [item(r) for r in judged if r["verdict"] == v]
            if items:
                heading = _VERDICT_WORDS.get(v, (v.capitalize(), ""))[0]
                parts.append(f'<h3 class="verdict-{_esc(v.split()[0])}">{_esc(heading)} ({len(items)})</h3><ul>{"".join(items)}</ul>')
    else:
        parts.append('<p class="muted">No headline number carries a baseline, so none has a verdict.</p>')
    if controlled:
        parts.append(f"<h3>Beside their control only ({len(controlled)})</h3>"
                     '<p class="sub">No simple baseline is declared for these: each is read against its control.</p>'
                     f'<ul>{"".join(item(r) for r in controlled)}</ul>')
    parts.append("</section>")
    return "".join(parts)


def _headlines_html(rows: list[dict[str, Any]], run_dir: Path, base: Path) -> str:
    parts = ['<section id="headlines"><h2>Headline numbers</h2>']
    if not rows:
        parts.append('<p class="muted">No stage wrote headline numbers (headline.json).</p></section>')
        return "".join(parts)
    parts.append('<p class="sub">Each number beside its control and, where one is declared, the strongest simple '
                 'baseline with a verdict that follows from the numbers; the source column links the table it was '
                 'read from.</p>')
    head = ("<tr><th>stage</th><th>name</th><th class=\"num\">value</th><th class=\"num\">control</th>"
            "<th>control is</th><th class=\"num\">baseline</th><th>baseline is</th><th>verdict</th>"
            "<th>unit</th><th>note</th><th>source</th></tr>")
    body = []
    for r in rows:
        if not isinstance(r, Mapping):
            continue
        value, control = r.get("value"), r.get("control")
        src = r.get("source")
        attrs = {
            "data-stage": r.get("stage"), "data-name": r.get("name"),
            "data-value": json.dumps(value, default=str), "data-control": json.dumps(control, default=str),
            "data-control-label": r.get("control_label"), "data-unit": r.get("unit"), "data-source": src,
            "data-baseline": json.dumps(r.get("baseline"), default=str), "data-baseline-label": r.get("baseline_label"),
            "data-verdict": r.get("verdict"),
        }
        attr_text = " ".join(f'{k}="{_esc("" if v is None else str(v))}"' for k, v in attrs.items())
        if src:
            target = run_dir / str(src)
            if target.is_file() and _inside(target, run_dir):
                src_html = f'<a href="{_esc(_href(target, base))}">{_esc(str(src))}</a>'
            else:
                src_html = f'{_esc(str(src))} <span class="warn">(missing)</span>'
        else:
            src_html = '<span class="muted">–</span>'
        body.append(
            f'<tr class="headline" {attr_text}>'
            f"<td>{_esc(str(r.get('stage') or ''))}</td><td>{_esc(str(r.get('name') or ''))}</td>"
            f'<td class="num value">{_esc(format_number(value))}</td>'
            f'<td class="num control">{_esc(format_number(control))}</td>'
            f"<td>{_esc(str(r.get('control_label') or ''))}</td>"
            f'<td class="num baseline">{_esc(format_number(r.get("baseline")))}</td>'
            f"<td>{_esc(str(r.get('baseline_label') or ''))}</td>"
            f'<td class="verdict">{_esc(str(r.get("verdict") or ""))}</td>'
            f"<td>{_esc(str(r.get('unit') or ''))}</td>"
            f"<td>{_esc(str(r.get('note') or ''))}</td><td>{src_html}</td></tr>"
        )
    parts.append(f'<div class="tablewrap"><table class="headlines"><thead>{head}</thead>'
                 f'<tbody>{"".join(body)}</tbody></table></div></section>')
    return "".join(parts)


def _stage_has_content(folder: Path, run_dir: Path, exclude: Path | None) -> bool:
    return any(_stage_files(folder, run_dir, exclude))


def _stage_html(stage: str, run_dir: Path, base: Path, exclude: Path | None) -> tuple[str, str]:
    """A stage's section (done.json, log, notes, figures) and its appendix part (table previews and
    the other files): the story stays readable, the file browser is at the end."""
    folder = run_dir / stage
    files = _stage_files(folder, run_dir, exclude)
    figures = [p for p in files if p.suffix.lower() == ".png"]
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    notes = [p for p in files if p.parent == folder and (p.name == "notes.md" or p.suffix.lower() == ".txt")]
    done = folder / DONE_FILE
    finished = done.is_file()
    badge = '<span class="badge ok">done</span>' if finished else '<span class="badge">no done.json</span>'
    parts = [f'<section id="stage-{stage}" class="stage" data-stage="{stage}"><h2>{stage}{badge}</h2>']
    if finished:
        parts.append(_done_html(done))
    log = run_dir / "logs" / f"{stage}.log"
    if log.is_file():
        parts.append(f'<p class="muted">Log: <a href="{_esc(_href(log, base))}">logs/{stage}.log</a></p>')
    for p in notes:
        parts.append(_note_html(p, run_dir))
    for p in figures:
        parts.append(_figure_html(p, run_dir))
    shown = set(figures) | set(tables) | set(notes) | {done, folder / HEADLINE_FILE}
    others = [p for p in files if p not in shown]
    if tables or others:
        parts.append(f'<p class="muted"><a href="#appendix-{stage}">{len(tables)} tables and {len(others)} other files'
                     "</a> of this stage are listed in the appendix.</p>")
    if not (figures or tables or notes or finished or others):
        parts.append('<p class="muted">This stage folder is empty.</p>')
    parts.append("</section>")
    appendix = ""
    if tables or others:
        a = [f'<section id="appendix-{stage}" class="appendix-stage"><h3>{stage}</h3>']
        for i, p in enumerate(tables):
            a.append(_table_section(p, run_dir, base, f"{stage}-table-{i}"))
        if others:
            links = ", ".join(f'<a href="{_esc(_href(p, base))}">{_esc(p.relative_to(run_dir).as_posix())}</a>'
                              for p in others[:50])
            more = f" and {len(others) - 50} more" if len(others) > 50 else ""
            a.append(f'<p class="muted">Other files: {links}{more}</p>')
        a.append("</section>")
        appendix = "".join(a)
    return "".join(parts), appendix


def _lead_html(info: Mapping[str, Any], run_dir: Path, base: Path, out_dir: Path) -> str:
    """One line under the title: what ran on what, and the feature browser when there is one."""
    bits = []
    model = info.get("model")
    if isinstance(model, Mapping):
        name = str(model.get("name") or model.get("class") or model.get("cls") or "")
        if "/" in name:  # a checkpoint path: its last two parts say which (the run details give it whole)
            name = "/".join(Path(name).parts[-2:])
        if name:
            bits.append(f'model <b title="{_esc(str(model.get("name") or ""))}">{_esc(name)}</b>')
    data = info.get("data")
    if isinstance(data, str) and data:
        bits.append(_esc(data.split(";")[0].split(" (")[0]))
    browser = out_dir / FEATURES_PAGE
    if browser.is_file():
        bits.append(f'<a href="{_esc(_href(browser, base))}" id="feature-browser-link">feature browser: the cards of the '
                    "top features and of random controls</a>")
    return f'<p class="lead">{" · ".join(bits)}</p>' if bits else ""


# ---------------------------------------------------------------------------------------------- #
# public API
# ---------------------------------------------------------------------------------------------- #


def build_report(run_dir: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None) -> Path:
    """Write the run's HTML report: one self-contained file that renders offline.

    Parameters
    ----------
    run_dir
        A run folder laid out as :mod:`sciscope.pipelines.layout` describes (it must hold ``run.json``).
    out
        Where to write the report; default ``<run_dir>/report/report.html``. Table links are
        relative to this file's folder, so keep the report inside (or beside) the run when moving it.

    Returns
    -------
    Path
        The report file (written atomically).

    Raises
    ------
    SciscopeError
        When ``run_dir`` does not exist, is not a folder, or has no readable ``run.json``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SciscopeError(f"run folder {run_dir} does not exist")
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise SciscopeError(f"{run_dir} is not a run folder: it has no {RUN_FILE}")
    info = _read_json(run_file)
    if not isinstance(info, Mapping):
        raise SciscopeError(f"{run_file} must hold a JSON object, not {type(info).__name__}")
    root = run_dir.resolve()
    out_path = Path(out) if out is not None else run_dir / "report" / REPORT_NAME
    out_path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.abspath(out_path.parent))
    exclude = out_path.resolve()

    headlines: list[dict[str, Any]] = []
    headline_errors: list[str] = []
    for stage in STAGES:
        f = run_dir / stage / HEADLINE_FILE
        if f.is_file():
            rows, err = _read_json_soft(f)
            if err:
                headline_errors.append(f"{stage}: {err}")
            elif isinstance(rows, list):
                headlines.extend(r for r in rows if isinstance(r, dict))
            else:
                headline_errors.append(f"{stage}: {HEADLINE_FILE} is not a list of rows")

    present = [s for s in STAGES if (run_dir / s).is_dir()
               and (s != "report" or _stage_has_content(run_dir / s, root, exclude))]
    missing = [s for s in STAGES if s not in present and s != "report"]

    domain = str(info.get("domain") or "")
    run_name = str(info.get("run") or info.get("run_name") or info.get("name") or run_dir.name)
    title = f"sciscope report — {domain + ' / ' if domain else ''}{run_name}"

    figures = {p.relative_to(run_dir).as_posix() for st in present for p in _stage_files(run_dir / st, root, exclude)
               if p.suffix.lower() == ".png"}
    sections, appendix = [], []
    for s in present:
        sec, app = _stage_html(s, run_dir, base, exclude)
        sections.append(sec)
        if app:
            appendix.append(app)

    toc = ['<li><a href="#findings">Findings</a></li>', '<li><a href="#headlines">Headline numbers</a></li>']
    for s in STAGES:
        if s in present:
            toc.append(f'<li><a href="#stage-{s}">{s}</a></li>')
        elif s in missing:
            toc.append(f'<li class="notrun"><a href="#not-run">{s}</a> <span class="muted">(not run)</span></li>')
    toc.append('<li><a href="#summary">Run details</a></li>')
    if appendix:
        toc.append('<li><a href="#appendix">Appendix: tables and files</a></li>')

    # the story first: findings on the first screen, then the numbers, the stages, the run's
    # metadata, and the tables last
    body = [f"<header><h1>{_esc(title)}</h1>", _lead_html(info, run_dir, base, out_path.parent), "</header>",
            _findings_html(headlines, figures),
            f'<nav class="toc"><b>Contents</b><ol>{"".join(toc)}</ol></nav>',
            _headlines_html(headlines, run_dir, base)]
    if headline_errors:
        body.append("".join(f'<p class="warn">{_esc(e)}</p>' for e in headline_errors))
    body += sections
    if missing:
        items = "".join(f'<li class="stage-not-run" data-stage="{s}">{s}: not run</li>' for s in missing)
        body.append(f'<section id="not-run"><h2>Stages not run</h2><ul>{items}</ul></section>')
    body.append(_summary_html(info, run_dir).replace("<h2>Summary</h2>", "<h2>Run details</h2>", 1))
    if appendix:
        body.append('<section id="appendix"><h2>Appendix: tables and files</h2><p class="sub">The first rows of every '
                    "table each stage wrote, linked in full.</p>" + "".join(appendix) + "</section>")
    body.append(f'<footer>Written by sciscope.pipelines.report · run folder <code>{_esc(str(run_dir))}</code> · generated '
                f"{_esc(_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'))}. Self-contained: figures are "
                "embedded; tables are linked relative to this file.</footer>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    write_text(out_path, page)
    return out_path


class _HeadlineParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            a = dict(attrs)
            if "headline" in (a.get("class") or "").split():
                self.rows.append(a)


def headline_values(report: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the headline table back out of a report written by :func:`build_report`.

    Parameters
    ----------
    report
        The report HTML file.

    Returns
    -------
    list of dict
        One dict per headline row, in the report's order, with keys ``stage``, ``name``, ``value``,
        ``control``, ``control_label``, ``baseline``, ``baseline_label``, ``verdict``, ``unit`` and
        ``source``; ``value``, ``control`` and ``baseline`` are the exact values from
        ``headline.json`` (JSON round trip, not the rounded display).
    """
    parser = _HeadlineParser()
    parser.feed(Path(report).read_text(encoding="utf-8"))
    parser.close()
    out = []
    for a in parser.rows:
        def text(key: str) -> str | None:
            v = a.get(key)
            return v if v else None

        out.append({
            "stage": text("data-stage"), "name": text("data-name"),
            "value": json.loads(a.get("data-value") or "null"),
            "control": json.loads(a.get("data-control") or "null"),
            "control_label": text("data-control-label"), "unit": text("data-unit"),
            "source": text("data-source"),
            "baseline": json.loads(a.get("data-baseline") or "null"),
            "baseline_label": text("data-baseline-label"), "verdict": text("data-verdict"),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    """``sciscope report RUN_DIR [--out FILE]``: build the report and print its path.

    Returns
    -------
    int
        0 on success, 1 on a :class:`SciscopeError` (printed as one line on stderr).
    """
    parser = argparse.ArgumentParser(prog="sciscope report", description="Write a run's HTML report.")
    parser.add_argument("run_dir", help="run folder (holds run.json)")
    parser.add_argument("--out", default=None, help="report file (default RUN_DIR/report/report.html)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir, out=args.out)
    except SciscopeError as e:
        print(f"sciscope: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
