"""Activation patching and the lens."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sciscope.core import activation_patching, count_hooks, ffn_value_vectors, lens, unembedding_matrix, value_vector_lens
from sciscope.core.errors import ShapeError


def test_patching_full_site_restores_clean(mlp):
    clean, corrupted = torch.randn(4, 8), torch.randn(4, 8)

    def metric(out):
        return float(out[:, 0].mean())

    res = activation_patching(mlp, clean, corrupted, ["layers.0", "layers.2", "layers"], metric, progress=False)
    assert res.clean_score != res.corrupted_score
    # every site lies on the only path: patching it restores the clean score exactly
    assert res.table.effect.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert count_hooks(mlp) == 0


def test_patching_per_position_finds_the_token(gpt2):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 50, (1, 5), generator=g)
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 7) % 50  # corrupt one token
    target = 11

    def metric(out):
        return float(out.logits[0, -1, target])

    res = activation_patching(gpt2, {"input_ids": clean}, {"input_ids": corrupted},
                              ["transformer.h.0"], metric, per_position=True, progress=False)
    m = res.matrix()
    assert m.loc["transformer.h.0", -1] == pytest.approx(1.0)
    # at layer 0, only position 2 differs between the runs; positions 0-1 carry nothing
    assert m.loc["transformer.h.0", 0] == pytest.approx(0.0, abs=1e-6)
    assert m.loc["transformer.h.0", 1] == pytest.approx(0.0, abs=1e-6)
    assert abs(m.loc["transformer.h.0", 2]) > 1e-3
    ax = res.plot()
    assert ax.get_xlabel() == "position"


def test_lens_top_tokens_exact():
    basis = torch.eye(6)
    v = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.0, 0.5])
    t = lens(v, basis, tokens=list("abcdef"), k=3)
    assert t.token.tolist() == ["b", "d", "f"] and t.score.tolist() == pytest.approx([3.0, 2.0, 0.5])
    bottom = lens(v, basis, tokens=list("abcdef"), k=1, largest=False)
    assert bottom.token.tolist() == ["c"]
    with pytest.raises(ShapeError, match="width 3"):
        lens(torch.ones(3), basis)


def test_ffn_value_vectors_and_lens(llama, gpt2):
    vals = ffn_value_vectors(llama, "model.layers.0.mlp.down_proj")
    w = llama.model.layers[0].mlp.down_proj.weight
    assert vals.shape == (64, 32)
    torch.testing.assert_close(vals[5], w[:, 5])
    # applying down_proj to a one-hot neuron gives its value vector
    one_hot = torch.zeros(64)
    one_hot[5] = 1.0
    torch.testing.assert_close(llama.model.layers[0].mlp.down_proj(one_hot), vals[5])
    table = value_vector_lens(llama, "model.layers.0.mlp.down_proj", k=4, neurons=[5, 9])
    assert set(table.vector) == {5, 9} and len(table) == 8
    expected = (vals[5] @ unembedding_matrix(llama).T).topk(4).indices.tolist()
    assert table[table.vector == 5].token_id.tolist() == expected
    # GPT-2's Conv1D stores (in, out): value vectors are its rows
    gvals = ffn_value_vectors(gpt2, "transformer.h.0.mlp.c_proj")
    assert gvals.shape == (128, 32)
