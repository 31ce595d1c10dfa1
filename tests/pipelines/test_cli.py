"""The sciscope command line: domains, sites, errors and exit codes."""

from __future__ import annotations

import pytest

from sciscope.pipelines.cli import main


def test_domains_lists_something_or_says_none(capsys):
    assert main(["domains"]) == 0
    assert capsys.readouterr().out.strip()


def test_sites_of_a_local_hf_model(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "m")
    assert main(["sites", str(tmp_path / "m")]) == 0
    assert "encoder.layer.1.output" in capsys.readouterr().out.split()


def test_bad_model_dir_is_a_one_line_error(tmp_path, capsys):
    assert main(["sites", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path) in err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
