"""Lens: read a vector in a vocabulary by projecting it onto an (un)embedding matrix.

Any vector living in a model's residual space — a steering vector, an SAE decoder row, an FFN
value vector (a column of a down-projection) — gets a score per token, ``basis @ v``; the top
tokens say what the vector writes toward. The VLA steering paper reads FFN value vectors this way
(``value vector @ lm_head^T``, top 10 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import ShapeError
from .sites import resolve_site


def embedding_matrix(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix ``(V, d)`` of a Hugging Face model."""
    return model.get_input_embeddings().weight.detach()


def unembedding_matrix(model: nn.Module) -> torch.Tensor:
    """The output (unembedding) matrix ``(V, d)`` of a Hugging Face model with an LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ShapeError(f"{type(model).__name__} has no output embeddings (LM head); pass a basis matrix instead")
    return head.weight.detach()


def ffn_value_vectors(model: nn.Module, down_proj: str) -> torch.Tensor:
    """FFN value vectors of one layer: ``(d_ff, d_model)``, row ``j`` = column ``j`` of the down-projection.

    Parameters
    ----------
    down_proj
        Path of the ``nn.Linear`` that maps FFN neurons back to the residual stream
        (``"model.layers.3.mlp.down_proj"``; GPT-2's ``Conv1D`` ``mlp.c_proj`` works too).
    """
    _, module = resolve_site(model, down_proj)
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w.T.contiguous()  # Linear stores (out=d_model, in=d_ff)
    return w.contiguous()  # transformers' Conv1D stores (in=d_ff, out=d_model)


def _tokens(tokens: Any, ids: np.ndarray) -> list[str]:
    if tokens is None:
        return [str(i) for i in ids]
    if hasattr(tokens, "convert_ids_to_tokens"):
        return list(tokens.convert_ids_to_tokens([int(i) for i in ids]))
    return [str(tokens[int(i)]) for i in ids]


def lens(
    vectors: torch.Tensor | np.ndarray,
    basis: "torch.Tensor | nn.Module",
    *,
    tokens: Any = None,
    k: int = 10,
    norm: nn.Module | None = None,
    largest: bool = True,
    names: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Top-``k`` tokens of each vector under ``basis``.

    Parameters
    ----------
    vectors
        ``(d,)`` or ``(n, d)``.
    basis
        ``(V, d)`` matrix, or an ``nn.Embedding`` / ``nn.Linear`` (its weight).
    tokens
        A tokenizer (``convert_ids_to_tokens``), a list of token strings, or None (ids only).
    k
        Tokens per vector.
    norm
        Optional module applied to the vectors first (a final LayerNorm, as the logit lens does).
    largest
        Top (True) or bottom (False) scores.
    names
        A label per vector (e.g. neuron indices); default ``0..n-1``.

    Returns
    -------
    DataFrame
        ``vector``, ``rank``, ``token_id``, ``token``, ``score``.
    """
    W = basis.weight.detach() if isinstance(basis, nn.Module) else torch.as_tensor(basis)
    v = torch.as_tensor(vectors, dtype=W.dtype)
    if v.ndim == 1:
        v = v.unsqueeze(0)
    if v.shape[-1] != W.shape[-1]:
        raise ShapeError(f"vectors have width {v.shape[-1]}, basis rows have {W.shape[-1]}")
    with torch.no_grad():
        if norm is not None:
            v = norm(v)
        scores = v @ W.T  # (n, V)
        k = min(k, W.shape[0])
        top = scores.topk(k, dim=-1, largest=largest)
    names = list(names) if names is not None else list(range(v.shape[0]))
    ids = top.indices.cpu().numpy()
    vals = top.values.float().cpu().numpy()
    rows = []
    for i in range(v.shape[0]):
        toks = _tokens(tokens, ids[i])
        for r in range(k):
            rows.append({"vector": names[i], "rank": r, "token_id": int(ids[i, r]), "token": toks[r], "score": float(vals[i, r])})
    return pd.DataFrame(rows)


def value_vector_lens(
    model: nn.Module,
    down_proj: str,
    *,
    tokens: Any = None,
    k: int = 10,
    neurons: Sequence[int] | None = None,
    basis: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Top tokens of every FFN value vector of one layer (the VLA paper's neuron reading).

    ``basis`` defaults to the model's unembedding matrix. Returns :func:`lens`'s table with
    ``vector`` = neuron index.
    """
    values = ffn_value_vectors(model, down_proj)
    idx = np.arange(values.shape[0]) if neurons is None else np.asarray(neurons)
    W = unembedding_matrix(model) if basis is None else basis
    return lens(values[idx], W, tokens=tokens, k=k, names=idx.tolist())
