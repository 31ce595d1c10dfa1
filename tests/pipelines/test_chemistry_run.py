"""The chemistry pipeline on a tiny configuration over a user CSV with bad lines: the report lists
the invalid SMILES with their line numbers, its numbers agree with the run's tables, SMILES and
SELFIES sit side by side, and the notebook executes on the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("selfies")
pytest.importorskip("datamol")

pytestmark = pytest.mark.slow

TINY = ["card_top=3", "card_controls=2", "n_molecules=0", "train_steps=80", "n_layers=2", "hidden=32", "n_heads=2", "max_length=96", "n_generate=48",
        "sae_steps=150", "sae_expansion=4", "steer_n_random=1", "steer_alphas=-2,2", "steer_groups=halogen",
        "min_group_count=3", "compare_encodings=true", "probe_targets=logp,mol_wt"]
BAD = {"C1CC": "unclosed ring", "c1ccccc1N(=O)(=O)=O": "valence"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from sciscope.domains.chemistry import load_molecules

    root = tmp_path_factory.mktemp("chem")
    good = load_molecules("solubility").table["smiles"].head(260).tolist()
    rows = [(s, "ok") for s in good[:100]] + [(b, why) for b, why in BAD.items()] + [(s, "ok") for s in good[100:]]
    pd.DataFrame(rows, columns=["SMILES", "comment"]).to_csv(root / "mols.csv", index=False)
    args = [sys.executable, "-m", "sciscope.pipelines.cli", "run", "chemistry", "--quiet", "--run", "tiny",
            "--set", f"source={root / 'mols.csv'}"]
    for s in TINY:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "runs" / "chemistry" / "tiny"


def test_invalid_smiles_are_listed_with_line_numbers(run_dir: Path) -> None:
    invalid = pd.read_csv(run_dir / "examples" / "invalid_molecules.csv")
    # header is line 1, so the first bad row (after 100 good ones) is line 102
    assert invalid["line"].tolist() == [102, 103] and invalid["smiles"].tolist() == list(BAD)
    html = (run_dir / "report" / "report.html").read_text()
    assert "line 102" in html and "C1CC" in html


def test_report_numbers_agree_with_tables(run_dir: Path) -> None:
    from sciscope.pipelines.report import headline_values

    rows = {r["name"]: r for r in headline_values(run_dir / "report" / "report.html")}
    comparison = pd.read_csv(run_dir / "probes" / "encoding_comparison.csv")
    smiles_logp = comparison.query("target == 'logp' and encoding == 'smiles'").iloc[0]
    assert float(rows["logp (r2), smiles model"]["value"]) == pytest.approx(smiles_logp.best_score, rel=1e-6)
    assert float(rows["logp (r2), smiles model"]["control"]) == pytest.approx(smiles_logp.control_at_best, rel=1e-6)
    summary = pd.read_csv(run_dir / "probes" / "encoding_smiles" / "summary.csv")
    assert smiles_logp.best_score == pytest.approx(summary.query("target == 'logp'").score_mean.max())
    gen = pd.read_csv(run_dir / "steering" / "generation_by_encoding.csv").set_index("encoding")
    row = rows["generation validity, selfies model (alpha = 0)"]
    assert float(row["value"]) == pytest.approx(gen.loc["selfies", "validity"]) == 1.0
    assert float(row["control"]) == pytest.approx(gen.loc["smiles", "validity"])
    assert "invalid SMILES skipped" in rows and float(rows["invalid SMILES skipped"]["value"]) == 2
    assert "final training loss (smiles)" in rows
    sweep = pd.read_csv(run_dir / "steering" / "halogen" / "sweep.csv")
    s = sweep[(sweep.metric == "group_frequency") & (sweep.condition == "steer")]
    slope = np.polyfit(s.alpha, s.value, 1)[0]
    assert float(rows["halogen: slope of group_frequency per unit alpha"]["value"]) == pytest.approx(slope, rel=1e-6, abs=1e-12)
    # unsteered generation in the sweep (alpha = 0) is the main model's row of the encoding table
    base = sweep[(sweep.metric == "validity") & (sweep.alpha == 0)]
    assert base.value.iloc[0] == pytest.approx(gen.loc["selfies", "validity"])


def test_both_models_and_controls(run_dir: Path) -> None:
    import json

    for enc in ("selfies", "smiles"):  # both models trained once, kept in the run's cache, loss curves in model/
        (ckpt,) = (run_dir / "cache").glob(f"lm-{enc}-*")
        assert (ckpt / "config.json").is_file() and (run_dir / "model" / f"training_loss_{enc}.png").is_file()
    # the encoding variant is captured by the core beside the main store
    assert (run_dir / "activations" / "variants" / "smiles" / "manifest.json").is_file()
    # the steering plan ran alpha = 0, both alphas and the random control, with the training molecules as reference
    summary = json.loads((run_dir / "steering" / "halogen" / "summary.json").read_text())
    assert summary["plan"]["n_controls"] == 1 and summary["headline"]["score"] == "group_frequency"
    assert 0.0 < summary["reference"]["training molecules"]["group_frequency"] < 1.0
    sweep = pd.read_csv(run_dir / "steering" / "halogen" / "sweep.csv")
    assert set(sweep.condition) == {"steer", "random-0"} and sorted(set(sweep.alpha)) == [-2.0, 0.0, 2.0]
    assert (run_dir / "steering" / "halogen" / "vector.safetensors").is_file()
    comparison = pd.read_csv(run_dir / "probes" / "encoding_comparison.csv")
    mw = comparison[comparison.target == "mol_wt"]
    assert (mw.best_score > mw.control_at_best + 0.2).all()  # molecular weight is easy: both beat shuffled labels
    groups = pd.read_csv(run_dir / "features" / "functional_groups.csv")
    assert len(groups) and (groups.auroc >= 0.5).all()
    assert any((run_dir / "features").glob("top_molecules_*.png"))


def test_notebook_executes_on_the_run(run_dir: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(__file__).parents[2] / "notebooks" / "chemistry.ipynb", as_version=4)
    os.environ["SCISCOPE_RUN_DIR"] = str(run_dir)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}).execute()
    finally:
        os.environ.pop("SCISCOPE_RUN_DIR", None)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("frequency" in "".join(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")


def test_feature_cards_carry_the_domain_pictures(run_dir: Path):
    from tests.pipelines.cards_check import check_domain_cards

    check_domain_cards(run_dir)
