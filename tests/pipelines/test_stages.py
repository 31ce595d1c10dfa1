"""A stage that fails unexpectedly leaves its traceback in its log and a one-line summary the CLI repeats."""

from __future__ import annotations

import json
from pathlib import Path

from sciscope.pipelines import stages
from sciscope.pipelines.cli import _failure_line

TOY = str(Path(__file__).parents[1] / "domains" / "toy_adapter.py") + ":ToyAdapter"


def test_an_unexpected_exception_is_logged_with_its_traceback_and_summarised(tmp_path, monkeypatch, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"domain": "toy", "adapter": TOY, "run": "t", "config": {}}))

    def broken(run):
        return {"x": [1, 2][5]}

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "examples", broken)
    log = tmp_path / "logs" / "examples.log"
    assert stages.main(["examples", str(tmp_path), "--log", str(log), "--no-progress"]) == 1
    text = log.read_text()
    assert "Traceback" in text and "in broken" in text
    err = capsys.readouterr().err
    summary = [line for line in err.splitlines() if line.startswith("sciscope: error")]
    line_no = broken.__code__.co_firstlineno + 1
    assert summary == ["sciscope: error in stage examples: IndexError: list index out of range "
                       f"(at test_stages.py:{line_no} in broken)"]
    assert not (tmp_path / "examples" / "done.json").exists()
    line = _failure_line(tmp_path)
    assert "IndexError: list index out of range" in line and str(log) in line
