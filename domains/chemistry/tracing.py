"""Counterfactual pairs for causal tracing: a molecule with a functional group and the same skeleton without it.

The corrupted molecule is the clean one with every heteroatom the group's SMARTS matches replaced by a
carbon atom, edited in the clean SMILES string itself (an alcohol's ``O`` becomes ``C``, a carboxylic
acid ``C(=O)O`` becomes ``C(=C)C``, a chlorine ``Cl`` becomes ``C``). Editing one atom token for
another keeps every other token where it was, so position ``p`` is the same slot in both molecules
under SMILES and, since SELFIES follows the SMILES string's atom order, under SELFIES too. A pair is
kept only when RDKit accepts the corrupted molecule, the group's SMARTS no longer matches it, both
tokenise to the same length and they differ in exactly as many token positions as atoms were
swapped (aromatic swaps that change the kekulisation, hence bond tokens, are left out).

The readout is the language model's logits at one scored position: the last token of the molecule
for the causal GPT (it has read the whole molecule and predicts ``<eos>``), the last unchanged token,
masked in both inputs, for a masked LM. No domain score: the core's projection on the
clean-minus-corrupted logits reads "how clean-like" the prediction is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sciscope.core.config import Key
from sciscope.core.errors import ConfigError
from sciscope.core.loading import is_causal

from .tokenize import PAD, SPECIAL_TOKENS, SMILES_REGEX, UNK, MoleculeTokenizer

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

    from .adapter import ChemistryAdapter

__all__ = ["CONFIG_KEYS", "check_config", "group_pairs", "strip_group", "tracing_pairs"]

#: Config keys of the tracing analysis (it runs after the probes stage).
CONFIG_KEYS: dict[str, Key] = {
    "trace_pairs": Key(32, "probes", min=1, help="clean/corrupted molecule pairs traced (fewer when fewer qualify)"),
    "trace_group": Key("halogen", "probes", help="functional group the pairs differ in (a name of the SMARTS table)"),
}


def check_config(config: dict[str, Any], group_names: list[str]) -> None:
    """``trace_group`` names a group of the SMARTS table; a :class:`ConfigError` naming the key otherwise."""
    if config["trace_group"] not in group_names:
        raise ConfigError(f"chemistry: config 'trace_group' = {config['trace_group']!r} is not a functional group of the "
                          f"table; choose one of {group_names}")


def _is_atom(token: str) -> bool:
    """Whether a SMILES token is an atom (bracket atom, organic-subset symbol, aromatic symbol, ``*``)."""
    return token.startswith("[") or token[0].isalpha() or token == "*"


def strip_group(smiles: str, smarts: str) -> tuple[str, int] | None:
    """``(corrupted SMILES, atoms swapped)``: ``smiles`` with each heteroatom the SMARTS matches made a carbon.

    The edit is made token by token in ``smiles`` (not re-canonicalised), so the two strings align atom
    for atom; RDKit numbers atoms in the order the string lists them, which is what maps a SMARTS match
    to its tokens. None when nothing matches, no matched atom is a heteroatom, RDKit rejects the result
    or the group still matches it.
    """
    from rdkit import Chem

    mol, pattern = Chem.MolFromSmiles(smiles), Chem.MolFromSmarts(smarts)
    if mol is None or pattern is None:
        return None
    hetero = sorted({i for match in mol.GetSubstructMatches(pattern) for i in match
                     if mol.GetAtomWithIdx(i).GetAtomicNum() != 6})
    if not hetero:
        return None
    tokens = SMILES_REGEX.findall(smiles)
    atom_tokens = [k for k, t in enumerate(tokens) if _is_atom(t)]
    if len(atom_tokens) != mol.GetNumAtoms():  # explicit hydrogens or the like: no safe atom <-> token map
        return None
    for i in hetero:
        k = atom_tokens[i]
        # an aromatic atom stays aromatic (pyridine n -> benzene c); charges and hydrogens go with the bracket
        tokens[k] = "c" if mol.GetAtomWithIdx(i).GetIsAromatic() else "C"
    out = "".join(tokens)
    new = Chem.MolFromSmiles(out)
    if new is None or new.HasSubstructMatch(pattern):
        return None
    return out, len(hetero)


def group_pairs(ad: "ChemistryAdapter", tok: Any, group: str, n: int) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
    """Up to ``n`` aligned ``(clean ids, corrupted ids, clean SMILES, corrupted SMILES)`` of molecules with
    ``group``, in a seeded order."""
    obs, smarts = ad.molecules, ad.groups.set_index("name").loc[group, "smarts"]
    rows = np.flatnonzero(obs[group].to_numpy(dtype=bool))
    rows = np.random.default_rng([ad.config["seed"], 0x7ACE]).permutation(rows)
    clean, corrupt, cs, xs = [], [], [], []
    for r in rows:
        smi = str(obs["smiles"].iloc[r])
        out = strip_group(smi, smarts)
        if out is None:
            continue
        bad, swapped = out
        try:
            a, b = tok.encode(smi), tok.encode(bad)
        except ValueError:  # SELFIES cannot encode it
            continue
        diff = sum(x != y for x, y in zip(a, b))
        # same length, no unknown token, exactly the swapped atoms differ (none cut off by max_length)
        if len(a) != len(b) or UNK in b or diff != swapped:
            continue
        clean.append(a), corrupt.append(b), cs.append(smi), xs.append(bad)
        if len(clean) == n:
            break
    return clean, corrupt, cs, xs


def tracing_pairs(ad: "ChemistryAdapter", ctx: "RunContext") -> "CounterfactualPairs | None":
    """Molecules with ``trace_group`` and the same skeleton without it (module docstring), ``trace_pairs`` of them.

    Returns None (no tracing) for a checkpoint with a Hugging Face tokenizer (its merges can make an
    atom swap change the token count) or when no molecule yields a valid pair.
    """
    from sciscope.core.tracing import CounterfactualPairs

    model = ctx.model()
    tok = model.tokenizer
    if not isinstance(tok, MoleculeTokenizer):
        return None
    group = ad.config["trace_group"]
    clean, corrupt, _, _ = group_pairs(ad, tok, group, int(ad.config["trace_pairs"]))
    if not clean:
        return None
    causal = is_causal(model.config)
    B, P = len(clean), max(len(s) for s in clean)
    ids = torch.full((2, B, P), PAD, dtype=torch.long)
    att = torch.zeros((B, P), dtype=torch.long)
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        ids[0, i, : len(a)], ids[1, i, : len(b)] = torch.as_tensor(a), torch.as_tensor(b)
        att[i, : len(a)] = 1
    changed = (ids[0] != ids[1]) & att.bool()
    special = torch.isin(ids[0], torch.arange(len(SPECIAL_TOKENS))) & att.bool()
    lengths = att.sum(1)
    if causal:
        pos = lengths - 2  # the last atom/bond token: it has read the whole molecule and predicts <eos>
    else:
        # the last unchanged token, masked in both inputs (masking a changed one would hide the change)
        content = att.bool() & ~special & ~changed
        pos = torch.tensor([int(np.flatnonzero(row.numpy())[-1]) if row.any() else 1 for row in content])
        ids[:, torch.arange(B), pos] = tok.mask_token_id
    scored = torch.zeros((B, P), dtype=torch.bool)
    scored[torch.arange(B), pos] = True

    def readout(output: Any) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        rows = torch.arange(len(logits))
        return logits[rows, pos.repeat(len(logits) // B)]  # (B, V); copy-major stacks repeat the pairs

    where = "the last token (predicts <eos>)" if causal else "the last unchanged token, masked"
    return CounterfactualPairs(
        clean={"input_ids": ids[0], "attention_mask": att}, corrupted={"input_ids": ids[1], "attention_mask": att.clone()},
        readout=readout, score=None,
        position_groups={"changed atoms": changed, "rest of the molecule": att.bool() & ~special & ~changed,
                         "<bos>/<eos>": special, "readout position": scored},
        concept=f"{group} present vs its heteroatoms swapped for carbon ({B} molecules, same token count)",
        score_name=f"projection of the logits at {where} on their clean-minus-corrupted difference")
