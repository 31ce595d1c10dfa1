"""Tests of the chemistry adapter: data, SMARTS labels, tokenizers, models, generation, steering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("selfies")
pytest.importorskip("datamol")

from rdkit import Chem  # noqa: E402

from sciscope.core import ConfigError, collect, contrast_vector, steer  # noqa: E402
from sciscope.core import context as _context  # noqa: E402
from sciscope.core.context import RunContext  # noqa: E402
from sciscope.core.experiment import Scorer  # noqa: E402
from sciscope.core.sites import resolve_site  # noqa: E402
from sciscope.core.testing import check_adapter  # noqa: E402
from sciscope.domains.chemistry import (  # noqa: E402
    ChemistryAdapter,
    ModelSpec,
    MoleculeTokenizer,
    canonicalize,
    functional_group_labels,
    generate,
    load_functional_groups,
    load_molecules,
    molecular_properties,
    morgan_fingerprints,
    read_molecule_file,
    scaffold_split,
    score_molecules,
    smiles_tokens,
    train_model,
)
from sciscope.domains.chemistry.model import load_trained, save_trained  # noqa: E402

TINY = ChemistryAdapter.test_config
MOLS = [
    "CC(=O)O", "CCOC(C)=O", "c1ccccc1O", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "Clc1ccc(Br)cc1",
    "C[N+](C)(C)C", "O=[N+]([O-])c1ccccc1", "N#CCc1ccccc1", "C1CC2CCC1CC2", "c1ccc2c(c1)[nH]c1ccccc12",
    "CC(=O)Nc1ccc(O)cc1", "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O", "C1CCC2(CC1)CCCCC2", "FC(F)(F)c1ccccc1",
]


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_gpt() -> tuple[ChemistryAdapter, torch.nn.Module]:
    """The tiny default causal LM over SELFIES, trained once for the module (a few seconds)."""
    ad = ChemistryAdapter(TINY)
    return ad, ad.model()


# ----------------------------------------------------------------------------------------- tokenizers


def test_smiles_regex_tokens_round_trip() -> None:
    s = "C[C@@H](Cl)c1ccc(Br)cc1C%10CC[NH3+]%10"
    toks = smiles_tokens(s)
    assert "".join(toks) == s
    assert "Cl" in toks and "Br" in toks and "[C@@H]" in toks and "%10" in toks and "[NH3+]" in toks
    with pytest.raises(ValueError, match="characters"):
        smiles_tokens("CC|C")


@pytest.mark.parametrize("encoding", ["smiles", "selfies"])
def test_tokenizer_encode_decode_round_trip(encoding: str, tmp_path: Path) -> None:
    canon = [canonicalize(s, isomeric=True) for s in MOLS]
    tok = MoleculeTokenizer.build(encoding, canon, max_length=256)
    assert tok.vocab[:5] == ["<pad>", "<bos>", "<eos>", "<mask>", "<unk>"]
    for s in canon:
        ids = tok.encode(s)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        back = tok.decode(ids)
        assert Chem.CanonSmiles(back) == Chem.CanonSmiles(s), (encoding, s, back)
        if encoding == "smiles":
            assert back == s  # atom-level tokens join back to the very string
    tok.save(tmp_path)
    again = MoleculeTokenizer.load(tmp_path)
    assert again.vocab == tok.vocab and again.encoding == encoding
    batch = tok(canon[:3])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(tok.encode(canon[0]))


def test_unknown_tokens_map_to_unk() -> None:
    tok = MoleculeTokenizer.build("smiles", ["CCO"])
    ids = tok.encode("CCS")
    assert tok.unk_token_id in ids


# ----------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("smiles", "present", "absent"),
    [
        ("CC(=O)O", ["carboxylic_acid"], ["ester", "ketone", "alcohol", "aromatic_ring"]),
        ("CCOC(C)=O", ["ester"], ["carboxylic_acid", "ketone", "ether"]),
        ("CC(N)=O", ["amide"], ["primary_amine", "ketone"]),
        ("CCN", ["primary_amine"], ["secondary_amine", "tertiary_amine", "amide"]),
        ("CCNCC", ["secondary_amine"], ["primary_amine", "tertiary_amine"]),
        ("CCN(CC)CC", ["tertiary_amine"], ["secondary_amine"]),
        ("CCO", ["alcohol"], ["phenol", "ether"]),
        ("Oc1ccccc1", ["phenol", "aromatic_ring"], ["alcohol"]),
        ("CCOCC", ["ether"], ["ester", "alcohol"]),
        ("CC(C)=O", ["ketone"], ["aldehyde", "carboxylic_acid"]),
        ("CC=O", ["aldehyde"], ["ketone"]),
        ("O=[N+]([O-])c1ccccc1", ["nitro", "aromatic_ring"], ["tertiary_amine"]),
        ("CC#N", ["nitrile"], ["alkyne"]),
        ("Clc1ccccc1", ["halogen", "chloro"], ["fluoro", "bromo_iodo"]),
        ("Nc1ccc(S(N)(=O)=O)cc1", ["sulfonamide", "primary_amine"], ["sulfone"]),
        ("CCS", ["thiol"], ["thioether"]),
        ("c1ccncc1", ["pyridine_like_n", "aromatic_heterocycle"], ["tertiary_amine"]),
        ("C=CC", ["alkene"], ["aromatic_ring"]),
    ],
)
def test_smarts_labels_on_known_molecules(smiles: str, present: list[str], absent: list[str]) -> None:
    labels = functional_group_labels([smiles]).iloc[0]
    for g in present:
        assert labels[g], f"{smiles} should have {g}"
    for g in absent:
        assert not labels[g], f"{smiles} should not have {g}"


def test_functional_group_table_is_readable() -> None:
    table = load_functional_groups()
    assert list(table.columns) == ["name", "smarts", "description"]
    assert len(table) >= 20 and table["name"].is_unique
    assert (table["description"].str.len() > 0).all()


def test_properties_and_canonicalisation() -> None:
    assert canonicalize("OCC") == "CCO"
    assert canonicalize("Br.CC(N)Cc1ccc(O)cc1") == "CC(N)Cc1ccc(O)cc1"  # salt stripped
    assert canonicalize("C1CC") is None and canonicalize("") is None
    p = molecular_properties(["CC(=O)O", "c1ccccc1"])
    assert p.loc[0, "hbd"] == 1 and p.loc[1, "n_aromatic_rings"] == 1
    assert 60.0 < p.loc[0, "mol_wt"] < 60.1 and 0 < p.loc[1, "qed"] < 1
    fp = morgan_fingerprints(["CCO", "not a smiles"])
    assert fp.shape == (2, 2048) and fp[0].sum() > 0 and fp[1].sum() == 0


def test_scaffold_split_keeps_scaffolds_whole() -> None:
    obs = ChemistryAdapter({"source": "freesolv", "n_molecules": 0}).molecules
    split = scaffold_split(obs["scaffold"], 0.2, 0)
    sides = pd.DataFrame({"s": obs["scaffold"], "split": split}).groupby("s")["split"].nunique()
    assert (sides == 1).all()
    frac = (split == "test").mean()
    assert 0.1 < frac < 0.3
    assert (obs.loc[obs.scaffold == "", "split"] == "train").all()  # acyclic molecules stay in train


def test_bundled_sources_load_offline() -> None:
    sol = load_molecules("solubility")
    assert len(sol.table) > 1200 and sol.measured == ["solubility"] and len(sol.invalid) == 0
    fs = load_molecules("freesolv")
    assert fs.measured == ["hydration_free_energy"] and fs.table["hydration_free_energy"].notna().all()
    with pytest.raises(ConfigError, match="unknown source"):
        load_molecules("no_such_set")


# ------------------------------------------------------------------------------------- bad input


def test_csv_invalid_smiles_are_counted_with_line_numbers(tmp_path: Path) -> None:
    f = tmp_path / "mols.csv"
    f.write_text("name,SMILES,pIC50\na,CCO,5.1\nb,C1CC,6.0\nc,c1ccccc1,7.2\nd,not_a_smiles,4.0\ne,CC(=O)O,5.5\n")
    ms = read_molecule_file(f)
    assert len(ms.table) == 3
    assert ms.invalid["line"].tolist() == [3, 5]
    assert ms.invalid["smiles"].tolist() == ["C1CC", "not_a_smiles"]
    assert "pic50" in ms.measured  # numeric columns become probe targets


def test_csv_unclosed_quote_costs_only_its_own_line(tmp_path: Path) -> None:
    # 300 molecules on lines 2-301; line 20 opens a quote it never closes; line 302 is a bad SMILES.
    # Python's csv reader swallowed lines 20-302 into one field (18 molecules kept, "line 302").
    rows = [f"m{k},{'C' * k},{k / 10}" for k in range(1, 301)]
    rows[18] = 'm19,"CCCC,1.9'
    f = tmp_path / "mols.csv"
    f.write_text("name,smiles,value\n" + "\n".join(rows) + "\nbad,C1CC,0.5\n")
    ms = read_molecule_file(f)
    assert len(ms.table) == 299
    assert ms.invalid["line"].tolist() == [20, 302]
    assert "quote" in ms.invalid["reason"].iloc[0] and ms.invalid["smiles"].iloc[0] == 'm19,"CCCC,1.9'
    assert ms.invalid["reason"].iloc[1] == "RDKit could not parse the SMILES"
    assert ms.table["line"].iloc[-1] == 301  # physical line numbers of the kept rows
    g = tmp_path / "badheader.csv"
    g.write_text('name,"smiles\na,CCO\n')
    with pytest.raises(ConfigError, match=r"badheader\.csv.*line 1.*quote"):
        read_molecule_file(g)


def test_long_invalid_smiles_is_shortened_in_notes_and_errors(tmp_path: Path) -> None:
    long = "C(" * 2500  # 5,000 characters, unparsable
    f = tmp_path / "mols.smi"
    f.write_text("smiles\nCCO\nCC(=O)O\nc1ccccc1\n" + long + "\n")
    ad = ChemistryAdapter({"source": str(f), "n_molecules": 0, "min_group_count": 1})
    ctx = RunContext(ad, run_dir=tmp_path / "run")
    _analysis(ad, "molecules").run(ctx)
    notes = (tmp_path / "run" / "examples" / "notes.md").read_text()
    assert "line 5" in notes and "(5000 chars)" in notes and len(notes) < 2000
    listed = pd.read_csv(tmp_path / "run" / "examples" / "invalid_molecules.csv")
    assert listed["smiles"].tolist() == [long]  # the listing keeps the whole input
    g = tmp_path / "allbad.smi"
    g.write_text(long + "\n")
    with pytest.raises(ConfigError, match=r"\(5000 chars\)") as err:
        read_molecule_file(g)
    assert len(str(err.value)) < 500


def _analysis(ad: ChemistryAdapter, name: str):
    return next(a for a in ad.analyses() if a.name == name)


def test_adapter_on_user_file_lists_invalid_in_run_notes(tmp_path: Path) -> None:
    f = tmp_path / "mols.smi"
    good = ["CCO", "CC(=O)O", "c1ccccc1", "CCN", "CCCl", "c1ccncc1", "CC(C)=O", "CCOC(C)=O", "Oc1ccccc1", "CCBr"]
    f.write_text("smiles\n" + "\n".join(good[:4]) + "\nC(C\n" + "\n".join(good[4:]) + "\n")
    ad = ChemistryAdapter({"source": str(f), "n_molecules": 0, "min_group_count": 1})
    ctx = RunContext(ad, run_dir=tmp_path / "run")
    ex = ad.examples("all")
    assert len(ex) == len(good)
    assert ad.invalid_molecules["line"].tolist() == [6]
    analysis = _analysis(ad, "molecules")
    assert analysis.stage == "examples"
    rows, _ = analysis.run(ctx)
    assert rows[0]["name"] == "invalid SMILES skipped" and rows[0]["value"] == 1
    notes = (tmp_path / "run" / "examples" / "notes.md").read_text()
    assert "1 invalid SMILES skipped" in notes and "line 6" in notes
    listed = pd.read_csv(tmp_path / "run" / "examples" / "invalid_molecules.csv")
    assert listed["line"].tolist() == [6]
    # the molecules are cached in the run folder: a new adapter (another stage's process) loads them
    _context._MEMORY.clear()
    ad2 = ChemistryAdapter({"source": str(f), "n_molecules": 0, "min_group_count": 1})
    RunContext(ad2, run_dir=tmp_path / "run")
    pd.testing.assert_frame_equal(ad2.molecules, ad.molecules)
    assert ad2.invalid_molecules["line"].tolist() == [6]


def test_missing_smiles_column_and_no_valid_molecule_are_errors(tmp_path: Path) -> None:
    f = tmp_path / "nosmiles.csv"
    f.write_text("name,value\na,1\n")
    with pytest.raises(ConfigError, match=r"nosmiles\.csv.*no SMILES column"):
        read_molecule_file(f)
    g = tmp_path / "allbad.csv"
    g.write_text("smiles\nC1CC\nfoo\n")
    with pytest.raises(ConfigError, match=r"allbad\.csv.*no valid molecule.*2 invalid"):
        read_molecule_file(g)
    with pytest.raises(ConfigError, match="does not exist"):
        ChemistryAdapter({"source": str(tmp_path / "missing.csv")}).examples()
    with pytest.raises(ConfigError, match="has no column 'smi_x'"):
        read_molecule_file(f, smiles_column="smi_x")


def test_sdf_file_reads_molecules(tmp_path: Path) -> None:
    f = tmp_path / "mols.sdf"
    w = Chem.SDWriter(str(f))
    for s, v in (("CCO", 1.0), ("c1ccccc1", 2.0), ("CC(=O)O", 3.5)):
        m = Chem.MolFromSmiles(s)
        m.SetProp("activity", str(v))
        w.write(m)
    w.close()
    ms = read_molecule_file(f)
    assert sorted(ms.table["smiles"]) == sorted(["CCO", "c1ccccc1", "CC(=O)O"])
    assert ms.measured == ["activity"] and ms.table["line"].iloc[0] == 1


# ------------------------------------------------------------------------------------------ config


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="encoding"):
        ChemistryAdapter({"encoding": "inchi"})
    with pytest.raises(ConfigError, match="architecture"):
        ChemistryAdapter({"architecture": "lstm"})
    with pytest.raises(ConfigError, match="steer_groups.*no_group"):
        ChemistryAdapter({"steer_groups": ["no_group"]})
    with pytest.raises(ConfigError, match="hidden"):
        ChemistryAdapter({"hidden": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="'model'.*not a local model directory"):
        ChemistryAdapter({"model": "/no/such/dir"})
    with pytest.raises(ConfigError, match="test_fraction"):
        ChemistryAdapter({"test_fraction": 1.0})
    with pytest.raises(ConfigError, match="n_generate"):
        ChemistryAdapter({"n_generate": 0})
    # the adapter's own checks fail NaN too (they must not lean on the core's Key checks)
    nan = float("nan")
    for key in ("lr", "temperature", "test_fraction"):
        with pytest.raises(ConfigError, match=key):
            ChemistryAdapter.check_config({**ChemistryAdapter.default_config, key: nan})
    assert ChemistryAdapter.config_stages["steer_groups"] == "steering" and ChemistryAdapter.config_stages["hidden"] == "model"


# ------------------------------------------------------------------------------------------ models


def test_training_smoke_and_save_load(tmp_path: Path) -> None:
    smiles = load_molecules("freesolv").table["smiles"].tolist()[:200]
    tok = MoleculeTokenizer.build("smiles", smiles, max_length=64)
    spec = ModelSpec(architecture="roberta", n_layers=2, hidden=32, n_heads=2, max_length=64, steps=40, batch_size=16,
                     warmup=5)
    model, res = train_model(spec, tok, smiles)
    assert res.steps == 40 and res.n_train == 200 and np.isfinite(res.final_loss)
    assert res.history[-1]["loss"] < res.history[0]["loss"]  # it learns something in 40 steps
    assert model.tokenizer is tok and model.training_info["final_loss"] == res.final_loss
    (tmp_path / "ckpt").mkdir()
    save_trained(model, tmp_path / "ckpt")
    again = load_trained(tmp_path / "ckpt")
    batch = tok(smiles[:4])
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-5)
    assert again.training_info["steps"] == 40 and again.tokenizer.vocab == tok.vocab


def test_conformance_gpt_selfies(tiny_gpt, tmp_path: Path) -> None:
    ad, _ = tiny_gpt
    report = check_adapter(ad, tmp_path)
    assert report["sites"] == ["layer.0", "layer.1"]


def test_task_loss_fidelity_gpt(tiny_gpt) -> None:
    """The causal LM's task: next-token CE of held-out molecules; identity splice recovers all of it,
    zero ablation none, and zeroing the SAE site hurts (the site matters); KL beside it."""
    from sciscope.core.fidelity import fidelity

    ad, model = tiny_gpt
    task = ad.task_loss(ad.ctx)
    assert task.name.startswith("next-token cross-entropy of") and task.log_probs is not None
    assert ad.fidelity_positions == slice(1, None)  # not <bos>: one constant vector in a causal LM
    t = fidelity(model, ad.sae_site, task, {"identity": lambda h: h}, positions=ad.fidelity_positions,
                 aliases=ad.aliases).set_index("condition")
    assert np.isfinite(t.loss).all() and t.loss["clean"] > 0
    assert t.loss_recovered["identity"] == pytest.approx(1.0, abs=1e-6) and t.kl["identity"] == pytest.approx(0.0, abs=1e-6)
    assert t.loss_recovered["zero_ablation"] == 0.0
    assert t.loss["zero_ablation"] > t.loss["clean"] + 0.05 and t.kl["zero_ablation"] > 0
    assert task.fn(model) == t.loss["clean"]  # deterministic: the same held-out tokens every call


def test_conformance_roberta_smiles(tmp_path: Path) -> None:
    ad = ChemistryAdapter({**TINY, "architecture": "roberta", "encoding": "smiles"})
    report = check_adapter(ad, tmp_path)  # includes the identity splice of the masked-token task
    assert report["task_loss"].startswith("masked-token cross-entropy") and ad.fidelity_positions is None
    model = ad.model()
    assert type(model).__name__ == "RobertaForMaskedLM"
    assert ad.steering_scorer(ad.ctx, "halogen") is None and ad.steering_plans(ad.ctx) == []  # no generation


def test_concepts_targets_and_baseline(tiny_gpt) -> None:
    ad, _ = tiny_gpt
    ex = ad.examples("all")
    assert {"carboxylic_acid", "logp", "solubility"} <= set(ad.concepts)
    assert "solubility" in ad.probe_targets and ad.probe_groups == "scaffold"
    assert ex.obs[ad.group_names].dtypes.eq(bool).all()
    base = ad.baseline_features(ex)["ecfp4_1024"]
    assert base.shape == (len(ex), 1024)
    assert set(ex.obs["split"]) == {"train", "test"}


def test_default_model_is_reused_from_the_run_folder(tmp_path: Path) -> None:
    cfg = {**TINY, "train_steps": 10, "seed": 3}
    ad = ChemistryAdapter(cfg)
    ctx = RunContext(ad, run_dir=tmp_path, stage="model")
    m1 = ad.model()
    (ckpt,) = (tmp_path / "cache").glob("lm-selfies-*")
    assert (ckpt / "config.json").is_file() and (ckpt / "sciscope_tokenizer.json").is_file()
    rows, _ = _analysis(ad, "training").run(ctx)
    assert [r["name"] for r in rows] == ["final training loss (selfies)"] and np.isfinite(rows[0]["value"])
    assert (tmp_path / "model" / "training_loss_selfies.png").is_file()
    _context._MEMORY.clear()  # as in the next stage's process
    ad2 = ChemistryAdapter(cfg)
    RunContext(ad2, run_dir=tmp_path)
    m2 = ad2.model()  # loaded, not retrained
    assert m2 is not m1 and m2.training_info["final_loss"] == m1.training_info["final_loss"]
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # a saved checkpoint is also accepted as a user model directory
    ad3 = ChemistryAdapter({**cfg, "model": str(ckpt)})
    m3 = ad3.model()
    for site in ad3.sites:
        resolve_site(m3, site, ad3.aliases)


# ---------------------------------------------------------------------------------------- generation


def test_selfies_generation_is_always_valid(tiny_gpt) -> None:
    ad, model = tiny_gpt
    mols = generate(model, model.tokenizer, 64, seed=1, max_length=48)
    assert len(mols) == 64
    scores = score_molecules(mols, set())
    assert scores["validity"] == 1.0  # SELFIES decode to a molecule, always
    assert generate(model, model.tokenizer, 64, seed=1, max_length=48) == mols  # seeded
    assert generate(model, model.tokenizer, 64, seed=2, max_length=48) != mols


def test_smiles_generation_is_scored_not_guaranteed() -> None:
    ad = ChemistryAdapter({**TINY, "encoding": "smiles"})
    model = ad.model()
    mols = generate(model, model.tokenizer, 32, seed=0, max_length=48)
    s = score_molecules(mols, set(ad.examples("train").obs["smiles"]), "[F,Cl,Br,I]")
    assert 0.0 <= s["validity"] <= 1.0 and set(s) >= {"uniqueness", "novelty", "group_frequency", "logp"}


def test_steering_scorer_runs_under_steering(tiny_gpt, tmp_path: Path) -> None:
    ad, model = tiny_gpt
    ex = ad.examples("all")
    store = collect(model, ad.batches(ex, model, batch_size=32), ad.sites, out=tmp_path / "store", obs=ex.obs,
                    aliases=ad.aliases, progress=False)
    a, b = ad.contrasts["halogen"]
    vec = contrast_vector(store, ad.sae_site, a=a, b=b)
    scorer = ad.steering_scorer(ad.ctx, "halogen")
    assert isinstance(scorer, Scorer) and scorer.target == ["group_frequency"]
    assert set(scorer.off_target) == {"logp", "qed", "mol_wt", "n_heavy_atoms"} and set(scorer.damage) == {"validity", "uniqueness"}
    base = scorer(model)
    assert base["validity"].shape == (ad.config["n_generate"],)  # per sample: bootstrapped over samples
    with steer(model, vec, 0.0, aliases=ad.aliases):
        same = scorer(model)
    for k in base:  # alpha = 0 and a fixed sampling seed: identical molecules
        np.testing.assert_array_equal(base[k], same[k])
    with steer(model, vec, 4.0, aliases=ad.aliases):
        pushed = scorer(model)
    assert set(pushed) == set(base) and 0.0 <= np.nanmean(pushed["group_frequency"]) <= 1.0
    # the per-sample means are the scores of the plain metric
    mols = generate(model, model.tokenizer, ad.config["n_generate"], seed=ad.config["seed"])
    train = set(ex.obs.loc[ex.obs.split == "train", "smiles"])
    plain = score_molecules(mols, train, "[F,Cl,Br,I]")
    assert np.nanmean(base["validity"]) == pytest.approx(plain["validity"])
    assert base["uniqueness"] == pytest.approx(plain["uniqueness"])
    plans = ad.steering_plans(ad.ctx)
    assert [p.name for p in plans] == list(ad.contrasts)
    ref = plans[0].reference["training molecules"]
    assert ref["group_frequency"] == pytest.approx(ex.obs.loc[ex.obs.split == "train", plans[0].name].mean())
    assert all(p.n_controls == ad.ctx.config["steer_n_random"] for p in plans)


def test_generate_copies_equal_one_at_a_time(tiny_gpt) -> None:
    """Copies of each generation batch (the batched steering layout) sample what separate calls
    sample: the copies share each step's uniforms, and a copy whose sequences all ended stays ended
    while the others run on. Several batches (a ragged last one), and greedy decoding too."""
    from sciscope.core.interventions import apply_copies

    ad, model = tiny_gpt
    for kwargs in ({"seed": 0}, {"seed": 3, "batch_size": 7}, {"seed": 1, "temperature": 0.0}):
        one = generate(model, model.tokenizer, 17, **kwargs)
        assert len(one) == 17
        with apply_copies(model, [(None, 0.0)] * 3, aliases=ad.aliases):
            three = generate(model, model.tokenizer, 17, copies=3, **kwargs)
        assert three == [one, one, one], kwargs
    with pytest.raises(ValueError, match="copies"):
        generate(model, model.tokenizer, 4, copies=0)


def test_inverse_cdf_sampling_never_draws_a_masked_token() -> None:
    """Zero-probability tokens have empty bins (also at u = 0 and past the last bin), and the
    draws follow the probabilities."""
    from sciscope.domains.chemistry.model import _inverse_cdf

    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    for u, want in [(0.0, [1, 2]), (0.49, [1, 2]), (0.5, [3, 2]), (1 - 2**-53, [3, 2]), (1.0, [3, 2])]:
        assert _inverse_cdf(p, torch.full((2,), u, dtype=torch.float64)).tolist() == want, u
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 10, generator=g), -1)
    drawn = _inverse_cdf(probs.expand(100_000, -1), torch.rand(100_000, generator=g, dtype=torch.float64))
    np.testing.assert_allclose(torch.bincount(drawn, minlength=10).numpy() / 100_000, probs[0].numpy(), atol=0.006)


def test_steering_plan_batched_equals_one_at_a_time(tiny_gpt, tmp_path: Path) -> None:
    """The steering scorer's batched form: a plan's alphas and controls sampled as copies of each
    generation batch score exactly what one job at a time scores, and steering does change them."""
    import dataclasses

    from sciscope.core.experiment import check_batched_scorer, resolve_intervention

    ad = ChemistryAdapter(TINY)  # its own context, so the module's adapter keeps its own
    ctx = RunContext(ad, run_dir=tmp_path)
    model, ex = ctx.model(), ad.examples("all")
    collect(model, ad.batches(ex, model, batch_size=32), ad.sites, out=tmp_path / "activations" / "store", obs=ex.obs,
            aliases=ad.aliases, progress=False)
    plan = next(p for p in ad.steering_plans(ctx) if p.name == "halogen")
    assert plan.scorer.batched is not None
    # the tiny model's contrast vector is short (|v| ~ 0.03): alphas that size do change the samples
    plan = dataclasses.replace(plan, alphas=[-100.0, 100.0], n_controls=2)
    sweep = check_batched_scorer(model, plan, resolve_intervention(plan, ctx), aliases=ad.aliases)
    # the identity is not trivial: the six copies sampled differently from the unsteered model and each other
    base = sweep.samples[("steer", 0.0, "mol_wt")]
    pushed = [sweep.samples[(c, a, "mol_wt")] for c in ("steer", "random-0", "random-1") for a in (-100.0, 100.0)]
    assert all(not np.array_equal(v, base, equal_nan=True) for v in pushed)
    assert len({v.tobytes() for v in pushed}) == len(pushed)


# ------------------------------------------------------------------------------ user checkpoints


def _hf_tokenizer_dir(path: Path, encoding: str, molecules: list[str]) -> int:
    """A word-level Hugging Face tokenizer over SELFIES or atom-level SMILES tokens, saved in ``path``
    (the shape of SELFormer's / ChemBERTa's own tokenizer directories: tokenizer.json + config)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sciscope.domains.chemistry import selfies_tokens
    from sciscope.domains.chemistry.tokenize import SMILES_REGEX

    split = selfies_tokens if encoding == "selfies" else smiles_tokens
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for s in molecules:
        for t in split(s):
            vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # SELFIES tokens are bracketed ([C][=O]); SMILES arrive space-free, so split them like the atom regex
    pattern = r"\[[^\]]*\]" if encoding == "selfies" else SMILES_REGEX.pattern
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.save_pretrained(path)
    return len(vocab)


