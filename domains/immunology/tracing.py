"""Counterfactual pairs for causal tracing: a cell of one type and a cell of another, rank slot by rank slot.

A cell is its genes in rank order (rank-value encoding), so position ``p`` is "the gene of rank ``p``"
in every cell: a clean cell of the first steering pair's source type (default CD14+ monocytes) and a
corrupted cell of its target type (default CD19+ B cells) with as many gene tokens align slot for
slot, and differ at (nearly) every gene slot. Held-out (test-split) cells are paired first.

One rank slot (config ``trace_mask_rank``, default the top-ranked gene) is replaced by ``<mask>`` in
both cells, and the readout is the masked-gene head's logits there: which gene the model puts at that
rank given the rest of the cell. The score is the log-probability mass on the clean type's
Wilcoxon markers minus that on the corrupted type's (top ``n_markers`` each, genes on both lists left
out; the softmax normaliser cancels), larger for clean-like predictions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sciscope.core.config import Key
from sciscope.core.errors import ConfigError

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

    from .adapter import ImmunologyAdapter

__all__ = ["CONFIG_KEYS", "cell_pairs", "tracing_pairs"]

#: Config keys of the tracing analysis (it runs after the probes stage).
CONFIG_KEYS: dict[str, Key] = {
    "trace_pairs": Key(32, "probes", min=1, help="clean/corrupted cell pairs traced (fewer when fewer cells qualify)"),
    "trace_mask_rank": Key(1, "probes", min=1, help="the gene rank masked in both cells and read (1 = the top-ranked gene)"),
}


def cell_pairs(ad: "ImmunologyAdapter", src: str, tgt: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` (source cell, target cell) obs rows with as many gene tokens each, more than
    ``trace_mask_rank``; each type visited in a seeded order, test-split cells first."""
    obs, c = ad.obs, ad.config
    rng = np.random.default_rng([c["seed"], 0x7ACE])
    n_tokens = np.minimum(obs["n_tokens"].to_numpy(), ad.vocabulary.max_genes)
    ok = n_tokens > c["trace_mask_rank"]  # the masked slot and at least one other gene

    def order(cell_type: str) -> np.ndarray:
        rows = rng.permutation(np.flatnonzero((obs["cell_type"].astype(str).to_numpy() == cell_type) & ok))
        return rows[np.argsort(obs["split"].to_numpy()[rows] != "test", kind="stable")]

    free: dict[int, list[int]] = {}
    for j in order(tgt):
        free.setdefault(int(n_tokens[j]), []).append(int(j))
    a, b = [], []
    for i in order(src):
        pool = free.get(int(n_tokens[i]))
        if pool:
            a.append(int(i)), b.append(pool.pop(0))
            if len(a) == n:
                break
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


def tracing_pairs(ad: "ImmunologyAdapter", ctx: "RunContext") -> "CounterfactualPairs | None":
    """Source-type (clean) and target-type (corrupted) cells of the first steering pair, a rank slot masked in
    both, scored by the head's marker mass there (module docstring). None for a checkpoint without its
    masked-gene head, without two cell types, or when no two cells have as many gene tokens."""
    from sciscope.core.tracing import CounterfactualPairs

    from .tokenize import collate

    model = ctx.model()  # also loads a checkpoint's vocabulary
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        return None
    pairs = ad.steer_pairs()
    if not pairs:
        return None
    src, tgt = pairs[0]
    vocab, c = ad.vocabulary, ad.config
    if c["trace_mask_rank"] > vocab.max_genes:
        raise ConfigError(f"immunology: config 'trace_mask_rank' = {c['trace_mask_rank']} exceeds the model's "
                          f"{vocab.max_genes} genes per cell")
    clean_rows, bad_rows = cell_pairs(ad, src, tgt, int(c["trace_pairs"]))
    if not len(clean_rows):
        return None
    _, ranked, _ = ad._prepare()
    batches = [collate([vocab.encode(list(ranked[i])) for i in rows], vocab) for rows in (clean_rows, bad_rows)]
    B, P = batches[0]["input_ids"].shape
    slot = int(c["trace_mask_rank"]) - (0 if vocab.use_cls else 1)  # <cls> sits before rank 1
    inputs = []
    for b in batches:
        ids = b["input_ids"].clone()
        ids[:, slot] = vocab.special["mask"]
        inputs.append({"input_ids": ids, "attention_mask": b["attention_mask"]})
    genes = batches[0]["position_mask"].clone()  # gene tokens (not <cls>/<eos>/padding), equal in both
    genes[:, slot] = False

    markers = ad.type_markers()
    on, off = set(markers.get(src, [])), set(markers.get(tgt, []))
    ids_of = lambda names: torch.as_tensor(sorted(vocab.ids[g] for g in names if g in vocab.ids), dtype=torch.long)  # noqa: E731
    up, down = ids_of(on - off), ids_of(off - on)
    if not len(up) or not len(down):
        return None
    marker_ids = torch.cat([up, down])
    at_marker = genes & (torch.isin(batches[0]["input_ids"], marker_ids) | torch.isin(batches[1]["input_ids"], marker_ids))
    n_top = max(2, int(genes.sum(1).min()) // 4)  # a quarter of the gene slots: the genes that set a cell apart
    rank = torch.arange(P) - (1 if vocab.use_cls else 0) + 1  # rank of each slot
    top = genes & (rank <= n_top)

    def readout(output: Any) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits[:, slot]  # (n * B, V): the same slot in every pair

    def score(r: torch.Tensor) -> torch.Tensor:
        r = r.float()
        return torch.logsumexp(r[:, up.to(r.device)], -1) - torch.logsumexp(r[:, down.to(r.device)], -1)

    groups: dict[str, Any] = {}
    if vocab.use_cls:
        groups["<cls>"] = [0]
    groups.update({"masked slot": [slot], f"top-ranked genes (ranks <= {n_top})": top,
                   "lower-ranked genes": genes & ~top})
    if at_marker.any():
        groups["marker genes (either cell)"] = at_marker
    eos = batches[0]["attention_mask"].bool() & ~batches[0]["position_mask"]
    eos[:, 0] &= not vocab.use_cls
    if eos.any():
        groups["<eos>"] = eos
    return CounterfactualPairs(
        clean=inputs[0], corrupted=inputs[1], readout=readout, score=score, position_groups=groups,
        concept=f"a {src} cell vs a {tgt} cell ({B} pairs, as many genes each, rank {c['trace_mask_rank']} masked in both)",
        score_name=f"log-probability of {len(up)} {src} markers minus {len(down)} {tgt} markers at the masked rank")
