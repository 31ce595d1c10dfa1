"""The sciscope command line: domains, sites, errors and exit codes."""

from __future__ import annotations

from pathlib import Path

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
    assert main(["sites", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path) in err


@pytest.mark.parametrize("config, says", [
    ('{"model_type": "bert", ', "not valid JSON"),
    ('{"model_type": "mything", "auto_map": {"AutoConfig": "mine.MyConfig"}}', "trust_remote_code off"),
    ('{"model_type": "no_such_architecture"}', "no_such_architecture"),
])
def test_sites_of_a_broken_or_custom_code_model_dir_is_one_line(tmp_path, capsys, config, says):
    (tmp_path / "config.json").write_text(config)
    assert main(["sites", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "config.json" in err


TOY = str(Path(__file__).parents[1] / "domains" / "toy_adapter.py") + ":ToyAdapter"


@pytest.mark.parametrize("args, says", [
    (["--run", "../../x"], "--run"), (["--run", "/abs/path"], "--run"), (["--run", ".."], "--run"),
    (["--run", "a/b"], "--run"), (["--run", ".hidden"], "--run"),
    (["--set", "steer_alphas=nan,1,-1"], "finite"), (["--set", "sae_lr=inf"], "finite"),
    (["--set", "probe_cv=1"], "probe_cv"), (["--cores", "0"], "--cores"),
])
def test_bad_run_arguments_exit_2_and_write_nothing(tmp_path, capsys, args, says):
    out = tmp_path / "runs"
    assert main(["run", TOY, "--out", str(out), *args]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_domain_is_a_usage_error(tmp_path, capsys):
    assert main(["run", "no_such_domain", "--out", str(tmp_path / "runs")]) == 2
    assert "no_such_domain" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["run", TOY, "--out", str(tmp_path / "file")]) == 2
    assert main(["run", TOY, "--out", str(tmp_path / "file" / "below")]) == 2
    err = capsys.readouterr().err
    assert err.count("is a file") == 2 and (tmp_path / "file").read_text() == "mine"


def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path, capsys):
    mine = tmp_path / "runs" / "toy" / "thesis"
    mine.mkdir(parents=True)
    (mine / "chapter1.tex").write_text("mine")
    assert main(["run", TOY, "--out", str(tmp_path / "runs"), "--run", "thesis"]) == 2
    assert "not a sciscope run folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"]


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    import os

    from sciscope.pipelines.lock import run_lock

    run_dir = tmp_path / "runs" / "toy" / "quick"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"config": "the first run\'s"}')
    with run_lock(run_dir, command="sciscope run toy (the first)"):
        assert main(["run", TOY, "--out", str(tmp_path / "runs"), "--set", "seed=3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err and "the first" in err
    assert (run_dir / "run.json").read_text() == '{"config": "the first run\'s"}'


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


@pytest.mark.parametrize("domain, setting, says", [
    ("geospatial", "n_places=-5", "n_places"), ("geospatial", "test_fraction=1.5", "test_fraction"),
    ("geospatial", "model=/nonexistent", "/nonexistent"), ("physics", "flow_init_amplitude=nan", "flow_init_amplitude"),
])
def test_bad_domain_keys_exit_2_before_anything_runs(tmp_path, capsys, domain, setting, says):
    pytest.importorskip(f"sciscope.domains.{domain}.adapter")
    assert main(["run", domain, "--out", str(tmp_path / "runs"), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "runs").exists()