@pytest.mark.parametrize("encoding,arch", [("selfies", "roberta"), ("smiles", "gpt2")])
def test_user_hf_checkpoint_with_its_own_tokenizer(encoding: str, arch: str, tmp_path: Path) -> None:
    """A SELFormer-style (RoBERTa MLM over SELFIES) or ChemGPT-style (GPT-2 over SMILES) directory
    with its own Hugging Face tokenizer: loads offline, sites resolve, captures are per molecule."""
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM

    mols = load_molecules("solubility").table["smiles"].head(200).tolist()
    n_vocab = _hf_tokenizer_dir(tmp_path, encoding, mols)
    if arch == "roberta":
        cfg = RobertaConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=160, pad_token_id=1)
        model = RobertaForMaskedLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=n_vocab, n_embd=32, n_layer=3, n_head=2, n_positions=160, pad_token_id=1)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path)
    ad = ChemistryAdapter({**TINY, "encoding": encoding, "model": str(tmp_path), "source": "solubility"})
    assert ad.n_layers == 3 and ad.aliases["layer.{i}"].startswith("roberta.encoder.layer" if arch == "roberta" else "transformer.h")
    loaded = ad.model()
    assert type(loaded).__name__ == type(model).__name__
    assert not isinstance(loaded.tokenizer, MoleculeTokenizer)  # the checkpoint's own tokenizer
    ex = ad.examples("all")
    batch = next(iter(ad.batches(ex, loaded, batch_size=8)))
    assert (batch["input_ids"] != loaded.tokenizer.unk_token_id).float().mean() > 0.95  # tokens known, not <unk>
    store = collect(loaded, ad.batches(ex, loaded, batch_size=16), ad.sites, out=tmp_path / "store", obs=ex.obs,
                    aliases=ad.aliases, pooling="mean", progress=False)
    assert store.n_obs == len(ex) and store.array("layer.2").shape == (len(ex), 32)
    for state_a, state_b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(state_a, state_b)
    # no sciscope tokenizer: steered generation is declined with a reason, never run half-way
    assert ad.variants == []  # a user checkpoint has no encoding variant
    if arch == "gpt2":
        with pytest.warns(UserWarning, match="tokenizer"):
            assert ad.steering_scorer(ad.ctx, "halogen") is None
    else:
        assert ad.steering_scorer(ad.ctx, "halogen") is None


