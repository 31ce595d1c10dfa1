"""Steering vectors, injection, clamping, alpha sweeps and their controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sciscope.core import (
    ActivationStore,
    ContrastError,
    SteeringVector,
    alpha_sweep,
    clamp,
    collect,
    contrast_vector,
    count_hooks,
    steer,
)
from sciscope.core.errors import ShapeError


@pytest.fixture()
def store():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    obs = pd.DataFrame({"group": ["north"] * 20 + ["south"] * 25 + ["east"] * 15, "lat": rng.normal(size=60)})
    X[:20] += np.array([2.0, 0, 0, 0, 1.0])
    return ActivationStore.from_arrays(obs, {"layer": X})


def test_mean_diff_equals_analytic(store):
    v = contrast_vector(store, "layer", a={"group": "north"}, b="group == 'south'")
    X = store["layer"]
    expected = X[:20].mean(0) - X[20:45].mean(0)
    np.testing.assert_allclose(v.vector.numpy(), expected, rtol=1e-6)
    assert v.meta["n_a"] == 20 and v.meta["n_b"] == 25


@pytest.mark.parametrize("method", ["pca", "probe"])
def test_other_methods_point_the_same_way(store, method):
    v = contrast_vector(store, "layer", a={"group": "north"}, b={"group": ["south", "east"]}, method=method)
    md = contrast_vector(store, "layer", a={"group": "north"}, b={"group": ["south", "east"]})
    assert v.cosine(md) > 0.8
    assert v.meta["cosine_with_mean_diff"] == pytest.approx(v.cosine(md), abs=1e-6)


def test_contrast_errors(store):
    with pytest.raises(ContrastError, match="west"):
        contrast_vector(store, "layer", a={"group": "west"}, b={"group": "south"})
    with pytest.raises(ContrastError, match="share 20 rows"):
        contrast_vector(store, "layer", a={"group": "north"}, b="lat == lat")
    with pytest.raises(ContrastError, match="no obs column 'region'"):
        contrast_vector(store, "layer", a={"region": "x"}, b={"group": "south"})


def test_random_control_has_equal_norm(store):
    v = contrast_vector(store, "layer", a={"group": "north"}, b={"group": "south"})
    r = v.random_like(seed=1)
    assert r.norm == pytest.approx(v.norm, rel=1e-6)
    assert abs(r.cosine(v)) < 0.99
    assert not torch.equal(r.vector, v.random_like(seed=2).vector)


def test_alpha_zero_bit_identical_and_nonzero_moves(gpt2, token_batches):
    batch = token_batches[0]
    with torch.no_grad():
        base = gpt2(**batch).logits
        v = torch.randn(32)
        for scale in ("absolute", "relative"):
            with steer(gpt2, v, 0.0, site="transformer.h.0", scale=scale):
                same = gpt2(**batch).logits
            assert torch.equal(same, base)
        h0 = gpt2(**batch, output_hidden_states=True).hidden_states
        with steer(gpt2, v, 3.0, site="transformer.h.1"):
            moved = gpt2(**batch).logits
    assert count_hooks(gpt2) == 0
    assert not torch.allclose(moved, base)
    # the expected way, exactly: the site's activation is h + alpha * v at every position
    from sciscope.core import capture

    with torch.no_grad(), steer(gpt2, v, 2.0, site="transformer.h.0"), capture(gpt2, ["transformer.h.0"]) as cap:
        gpt2(**batch)
    torch.testing.assert_close(cap["transformer.h.0"], h0[1] + 2.0 * v, rtol=1e-5, atol=1e-5)


def test_relative_scale_and_positions(mlp):
    x = torch.randn(4, 8)
    v = torch.zeros(16)
    v[0] = 5.0
    from sciscope.core import capture

    with capture(mlp, ["layers.0"]) as plain:
        mlp(x)
    with steer(mlp, v, 0.5, site="layers.0", scale="relative"), capture(mlp, ["layers.0"]) as cap:
        mlp(x)
    h = plain["layers.0"][:, 0]
    delta = cap["layers.0"][:, 0] - h
    torch.testing.assert_close(delta[:, 0], 0.5 * h.norm(dim=-1))
    assert torch.all(delta[:, 1:] == 0)


def test_positions_mask_on_tokens(bert, token_batches):
    from sciscope.core import capture

    batch = token_batches[0]
    v = torch.ones(32)
    with capture(bert, ["encoder.layer.0"]) as plain:
        bert(**batch)
    with steer(bert, v, 1.0, site="encoder.layer.0", positions=[0, 2]), capture(bert, ["encoder.layer.0"]) as cap:
        bert(**batch)
    diff = (cap["encoder.layer.0"] - plain["encoder.layer.0"]).abs().sum(-1)  # (B, P)
    assert torch.all(diff[:, [0, 2]] > 0) and torch.all(diff[:, [1, 3, 4, 5]] == 0)


def test_steer_width_mismatch(mlp):
    with pytest.raises(ShapeError, match="width 16"):
        with steer(mlp, torch.ones(3), 1.0, site="layers.0"):
            mlp(torch.randn(2, 8))
    assert count_hooks(mlp) == 0


def test_clamp_sets_neurons_before_down_proj(llama, token_batches):
    from sciscope.core import capture

    site = "model.layers.1.mlp.down_proj:input"
    with clamp(llama, site, [3, 7], 4.0), capture(llama, [site, "model.layers.1.mlp.down_proj"]) as cap:
        llama(**token_batches[0])
    neurons = cap[site]
    assert torch.all(neurons[..., [3, 7]] == 4.0)
    w = llama.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(cap["model.layers.1.mlp.down_proj"], neurons @ w.T, atol=1e-5, rtol=1e-4)
    assert count_hooks(llama) == 0


def test_alpha_sweep_with_random_control(mlp):
    x = torch.randn(32, 8)
    w = mlp.head.weight[0].detach()  # reading direction of output 0 from layers' output
    v = SteeringVector(w / w.norm(), "layers", "custom")

    def evaluate(model):
        with torch.no_grad():
            return {"out0": float(model(x)[:, 0].mean())}

    sweep = alpha_sweep(mlp, v, [-2, -1, 1, 2], evaluate, n_random=2, progress=False)
    t = sweep.table
    assert set(t.condition) == {"steer", "random-0", "random-1"} and 0.0 in set(t.alpha)
    assert sweep.slope("out0", "steer") == pytest.approx(float(w.norm()), rel=1e-4)
    assert abs(sweep.slope("out0", "random")) < sweep.slope("out0", "steer")
    eff = sweep.effect("out0")
    assert eff.loc[eff.alpha == 0, "steer"].item() == 0
    ax = sweep.plot("out0")
    assert ax.get_ylabel() == "out0"


def test_alpha_sweep_plot_names_its_random_directions_and_marks_alpha_zero(mlp):
    import matplotlib.pyplot as plt

    x = torch.randn(16, 8)
    w = mlp.head.weight[0].detach()
    v = SteeringVector(w / w.norm(), "layers", "custom")
    sweep = alpha_sweep(mlp, v, [-1, 1], lambda m: {"out0": float(m(x)[:, 0].mean().detach())}, n_random=3, progress=False)
    ax = sweep.plot("out0")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["steering vector", "alpha = 0 (unsteered)", "random directions (3)"]
    zero = next(line for line in ax.get_lines() if line.get_markerfacecolor() == "white")
    t = sweep.table
    assert list(zero.get_xdata()) == [0.0] and zero.get_ydata()[0] == t[(t.alpha == 0) & (t.condition == "steer")].value.item()
    plt.close("all")


def test_vector_save_load(tmp_path, store):
    v = contrast_vector(store, "layer", a={"group": "north"}, b={"group": "south"})
    v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(tmp_path / "v.safetensors")
    assert torch.equal(v.vector, w.vector) and w.site == "layer" and w.meta["n_a"] == 20


def test_vector_from_a_layout_site_steers_and_round_trips(conv, tmp_path):
    """A store captured at Site(path, layout=...) gives a vector that steer places unaided."""
    from sciscope.core import Site, capture, collect
    from sciscope.core.interventions import AddVector

    site = Site("conv1", layout="b c h w")
    x = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    x[:4] += 1.0
    obs = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 4})
    st = collect(conv, [x[:4], x[4:]], [site], out=tmp_path / "acts", obs=obs, progress=False)
    v = contrast_vector(st, "conv1", a={"g": "a"}, b={"g": "b"})
    assert (v.site, v.layout) == ("conv1", "b c h w")
    v2 = contrast_vector(st, site, a={"g": "a"}, b={"g": "b"})  # the Site itself names the store's site
    assert (v2.site, v2.layout) == ("conv1", "b c h w") and torch.equal(v2.vector, v.vector)
    with torch.no_grad(), capture(conv, [site]) as plain:
        base = conv(x)
    expected = plain["conv1"] + 1.5 * v.vector  # canonical (B, H*W, C): v added at every pixel

    def steered(vec, **kw):
        with torch.no_grad(), steer(conv, vec, 1.5, **kw), capture(conv, [site]) as cap:
            out = conv(x)
        torch.testing.assert_close(cap["conv1"], expected)
        return out

    out = steered(v)
    assert not torch.allclose(out, base)
    torch.testing.assert_close(steered(v, site="conv1"), out)  # naming the site again changes nothing
    v.save(tmp_path / "v.safetensors")
    w = SteeringVector.load(tmp_path / "v.safetensors")
    assert (w.site, w.layout, w.index) == ("conv1", "b c h w", 0) and torch.equal(w.vector, v.vector)
    torch.testing.assert_close(steered(w), out)
    assert v.random_like(3).layout == "b c h w"
    with torch.no_grad(), AddVector(v).apply(conv, 1.5):
        torch.testing.assert_close(conv(x), out)
    # a vector made directly from a Site keeps it too, and saves
    u = SteeringVector(v.vector, Site("conv1", layout="b c h w"))
    assert (u.site, u.layout) == ("conv1", "b c h w")
    u.save(tmp_path / "u.safetensors")
    assert SteeringVector.load(tmp_path / "u.safetensors").layout == "b c h w"
