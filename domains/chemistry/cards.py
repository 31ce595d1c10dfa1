"""Feature cards of a molecule model: molecules with their atoms coloured by a feature's activation.

The run's SAE reads one vector per token of a molecule's SELFIES (or SMILES, config ``encoding``),
so a feature has an activation at every token. :func:`token_atoms` maps the tokens of a molecule
onto its atoms -- SELFIES through ``selfies.decoder(..., attribute=True)``, SMILES by the order of
its atom tokens -- and :func:`atom_activations` gives each atom the largest activation among its
own token and the branch, ring and bond tokens that follow it before the next atom (a SELFIES
``[Ring1]`` closes its ring at the atom before it, a ``[Branch1]`` opens its branch there).
:func:`render_examples` draws the feature's top molecules and its lower-quantile ones on one
colour scale (white -> red, :func:`activation_colour`) with a colour bar; runs whose SAE was
trained on pooled rows have no per-token activations and get plain depictions with the atoms of the
feature's best functional group highlighted (:func:`~.features.group_atoms`).

:func:`lens_basis` gives the decoder-direction lens of a card: the LM head's unembedding with the
final LayerNorm's gain folded in, so the direction reads as the SELFIES tokens it writes toward.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sciscope.core import cards as _cards
from sciscope.core.cards import Panel

from .features import group_atoms, molecule_grid
from .tokenize import SPECIAL_TOKENS, MoleculeTokenizer, selfies_tokens, smiles_tokens

if TYPE_CHECKING:
    from sciscope.core.context import RunContext

__all__ = ["activation_colour", "atom_activations", "atom_colours", "lens_basis", "render_examples", "token_atoms"]

#: Molecules drawn in the top panel (the rest of the top examples are in the card's table).
TOP_DRAWN = 6
#: Molecules per row of a panel's grid: one row, so the card's picture height limit leaves them large.
PER_ROW = 6
CELL = (200, 200)  # pixels per molecule
_SELFIES_STRUCTURAL = ("Branch", "Ring")


def _is_atom_token(token: str) -> bool:
    """An atom of a SMILES string: a bracket atom, an organic-subset symbol or ``*``; not a bond, branch or ring digit."""
    return bool(token) and (token[0] == "[" or token[0].isalpha() or token == "*")


def token_atoms(smiles: str, encoding: str) -> tuple[Any, list[int]]:
    """The molecule to draw and, per token the model reads, the atom it belongs to.

    Parameters
    ----------
    smiles
        The molecule (as in the run's obs).
    encoding
        ``"selfies"`` or ``"smiles"``: how the model tokenised it (:class:`.tokenize.MoleculeTokenizer`).

    Returns
    -------
    mol, owners
        ``mol``: an RDKit molecule whose atom ``i`` is the ``i``-th atom the tokens write (SELFIES: the
        molecule decoded from the SELFIES string, the same molecule in the decoder's atom order).
        ``owners[t]``: the atom of token ``t`` (0-based, without ``<bos>``): an atom token's own
        atom, a structural token's (branch, ring, bond, SELFIES index token) the last atom before it;
        -1 before the first atom.

    Raises
    ------
    ValueError
        When the tokens cannot be matched to the molecule's atoms (e.g. explicit hydrogens that RDKit
        drops), or the encoding is unknown.
    """
    from rdkit import Chem

    if encoding == "selfies":
        import selfies as sf

        tokens = selfies_tokens(smiles)
        decoded, attribution = sf.decoder("".join(tokens), attribute=True)
        mol = Chem.MolFromSmiles(decoded)
        atom_maps = [a for a in attribution if _is_atom_token(a.token)]
        own: dict[int, int] = {}
        for atom, amap in enumerate(atom_maps):
            # an atom in a branch is attributed to the [Branch] token and to its own token: the last non-structural one
            mine = [a.index for a in amap.attribution if not any(s in a.token for s in _SELFIES_STRUCTURAL)]
            if mine:
                own[int(mine[-1])] = atom
    elif encoding == "smiles":
        tokens = smiles_tokens(smiles)
        mol = Chem.MolFromSmiles(smiles)
        atom_maps = [t for t in tokens if _is_atom_token(t)]
        own = {t: i for i, t in enumerate(t for t, tok in enumerate(tokens) if _is_atom_token(tok))}
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected 'selfies' or 'smiles'")
    if mol is None or len(atom_maps) != mol.GetNumAtoms() or len(own) != mol.GetNumAtoms():
        raise ValueError(f"cannot match the {encoding} tokens of {smiles!r} to its atoms")
    owners, current = [], -1
    for t in range(len(tokens)):
        current = own.get(t, current)
        owners.append(current)
    return mol, owners


def atom_activations(token_values: np.ndarray, owners: list[int], n_atoms: int) -> np.ndarray:
    """Per atom, the largest activation among the tokens it owns (0 for an atom without one).

    Parameters
    ----------
    token_values
        The feature's activation at each token of the molecule (0-based, without ``<bos>``); tokens
        past its end (a molecule cut at ``max_length``) leave their atoms at 0.
    owners
        :func:`token_atoms`' atom of each token.
    n_atoms
        Atoms of the molecule.
    """
    out = np.zeros(n_atoms, dtype=np.float64)
    for t, v in zip(range(min(len(owners), len(token_values))), token_values):
        a = owners[t]
        if a >= 0 and np.isfinite(v):
            out[a] = max(out[a], float(v))
    return out


def activation_colour(value: float, vmax: float) -> tuple[float, float, float]:
    """White (0) -> red (``vmax`` and above): an RGB triple in [0, 1], linear in ``value / vmax``."""
    t = float(np.clip(value / vmax, 0.0, 1.0)) if vmax > 0 else 0.0
    return (1.0, 1.0 - t, 1.0 - t)


def atom_colours(values: np.ndarray, vmax: float) -> dict[int, tuple[float, float, float]]:
    """:func:`activation_colour` of every atom with a positive activation (atoms at 0 stay undrawn)."""
    return {int(i): activation_colour(float(v), vmax) for i, v in enumerate(values) if v > 0}


def _bond_colours(mol: Any, values: np.ndarray, vmax: float) -> dict[int, tuple[float, float, float]]:
    """A bond between two active atoms takes the colour of the weaker one: the highlight reads as one fragment."""
    out = {}
    for b in mol.GetBonds():
        v = min(values[b.GetBeginAtomIdx()], values[b.GetEndAtomIdx()])
        if v > 0:
            out[b.GetIdx()] = activation_colour(float(v), vmax)
    return out


def _colourbar_panel(png: bytes, vmax: float, title: str, caption: str) -> Panel:
    """The RDKit grid with a white -> red colour bar under it, as one panel.

    The bar is a small matplotlib figure pasted under the grid with PIL: drawing the grid itself through
    matplotlib (``imshow``) costs seconds per card for nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from PIL import Image

    grid = Image.open(io.BytesIO(png)).convert("RGB")
    fig = plt.figure(figsize=(5.0, 0.62), dpi=100)
    cax = fig.add_axes((0.05, 0.62, 0.9, 0.3))
    cmap = LinearSegmentedColormap.from_list("white_red", [activation_colour(0, 1), activation_colour(1, 1)])
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=Normalize(0, vmax if vmax > 0 else 1.0), cmap=cmap), cax=cax,
                       orientation="horizontal")
    bar.set_label("feature activation at the atom's tokens", fontsize=9, labelpad=1)
    bar.ax.tick_params(labelsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    plt.close(fig)
    legend = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    out = Image.new("RGB", (max(grid.width, legend.width), grid.height + legend.height), "white")
    out.paste(grid, (0, 0))
    out.paste(legend, ((out.width - legend.width) // 2, grid.height))
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return Panel(title=title, png=buf.getvalue(), caption=caption)


def _best_group(ctx: "RunContext", feature: int) -> tuple[str, str, float] | None:
    """The functional group with the feature's largest AUROC in the features stage's associations:
    ``(name, smarts, auroc)``; None without one above 0.5."""
    ad = ctx.adapter
    try:
        a = ctx.features().associations
    except Exception:  # noqa: BLE001 - no analysis (a notebook outside a run): draw without highlights
        return None
    if not len(a) or "stat" not in a.columns:
        return None
    mine = a[(a["feature"] == feature) & (a["stat"] == "auroc") & a["concept"].isin(ad.group_names)]
    mine = mine[np.isfinite(mine["statistic"].to_numpy(dtype=np.float64))]
    if mine.empty:
        return None
    best = mine.loc[mine["statistic"].astype(float).idxmax()]
    if not float(best["statistic"]) > 0.5:
        return None
    smarts = ad.groups.set_index("name")["smarts"]
    return str(best["concept"]), str(smarts[best["concept"]]), float(best["statistic"])


def _legend(row: Any, peak: float | None) -> str:
    head = f"#{int(row['rank'])}" if row["band"] == "top" else str(row["band"])
    return f"{head}: {float(row['activation']):.2f}" + ("" if peak is None else f"  (peak atom {peak:.2f})")


def render_examples(ctx: "RunContext", feature: int, examples: pd.DataFrame) -> list[Panel]:
    """A card's pictures: the top molecules, and those of the lower quantiles, coloured by activation.

    Per-position runs: each atom is coloured white -> red by the feature's largest activation among its
    tokens (:func:`atom_activations`), on one scale for both panels (0 to the largest atom value over
    every molecule shown), with a colour bar; legends give the molecule's activation (the mean over its
    tokens, the card's number) and its reddest atom's value (peak atom). Pooled runs (no per-token
    activations) or a tokenizer this module cannot map to atoms: plain depictions with the atoms of the
    feature's best functional group (by AUROC) highlighted.

    Parameters
    ----------
    ctx
        The run's context.
    feature
        The latent's index.
    examples
        The card's examples (``band``, ``rank``, ``activation``, ``row``, ``smiles`` ...), see
        :meth:`sciscope.core.adapter.DomainAdapter.render_examples`.

    Returns
    -------
    list of Panel
        Up to two: the top molecules (at most :data:`TOP_DRAWN`) and the lower-quantile ones.
    """
    from rdkit import Chem

    if examples.empty or "smiles" not in examples.columns:
        return []
    feature = int(feature)
    top = examples[examples["band"] == "top"].head(TOP_DRAWN)
    low = examples[examples["band"] != "top"]
    shown = pd.concat([top, low], ignore_index=True)
    encoding = str(ctx.adapter.config["encoding"])
    max_length = int(ctx.adapter.config["max_length"])
    per_token = isinstance(getattr(ctx.model(), "tokenizer", None), MoleculeTokenizer) if ctx.sae_row_mode == "positions" else False
    frames = _cards.position_activations(ctx, shown["row"].astype(int).tolist(), feature) if per_token else {}

    # per molecule: (mol, atom values or None, peak token activation or None)
    drawn: dict[int, tuple[Any, np.ndarray | None, float | None]] = {}
    for r in shown.itertuples():
        frame = frames.get(int(r.row))
        mol, values, peak = None, None, None
        if frame is not None and len(frame):
            try:
                mol, owners = token_atoms(str(r.smiles), encoding)
                acts = frame.sort_values("position")
                if len(acts) != min(len(owners) + 2, max_length):  # <bos> tokens <eos>, cut at max_length
                    raise ValueError("positions do not match the tokens")
                # position 0 is <bos>; token t of the molecule is at position t + 1 (the last position is <eos>)
                token_values = np.zeros(len(owners))
                for p, v in zip(acts["position"].to_numpy(dtype=int), acts["activation"].to_numpy(dtype=np.float64)):
                    if 1 <= p <= len(owners):
                        token_values[p - 1] = v
                values = atom_activations(token_values, owners, mol.GetNumAtoms())
                peak = float(values.max()) if values.size else 0.0  # the reddest atom (<bos>/<eos> are no atom)
            except ValueError:
                mol, values = None, None
        drawn[int(r.Index)] = (mol if mol is not None else Chem.MolFromSmiles(str(r.smiles)), values, peak)

    coloured = any(v is not None for _, v, _ in drawn.values())
    vmax = max((float(v.max()) for _, v, _ in drawn.values() if v is not None and v.size), default=0.0)
    group = None if coloured else _best_group(ctx, feature)
    panels = []
    for part, title in ((shown.iloc[: len(top)], "top molecules"), (shown.iloc[len(top):], "weaker activations")):
        items = [(row, *drawn[i]) for i, row in part.iterrows() if drawn[i][0] is not None]
        if not items:
            continue
        mols = [m for _, m, _, _ in items]
        legends = [_legend(row, peak) for row, _, _, peak in items]
        if coloured:
            vals = [v if v is not None else np.zeros(m.GetNumAtoms()) for _, m, v, _ in items]
            legends = [f"{text}  (atoms not mapped)" if v is None else text for text, (_, _, v, _) in zip(legends, items)]
            bond_colours = [_bond_colours(m, v, vmax) for m, v in zip(mols, vals)]
            png = molecule_grid(mols, legends, per_row=PER_ROW, size=CELL,
                                atoms=[[i for i, x in enumerate(v) if x > 0] for v in vals],
                                atom_colours=[atom_colours(v, vmax) for v in vals],
                                bonds=[list(b) for b in bond_colours], bond_colours=bond_colours)
            if title == "top molecules":
                caption = (f"its top {len(items)} molecules; each atom white -> red by the feature's largest activation at "
                           f"its {encoding.upper()} tokens (its own and the branch/ring tokens after it); red = {vmax:.2f} for "
                           "both panels; legend: the molecule's activation (mean over its tokens), its reddest atom")
            else:
                caption = ("molecules near the 75th, 50th and 25th percentiles of its non-zero activations, on the "
                           f"top molecules' colour scale (red = {vmax:.2f})")
            panels.append(_colourbar_panel(png, vmax, title, caption))
        else:
            hits = [group_atoms(m, group[1]) if group else [] for m in mols]
            png = molecule_grid(mols, legends, per_row=PER_ROW, size=CELL, atoms=hits)
            why = ("no per-token activations in this run (its SAE was trained on pooled molecules)"
                   if not frames else f"its {encoding} tokens could not be matched to atoms")
            caption = (f"{why}; highlighted: atoms of {group[0]}, the functional group with the feature's largest AUROC "
                       f"({group[2]:.2f})" if group else f"{why}; no functional group with AUROC above 0.5 to highlight")
            caption += "; legend: the molecule's activation"
            panels.append(Panel(title=title, png=png, caption=caption))
    return panels


def lens_basis(ctx: "RunContext") -> tuple[np.ndarray, list[str], str] | None:
    """The decoder-direction lens: ``(V, d)`` unembedding rows and their token names.

    GPT-2: the LM head's rows times the final LayerNorm's gain and centred over the width (what the
    LayerNorm does to a direction before the head reads it; its scale is left out, it ranks all tokens
    alike). RoBERTa's masked-LM head reads through a dense layer first, so its decoder rows are only a
    rough lens there. Special tokens other than ``<eos>`` are left out (no next token is ever one). None
    when the head's width is not the SAE site's (the direction would not live in its space) or the model
    has no LM head.
    """
    import torch

    from sciscope.core.lens import unembedding_matrix

    model = ctx.model()
    try:
        W = unembedding_matrix(model).float().clone()  # (V, d)
    except Exception:  # noqa: BLE001 - a checkpoint without an LM head: no lens on its cards
        return None
    d_sae_in = int(ctx.sae().W_dec.shape[1])
    if W.shape[1] != d_sae_in:
        return None
    ln = getattr(getattr(model, "transformer", None), "ln_f", None)
    if ln is not None and getattr(ln, "weight", None) is not None and ln.weight.shape[0] == W.shape[1]:
        W = W * ln.weight.detach().float()[None, :]
        W = W - W.mean(dim=1, keepdim=True)
    tok = getattr(model, "tokenizer", None)
    if isinstance(tok, MoleculeTokenizer):
        names = list(tok.vocab)
    elif tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        names = [str(t) for t in tok.convert_ids_to_tokens(list(range(W.shape[0])))]
    else:
        names = [str(i) for i in range(W.shape[0])]
    names = (names + [str(i) for i in range(len(names), W.shape[0])])[: W.shape[0]]
    keep = [i for i, t in enumerate(names) if t not in SPECIAL_TOKENS or t == "<eos>"]
    with torch.no_grad():
        return W[keep].numpy(), [names[i] for i in keep], "the LM head, final LayerNorm's gain folded in"