def test_encoding_variant_compares_probes_and_validity(tmp_path: Path) -> None:
    """compare_encodings declares the other encoding's model as a variant: captured with its own
    tokenizer, probed by a probe set, and sampled beside the main model; SELFIES samples are all
    valid, SMILES samples of an undertrained model are mostly not."""
    from sciscope.core import probe_sweep
    from sciscope.core.verdict import verdict_from_folds

    ad = ChemistryAdapter({**TINY, "compare_encodings": True, "train_steps": 20, "n_generate": 24})
    ctx = RunContext(ad, run_dir=tmp_path, stage="probes")
    assert ad.variants == ["smiles"]
    model, other = ctx.model(), ctx.model("smiles")
    assert other.tokenizer.encoding == "smiles" and model.tokenizer.encoding == "selfies"
    ex = ad.examples("all")
    b_main, b_other = next(iter(ad.batches(ex, model))), next(iter(ad.batches(ex, other)))
    assert not torch.equal(b_main["input_ids"], b_other["input_ids"])  # each model its own tokenizer
    user = ChemistryAdapter({**TINY, "compare_encodings": True, "model": str(next((tmp_path / "cache").glob("lm-selfies-*")))})
    assert user.variants == []  # a user checkpoint has no companion recipe
    (ps,) = ad.probe_sets(ctx)
    assert ps.name == "encoding_comparison" and ps.variant == "smiles" and ps.groups == "scaffold"
    assert list(ps.targets) == ad.probe_targets
    # what the probes stage does: capture the variant, fit the probe set, then run the analysis
    store = collect(model, ad.batches(ex, model, batch_size=32), ad.sites, out=tmp_path / "store", obs=ex.obs,
                    aliases=ad.aliases, pooling="mean", progress=False)
    vstore = ctx.store("smiles")
    assert (tmp_path / "activations" / "variants" / "smiles").is_dir() and vstore.n_obs == len(ex)
    assert not np.allclose(vstore.array("layer.1"), store.array("layer.1"))
    ctx.live["probes"] = probe_sweep(store, ["logp", "mol_wt"], cv=3, groups="scaffold", progress=False,
                                     baseline=ad.baseline_features(ex))
    ctx.live["probes:encoding_comparison"] = probe_sweep(vstore, ["logp", "mol_wt"], cv=3, groups="scaffold", progress=False)
    rows, _ = _analysis(ad, "encoding_comparison").run(ctx)
    table = pd.read_csv(tmp_path / "probes" / "encoding_comparison.csv")
    assert set(table["encoding"]) == {"selfies", "smiles"} and len(table) == 4 and len(rows) == 2
    assert rows[0]["name"] == "logp (r2), smiles model" and rows[0]["source"] == "probes/encoding_comparison.csv"
    # the variant is read against the main sweep's ECFP, scored on the same molecules and folds
    logp = table.query("target == 'logp' and encoding == 'smiles'").iloc[0]
    assert rows[0]["baseline_label"] == logp.baseline and rows[0]["baseline"] == pytest.approx(logp.baseline_score)
    assert rows[0]["verdict"] == verdict_from_folds(logp.best_score, logp.score_std, logp.baseline_score,
                                                    ctx.live["probes"].summary().query("target == 'logp'").baseline_std.iloc[0],
                                                    int(ctx.config["probe_cv"]))
    assert (tmp_path / "probes" / "encoding_comparison.png").is_file()
    main_best = ctx.live["probes"].summary().query("target == 'logp'").score_mean.max()
    assert table.query("target == 'logp' and encoding == 'selfies'").best_score.iloc[0] == pytest.approx(main_best)
    ctx.stage = "steering"
    grows, _ = _analysis(ad, "generation_by_encoding").run(ctx)
    v = pd.read_csv(tmp_path / "steering" / "generation_by_encoding.csv").set_index("encoding")["validity"]
    assert v["selfies"] == 1.0 and v["smiles"] < 1.0
    assert {r["name"] for r in grows} == {"generation validity, selfies model (alpha = 0)",
                                          "generation validity, smiles model (alpha = 0)"}
    ctx.stage = "model"
    trows, _ = _analysis(ad, "training").run(ctx)
    assert [r["name"] for r in trows] == ["final training loss (selfies)", "final training loss (smiles)"]
    assert (tmp_path / "model" / "training_loss_smiles.png").is_file()


