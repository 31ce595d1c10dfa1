"""Chemistry domain: SMILES/SELFIES molecule language models (:class:`ChemistryAdapter`, registered as
``chemistry``): property probes, functional-group features, steered generation."""

from .adapter import ChemistryAdapter
from .data import (
    canonicalize,
    functional_group_labels,
    load_functional_groups,
    load_molecules,
    molecular_properties,
    morgan_fingerprints,
    read_molecule_file,
    scaffold_split,
    score_molecules,
)
from .model import ModelSpec, generate, train_model
from .tokenize import MoleculeTokenizer, selfies_tokens, smiles_tokens

__all__ = ["ChemistryAdapter", "ModelSpec", "MoleculeTokenizer", "canonicalize", "functional_group_labels", "generate",
           "load_functional_groups", "load_molecules", "molecular_properties", "morgan_fingerprints",
           "read_molecule_file", "scaffold_split", "score_molecules", "selfies_tokens", "smiles_tokens", "train_model"]
