"""Geneformer-style rank-value encoding of cells, and the gene vocabulary saved with a model.

A cell becomes its expressed genes ordered by normalised expression divided by each gene's
non-zero median over the corpus (Theodoris et al. 2023): ubiquitous housekeeping genes drop, genes
rarely this high rise, so a cell's first tokens are the genes that distinguish it. Only the top
``max_genes`` are kept; a gene's position is its rank. Special tokens follow Geneformer: ``<pad>`` = 0,
``<mask>`` = 1, and (as in V2) ``<cls>`` / ``<eos>`` around the genes. Pickled dictionaries
(Geneformer ships ``.pkl``) are never unpickled: unpickling runs code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import scipy.sparse as sp
import torch

from sciscope.core.errors import ConfigError
from sciscope.core.io import write_text

__all__ = ["CLS", "EOS", "MASK", "PAD", "SPECIAL_TOKENS", "VOCAB_FILE", "GeneVocab", "collate", "rank_value_encode"]

PAD, MASK, CLS, EOS = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
VOCAB_FILE = "sciscope_gene_vocab.json"
GENEFORMER_TOKENS = "token_dictionary.json"
GENEFORMER_MEDIANS = "gene_median_dictionary.json"


@dataclass
class GeneVocab:
    """Gene tokens of a model: special tokens first, then one token per gene.

    Attributes
    ----------
    tokens : list[str]
        Token strings by id for sciscope models; for a Geneformer dictionary ids come from ``ids``.
    medians : dict[str, float]
        Each gene's non-zero median in the model's training corpus (empty: use the data's, and say so).
    max_genes : int
        Genes per cell (sequence length without ``<cls>``/``<eos>``).
    use_cls : bool
        Whether sequences start with ``<cls>`` and end with ``<eos>`` (Geneformer V1 has neither).
    source : str
        ``"sciscope"`` or ``"geneformer"``.
    """

    tokens: list[str]
    medians: dict[str, float] = field(default_factory=dict)
    max_genes: int = 128
    use_cls: bool = True
    source: str = "sciscope"
    ids: dict[str, int] = field(default_factory=dict)
    special: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = {t: i for i, t in enumerate(self.tokens)}
        if not self.special:
            self.special = {"pad": PAD, "mask": MASK, "cls": CLS, "eos": EOS}

    @classmethod
    def build(cls, genes: Sequence[str], medians: Sequence[float], *, max_genes: int) -> "GeneVocab":
        """A vocabulary over ``genes`` (those with a finite median, i.e. expressed somewhere)."""
        med = {str(g): float(m) for g, m in zip(genes, medians) if np.isfinite(m) and m > 0}
        return cls(tokens=list(SPECIAL_TOKENS) + list(med), medians=med, max_genes=int(max_genes))

    @property
    def vocab_size(self) -> int:
        return max(self.ids.values()) + 1

    @property
    def genes(self) -> list[str]:
        """Gene tokens (no special tokens)."""
        specials = set(self.special.values())
        return [g for g, i in self.ids.items() if i not in specials and not g.startswith("<")]

    def gene_ids(self) -> np.ndarray:
        """Sorted ids of every gene token (the MLM softmax is restricted to these)."""
        return np.array(sorted(self.ids[g] for g in self.genes), dtype=np.int64)

    def special_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True where ``ids`` is a special token."""
        return torch.isin(ids, torch.as_tensor(list(self.special.values()), dtype=ids.dtype))

    def encode(self, genes: Sequence[str]) -> list[int]:
        """Ids of a ranked gene list, truncated to ``max_genes``, with ``<cls>``/``<eos>`` if used."""
        ids = [self.ids[g] for g in genes[: self.max_genes]]
        if self.use_cls:
            ids = [self.special["cls"], *ids, self.special["eos"]]
        return ids

    # -- I/O -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``sciscope_gene_vocab.json`` into ``directory`` (atomically)."""
        path = Path(directory) / VOCAB_FILE
        payload = {"tokens": self.tokens, "medians": self.medians, "max_genes": self.max_genes,
                   "use_cls": self.use_cls, "special_tokens": list(SPECIAL_TOKENS), "format": 1}
        write_text(path, json.dumps(payload))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "GeneVocab":
        """Read the vocabulary of a model directory: ``sciscope_gene_vocab.json`` (trained here) or a
        Geneformer-style ``token_dictionary.json`` (``{gene_id: token_id}`` with ``<pad>``, ``<mask>``
        and in V2 ``<cls>``/``<eos>``) plus optional ``gene_median_dictionary.json``; the sequence
        length comes from the checkpoint's ``max_position_embeddings``.

        Raises
        ------
        ConfigError
            No readable vocabulary in ``directory`` (a pickled one is named, never opened).
        """
        d = Path(directory)
        f = d / VOCAB_FILE
        if f.is_file():
            try:
                p = json.loads(f.read_text())
                return cls(tokens=list(p["tokens"]), medians={k: float(v) for k, v in p.get("medians", {}).items()},
                           max_genes=int(p["max_genes"]), use_cls=bool(p.get("use_cls", True)))
            except (KeyError, ValueError, TypeError) as e:
                raise ConfigError(f"immunology: {f} is not a valid gene vocabulary: {e}") from None
        if (d / GENEFORMER_TOKENS).is_file():
            return cls._load_geneformer(d)
        pickles = sorted(p.name for p in d.glob("*.pkl"))
        hint = ""
        if pickles:
            hint = (f"; found pickled dictionaries {pickles}, which sciscope does not unpickle (it can run code): if you "
                    f"trust them, convert once with python -c \"import json,pickle; json.dump(pickle.load(open('{pickles[0]}','rb')),"
                    f" open('{GENEFORMER_TOKENS}','w'))\"")
        raise ConfigError(f"immunology: {d} has no gene vocabulary ({VOCAB_FILE} or {GENEFORMER_TOKENS}){hint}")

    @classmethod
    def _load_geneformer(cls, d: Path) -> "GeneVocab":
        try:
            ids = {str(k): int(v) for k, v in json.loads((d / GENEFORMER_TOKENS).read_text()).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"immunology: {d / GENEFORMER_TOKENS} is not a {{gene: id}} JSON object: {e}") from None
        for tok in ("<pad>", "<mask>"):
            if tok not in ids:
                raise ConfigError(f"immunology: {d / GENEFORMER_TOKENS} has no {tok!r} token (a Geneformer dictionary has <pad> and <mask>)")
        special = {"pad": ids["<pad>"], "mask": ids["<mask>"]}
        use_cls = "<cls>" in ids and "<eos>" in ids
        if use_cls:
            special.update(cls=ids["<cls>"], eos=ids["<eos>"])
        m = d / GENEFORMER_MEDIANS
        medians = {str(k): float(v) for k, v in json.loads(m.read_text()).items()} if m.is_file() else {}
        max_genes = 2048
        cfg = d / "config.json"
        if cfg.is_file():
            n_pos = int(json.loads(cfg.read_text()).get("max_position_embeddings", 2048))
            max_genes = n_pos - (2 if use_cls else 0)
        tokens = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
        return cls(tokens=tokens, medians=medians, max_genes=max_genes, use_cls=use_cls, source="geneformer",
                   ids=ids, special=special)


def rank_value_encode(
    X_norm: sp.csr_matrix, genes: Sequence[str], medians: np.ndarray, *, max_genes: int
) -> list[list[str]]:
    """Each cell's genes ranked by normalised expression / gene median, top ``max_genes``.

    Parameters
    ----------
    X_norm
        ``(n_cells, n_genes)`` per-cell normalised expression (linear scale); columns are ``genes``.
    medians
        ``(n_genes,)`` non-zero medians; genes with a non-finite or zero median (unknown to the
        vocabulary, or never expressed) are skipped.

    Returns
    -------
    One list of gene identifiers per cell, highest first; ties keep column order.
    """
    X = sp.csr_matrix(X_norm)
    med = np.asarray(medians, dtype=np.float64)
    ok = np.isfinite(med) & (med > 0)
    inv = np.where(ok, 1.0 / np.where(ok, med, 1.0), 0.0)
    gene_arr = np.asarray(genes, dtype=object)
    out: list[list[str]] = []
    for i in range(X.shape[0]):
        cols = X.indices[X.indptr[i]:X.indptr[i + 1]]
        vals = X.data[X.indptr[i]:X.indptr[i + 1]] * inv[cols]
        keep = vals > 0
        cols, vals = cols[keep], vals[keep]
        # sort by value descending, ties by column: lexsort's last key is the primary one
        order = np.lexsort((cols, -vals))[:max_genes]
        out.append(gene_arr[cols[order]].tolist())
    return out


def collate(seqs: Sequence[Sequence[int]], vocab: GeneVocab) -> dict[str, torch.Tensor]:
    """Right-pad id lists into ``input_ids``, ``attention_mask`` and ``position_mask``.

    ``position_mask`` marks gene tokens (not ``<cls>``, ``<eos>`` or padding): the positions a
    cell embedding averages over (Geneformer's cell embedding is the mean of its gene embeddings).
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), vocab.special["pad"], dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    att = (ids != vocab.special["pad"]).long()
    genes = ~vocab.special_mask(ids)
    return {"input_ids": ids, "attention_mask": att, "position_mask": genes}