def test_bundled_union_keeps_measured_properties_on_their_own_molecules() -> None:
    ms = load_molecules("bundled")
    assert ms.measured == [] and set(ms.partial) == {"solubility", "hydration_free_energy"}
    sol = ms.table[ms.table["solubility"].notna()]
    assert len(sol) > 1000 and (sol["source"] == "solubility").all()  # only ESOL's molecules carry it
    assert ms.table.loc[ms.table["source"] == "chembl_drugs", "hydration_free_energy"].isna().all()


# ------------------------------------------------------------------------------------ feature cards


def _png_rgb(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("encoding", ["selfies", "smiles"])
def test_token_atoms_give_each_atom_its_own_token(encoding: str) -> None:
    """Every atom owns one token whose symbol is its own; structural tokens belong to the atom before them."""
    from sciscope.domains.chemistry.cards import token_atoms
    from sciscope.domains.chemistry.tokenize import selfies_tokens

    smiles = "OC(=O)c1ccccc1Cl"
    mol, owners = token_atoms(smiles, encoding)
    tokens = selfies_tokens(smiles) if encoding == "selfies" else smiles_tokens(smiles)
    assert len(owners) == len(tokens) and set(owners) == set(range(mol.GetNumAtoms()))
    cl = [t for t, tok in enumerate(tokens) if "Cl" in tok]
    assert len(cl) == 1 and mol.GetAtomWithIdx(owners[cl[0]]).GetSymbol() == "Cl"
    structural = [t for t, tok in enumerate(tokens) if "Branch" in tok or "Ring" in tok or tok in "()=1"]
    assert structural and all(owners[t] == owners[t - 1] for t in structural)  # the atom before them
    assert Chem.MolToSmiles(mol) == Chem.MolToSmiles(Chem.MolFromSmiles(smiles))  # the same molecule


def test_atom_colours_follow_planted_token_activations() -> None:
    """The atom whose token carries the largest activation is the reddest (pure red at vmax); a [Ring1]
    token's activation lands on the ring-closing atom before it; atoms at zero are not drawn."""
    from sciscope.domains.chemistry.cards import activation_colour, atom_activations, atom_colours, token_atoms

    mol, owners = token_atoms("OC(=O)c1ccccc1Cl", "selfies")
    # tokens: [O] [C] [=Branch1] [C] [=O] [C] [=C] [C] [=C] [C] [=C] [Ring1] [=Branch1] [Cl]
    planted = np.zeros(len(owners))
    planted[13], planted[4], planted[11], planted[3] = 2.0, 0.5, 1.0, 0.25  # Cl, =O, Ring1, Branch1's index token
    values = atom_activations(planted, owners, mol.GetNumAtoms())
    colours = atom_colours(values, float(values.max()))
    top = int(np.argmax(values))
    assert mol.GetAtomWithIdx(top).GetSymbol() == "Cl" and colours[top] == (1.0, 0.0, 0.0)
    reds = {a: 1.0 - c[1] for a, c in colours.items()}
    assert max(reds, key=reds.get) == top and set(colours) == {owners[13], owners[4], owners[10], owners[1]}
    assert mol.GetAtomWithIdx(owners[4]).GetSymbol() == "O" and reds[owners[4]] == pytest.approx(0.25)
    assert mol.GetAtomWithIdx(owners[10]).GetIsAromatic() and values[owners[10]] == 1.0  # the ring closes there
    assert values[owners[1]] == 0.25  # the carboxyl C: the branch's index token [C] is no atom of its own
    assert activation_colour(0.0, 2.0) == (1.0, 1.0, 1.0) and activation_colour(5.0, 2.0) == (1.0, 0.0, 0.0)


def _card_examples(ad: ChemistryAdapter) -> pd.DataFrame:
    obs = ad.molecules.reset_index(drop=True)
    rows = [0, 1, 2, 3, 4]
    ex = pd.DataFrame({"band": ["top", "top", "top", "q50", "q25"], "rank": [1, 2, 3, 1, 1], "row": rows,
                       "activation": [0.9, 0.8, 0.7, 0.2, 0.1]})
    return pd.concat([ex, obs.iloc[rows].reset_index(drop=True)], axis=1)


def test_render_examples_colours_atoms_and_falls_back(tiny_gpt, monkeypatch) -> None:
    """Per-position run: two PNG panels (top, weaker) with pure red where the planted peak is; pooled run:
    plain depictions that say why."""
    from types import SimpleNamespace

    import sciscope.core.cards as core_cards
    import sciscope.domains.chemistry.cards as chem_cards
    from sciscope.domains.chemistry.cards import render_examples, token_atoms
    from sciscope.domains.chemistry.features import molecule_grid

    ad, model = tiny_gpt
    examples = _card_examples(ad)
    tok = model.tokenizer

    def planted(ctx, rows, feature):  # the molecule's last token fires, scaled by its rank
        out = {}
        for r in rows:
            n = len(tok.encode(str(ad.molecules["smiles"].iloc[r])))
            act = np.zeros(n)
            act[n - 2] = 3.0 if r == 0 else 1.0
            out[int(r)] = pd.DataFrame({"position": np.arange(n), "activation": act})
        return out

    def no_features():
        raise RuntimeError("no features stage")

    drawn = []

    def grid(mols, legends, **kw):  # record what each panel colours, then draw it
        drawn.append((mols, legends, kw))
        return molecule_grid(mols, legends, **kw)

    ctx = SimpleNamespace(adapter=ad, sae_row_mode="positions", model=lambda: model, features=no_features)
    monkeypatch.setattr(core_cards, "position_activations", planted)
    monkeypatch.setattr(chem_cards, "molecule_grid", grid)
    panels = render_examples(ctx, 7, examples)
    assert [p.title for p in panels] == ["top molecules", "weaker activations"]
    assert all(_png_rgb(p.png).shape[0] > 150 for p in panels)
    (top_mols, top_legends, top_kw), (_, weak_legends, weak_kw) = drawn
    first = top_kw["atom_colours"][0]
    _, owners = token_atoms(str(examples["smiles"].iloc[0]), "selfies")
    assert first == {owners[-1]: (1.0, 0.0, 0.0)}  # only the atom of row 0's last token, at the scale's top
    for colours in top_kw["atom_colours"][1:] + weak_kw["atom_colours"]:  # 1.0 of 3.0: a third of the way to red
        assert min(c[1] for c in colours.values()) == pytest.approx(2 / 3)
    assert top_legends[0] == "#1: 0.90  (peak atom 3.00)" and weak_legends[0].startswith("q50: 0.20")
    assert "white -> red" in panels[0].caption and "red = 3.00" in panels[0].caption

    monkeypatch.setattr(core_cards, "position_activations", lambda ctx, rows, feature: {})
    ctx.sae_row_mode = "pooled"
    plain = render_examples(ctx, 7, examples)
    assert len(plain) == 2 and all("no per-token activations" in p.caption for p in plain)
    assert all(_png_rgb(p.png).shape[1] > 100 for p in plain)


def test_group_auroc_statistic_matches_a_direct_auroc(tiny_gpt) -> None:
    """group_auroc is the largest AUROC over the groups on >= 1% of molecules: a feature that is a group's
    indicator scores 1.0, a random one near 0.5 and never above the direct computation's max."""
    from sklearn.metrics import roc_auc_score

    from sciscope.domains.chemistry.features import group_auroc_statistic

    ad, _ = tiny_gpt
    obs = ad.molecules.reset_index(drop=True)
    g = max(ad.group_names, key=lambda c: obs[c].sum())
    rng = np.random.default_rng(0)
    acts = np.column_stack([obs[g].to_numpy(float), rng.random(len(obs))])
    out = group_auroc_statistic(ad)(acts, obs)
    assert list(out.columns) == ["group_auroc"] and out["group_auroc"].iloc[0] == pytest.approx(1.0)
    direct = max(roc_auc_score(obs[c], acts[:, 1]) for c in ad.group_names if 2 <= obs[c].sum() <= len(obs) - 2)
    assert out["group_auroc"].iloc[1] == pytest.approx(direct)
    assert ad.card_ranking == "group_auroc" and "group_auroc" in ad.feature_statistics


def test_lens_basis_reads_the_lm_head_over_the_vocabulary(tiny_gpt) -> None:
    from types import SimpleNamespace

    from sciscope.domains.chemistry.cards import lens_basis

    ad, model = tiny_gpt
    width = model.config.n_embd
    ctx = SimpleNamespace(model=lambda: model, sae=lambda: SimpleNamespace(W_dec=torch.zeros(16, width)))
    matrix, names, _ = lens_basis(ctx)
    assert matrix.shape == (len(names), width) and "<eos>" in names and "<pad>" not in names and "[C]" in names
    head = model.lm_head.weight.detach().numpy() * model.transformer.ln_f.weight.detach().numpy()
    i = model.tokenizer.vocab.index("[C]")
    assert np.allclose(matrix[names.index("[C]")], head[i] - head[i].mean(), atol=1e-5)
    ctx.sae = lambda: SimpleNamespace(W_dec=torch.zeros(16, width + 1))
    assert lens_basis(ctx) is None  # a direction of another width does not live in the head's space


# ------------------------------------------------------------------------------------------- tracing


def test_tracing_pairs_swap_the_groups_atoms_and_keep_the_token_count(tiny_gpt) -> None:
    from sciscope.domains.chemistry.tracing import group_pairs, strip_group

    from .tracing_checks import check_pairs, differing_positions

    # an atom for an atom, in the SMILES string itself: the skeleton and the token count stay
    assert strip_group("OC(CCl)CCl", "[F,Cl,Br,I]") == ("OC(CC)CC", 2)
    assert strip_group("O=C(O)c1ccccc1", "[CX3](=O)[OX2H1,OX1-]") == ("C=C(C)c1ccccc1", 2)
    assert strip_group("CCO", "[F,Cl,Br,I]") is None  # no group: no pair
    ad, model = tiny_gpt
    ctx = RunContext(ad)
    pairs = ad.tracing_pairs(ctx)
    assert pairs is not None and "halogen" in pairs.concept
    ids, att = pairs.clean["input_ids"], pairs.clean["attention_mask"]
    measured = check_pairs(model, pairs, n_positions=ids.shape[1])
    assert measured["B"] == min(TINY.get("trace_pairs", 32), 32)
    # exactly the swapped atoms differ, and each is a halogen token in the clean molecule
    n_diff = differing_positions(pairs)
    assert (n_diff >= 1).all() and torch.equal(pairs.position_groups["changed atoms"].sum(1), n_diff)
    vocab = model.tokenizer.vocab
    clean_tokens = {vocab[int(t)] for t in ids[pairs.position_groups["changed atoms"]]}
    assert clean_tokens <= {"[F]", "[Cl]", "[Br]", "[I]"}, clean_tokens
    # each corrupted molecule is valid and has no halogen
    _, _, cs, xs = group_pairs(ad, model.tokenizer, "halogen", 4)
    assert all(Chem.MolFromSmiles(x) is not None and not any(h in x for h in ("F", "Cl", "Br", "I")) for x in xs)
    # the groups partition the real tokens; the readout position is the last token before <eos>
    g = pairs.position_groups
    assert torch.equal((g["changed atoms"] | g["rest of the molecule"] | g["<bos>/<eos>"]), att.bool())
    assert torch.equal(g["readout position"].float().argmax(1), att.sum(1) - 2)
    # a masked LM reads a masked, unchanged position instead
    mlm = ChemistryAdapter({**TINY, "architecture": "roberta", "trace_pairs": 6})
    mp = mlm.tracing_pairs(RunContext(mlm))
    pos = mp.position_groups["readout position"]
    assert (mp.clean["input_ids"][pos] == 3).all() and (mp.corrupted["input_ids"][pos] == 3).all()  # <mask> in both
    assert not (pos & mp.position_groups["changed atoms"]).any()
    check_pairs(mlm.ctx.model(), mp, n_positions=mp.clean["input_ids"].shape[1])


def test_tracing_config_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="trace_group"):
        ChemistryAdapter({**TINY, "trace_group": "unobtainium"})
    with pytest.raises(ConfigError, match="trace_pairs"):
        ChemistryAdapter({**TINY, "trace_pairs": 0})
