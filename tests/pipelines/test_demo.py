"""The core walkthrough (make demo) runs end to end and writes what it says."""

from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_writes_tables_figures_and_summary(tmp_path):
    from sciscope.pipelines.demo import run_demo

    summary = run_demo(tmp_path, train_steps=300, progress=False)
    for rel in ["probes/score_vs_layer.png", "probes/summary.csv", "steering/alpha_sweep.png",
                "steering/sweep.csv", "steering/vector.safetensors", "sae/cfg.json", "sae/sae.safetensors",
                "patching/heatmap.png", "lens/steering_vector.csv", "summary.json"]:
        assert (tmp_path / rel).is_file(), rel
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["sae"]["explained_variance"] == pytest.approx(summary["sae"]["explained_variance"])
    # every probe row carries its shuffled control; the register is linearly readable, the control is not
    probes = pd.read_csv(tmp_path / "probes" / "summary.csv")
    high = probes[probes.target == "high"]
    assert (high.score_mean > 0.9).all() and (high.control_mean < 0.7).all()
    # at alpha = 0 the steered and random conditions are the same unsteered model
    sweep = pd.read_csv(tmp_path / "steering" / "sweep.csv")
    at0 = sweep[sweep.alpha == 0].groupby("metric").value.nunique()
    assert (at0 == 1).all()
