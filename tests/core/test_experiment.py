"""The experiment engine: interventions, their matched controls, run_plan and its summary."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sciscope.core import count_hooks
from sciscope.core.experiment import Analysis, Scorer, SteeringPlan, plan_headline_rows, run_plan
from sciscope.core.errors import ShapeError
from sciscope.core.interventions import (AblateFeatures, AddVector, Clamp, SteerFeature, apply_copies,
                                         matched_density_features, split_copies, tile_copies)
from sciscope.core.sae import create_sae, sae_config
from sciscope.core.steer import SteeringVector
from sciscope.core.verdict import ABOVE, BELOW, NO_BETTER


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))


X = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))


def _readout(model: nn.Module) -> dict[str, np.ndarray]:
    with torch.no_grad():
        y = model(X)
    return {"y0": y[:, 0].numpy(), "y1": y[:, 1].numpy()}


def test_add_vector_moves_the_readout_and_leaves_no_hook():
    model = _mlp()
    v = SteeringVector(model[2].weight[0].detach().clone(), "1")  # the ReLU output direction read by y0
    iv = AddVector(v)
    base = _readout(model)["y0"].mean()
    with iv.apply(model, 2.0):
        up = _readout(model)["y0"].mean()
        assert count_hooks(model) == 1
    assert count_hooks(model) == 0
    assert up - base == pytest.approx(2.0 * float(v.vector @ v.vector), rel=1e-4)  # y0 reads h linearly
    controls = iv.controls(model, 3, seed=5)
    assert [round(c.vector.norm, 5) for c in controls] == [round(v.norm, 5)] * 3
    assert len({tuple(c.vector.vector[:3].tolist()) for c in controls}) == 3  # different directions
    again = iv.controls(model, 3, seed=5)
    assert torch.equal(controls[0].vector.vector, again[0].vector.vector)  # seeded


def test_clamp_sets_units_and_its_control_draws_as_many_random_units_per_site():
    model = _mlp()
    seen = {}
    model[2].register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0].detach().clone()))
    iv = Clamp({"2:input": [1, 5]})
    with iv.apply(model, 3.0):
        model(X)
    assert torch.all(seen["h"][:, [1, 5]] == 3.0)
    model(X)
    assert not torch.all(seen["h"][:, [1, 5]] == 3.0)
    ctrl = iv.controls(model, 4, seed=0)
    for c in ctrl:
        assert list(c.units) == ["2:input"] and len(c.units["2:input"]) == 2
        assert all(0 <= u < 64 for u in c.units["2:input"]) and not set(c.units["2:input"]) & {1, 5}
    assert len({tuple(c.units["2:input"]) for c in ctrl}) > 1


def test_sae_feature_interventions_steer_and_ablate():
    torch.manual_seed(0)
    sae = create_sae(sae_config("relu", d_in=64, d_sae=16), seed=0)
    model = _mlp()
    seen = {}
    model[2].register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0].detach().clone()))
    model(X)
    h0 = seen["h"]
    with SteerFeature(sae, [3], "1").apply(model, 2.0):
        model(X)
    direction = sae.W_dec[3].detach() / sae.W_dec[3].detach().norm()
    assert torch.allclose(seen["h"] - h0, 2.0 * direction.expand_as(h0), atol=1e-5)
    with AblateFeatures(sae, [3, 4], "1").apply(model, 1.0):
        model(X)
    f = sae.encode(h0)[:, [3, 4]]
    expected = h0 - f @ sae.W_dec.detach()[[3, 4]]
    assert torch.allclose(seen["h"], expected, atol=1e-5)
    density = np.linspace(0.0, 1.0, 16)
    with pytest.raises(ValueError, match="density"):
        SteerFeature(sae, [3], "1").controls(model, 2)
    ctrl = SteerFeature(sae, [3, 12], "1", density=density).controls(model, 5, seed=1)
    for c in ctrl:
        assert not set(c.features) & {3, 12}
        # matched density: each control feature near its feature's density rank
        assert abs(c.features[0] - 3) <= 4 and abs(c.features[1] - 12) <= 4


def test_matched_density_features_never_picks_the_chosen_ones():
    d = np.random.default_rng(0).random(200)
    picks = matched_density_features(d, [0, 1, 2], seed=3)
    assert len(set(picks)) == 3 and not set(picks) & {0, 1, 2}


def _plan(model: nn.Module, *, n_controls: int = 10, broken_above: float | None = None) -> tuple[SteeringPlan, AddVector]:
    v = SteeringVector(model[2].weight[0].detach().clone(), "1")

    def score(m: nn.Module) -> dict:
        out = _readout(m)
        if broken_above is not None and out["y0"].mean() > broken_above:
            out["y0"] = np.full_like(out["y0"], np.nan)  # a diverged run
        return out

    plan = SteeringPlan("push_y0", AddVector(v), Scorer(score, target=["y0"], off_target=["y1"]),
                        alphas=[-2, -1, 1, 2, 4], n_controls=n_controls, seed=0)
    return plan, plan.intervention  # type: ignore[return-value]


def test_run_plan_reads_a_planted_effect_beside_its_controls():
    model = _mlp()
    plan, iv = _plan(model)
    sweep = run_plan(model, plan, iv)
    assert count_hooks(model) == 0
    t = sweep.table
    assert set(t.condition) == {"steer", *[f"random-{i}" for i in range(10)]}
    # alpha = 0 run once, standing for every condition
    zero = t[(t.alpha == 0.0) & (t.metric == "y0")].value
    assert zero.nunique() == 1 and len(zero) == 11
    s = sweep.summary()
    assert s["score"] == "y0" and s["n_controls"] == 10
    assert s["slope"] > 0 and s["slope"] > 3 * s["control_slope_mean_abs"]
    assert s["p_slope"] == pytest.approx(1 / 11)  # no control reaches the vector's |slope|
    assert s["monotonic"] is True and s["alpha_plus"] == 4.0 and s["alpha_minus"] == -2.0
    assert math.isnan(s["breakdown_alpha"])
    lo, hi = s["effect_plus_ci"]
    assert lo <= s["effect_plus"] <= hi and s["n_examples"] == 64
    rows = plan_headline_rows(sweep, source="steering/push_y0/summary.json")
    assert rows[0]["name"] == "push_y0: change in y0 at alpha 4" and rows[0]["value"] == pytest.approx(s["effect_plus"])
    assert {r["name"] for r in rows[1:]} == {"push_y0: slope of y0 per unit alpha", "push_y0: slope of y1 per unit alpha"}
    # the baseline is the luckiest of the 10 random controls; the planted vector beats it
    assert rows[0]["baseline"] == pytest.approx(s["control_effect_plus_max_abs"]) and rows[0]["verdict"] == ABOVE
    assert rows[0]["baseline_label"] == "largest |change| of 10 random controls (read with the intended sign: up)"
    # y1, the off-target score, is read the other way round: moving it beyond every control is a side effect
    y1 = next(r for r in rows if r["name"] == "push_y0: slope of y1 per unit alpha")
    assert y1["verdict"] == (BELOW if abs(y1["value"]) > y1["baseline"] else NO_BETTER)


def test_a_target_pushed_the_wrong_way_beyond_every_control_reads_below_baseline():
    model = _mlp()
    plan, iv = _plan(model)
    plan.scorer = Scorer(plan.scorer.fn, target=["y0"], off_target=["y1"], decrease=["y0"])  # meant to fall, it rises
    rows = plan_headline_rows(run_plan(model, plan, iv), source="s.json")
    assert rows[0]["value"] > rows[0]["baseline"] and rows[0]["verdict"] == BELOW
    assert rows[0]["baseline_label"].endswith("(read with the intended sign: down)")
    with pytest.raises(ValueError, match="not targets"):
        Scorer(plan.scorer.fn, target=["y0"], decrease=["y1"])


def test_a_vector_the_readout_cannot_see_is_no_better_than_its_random_controls():
    model = _mlp()
    w = model[2].weight.detach()
    v = torch.randn(64, generator=torch.Generator().manual_seed(5))
    v -= torch.linalg.lstsq(w.T, v.unsqueeze(1)).solution.squeeze(1) @ w  # orthogonal to both readout rows
    v *= model[2].weight[0].norm() / v.norm()
    plan = SteeringPlan("blind", AddVector(SteeringVector(v, "1")), Scorer(_readout, target=["y0"], off_target=["y1"]),
                        alphas=[-2, -1, 1, 2], n_controls=10, seed=0)
    rows = plan_headline_rows(run_plan(model, plan, plan.intervention), source="s.json")
    # added after the ReLU (site "1"), v reaches the outputs only through the readout rows it is orthogonal to
    assert abs(rows[0]["value"]) < 1e-4 and rows[0]["baseline"] > 1e-3
    assert {r["verdict"] for r in rows} == {NO_BETTER}, rows


def test_broken_runs_set_the_breakdown_alpha_and_leave_the_safe_range():
    model = _mlp()
    base = float(_readout(model)["y0"].mean())
    w = model[2].weight[0].detach()
    plan, iv = _plan(model, n_controls=2, broken_above=base + 3.0 * float(w @ w))  # alpha 4 diverges, 2 does not
    sweep = run_plan(model, plan, iv)
    b = sweep.broken()
    assert b[4.0] == 1.0 and b[0.0] == 0.0
    s = sweep.summary()
    assert s["breakdown_alpha"] == 4.0 and s["alpha_plus"] == 2.0
    assert s["broken_at_max_alpha"] == 1.0


def test_symmetry_of_an_odd_and_of_a_one_sided_curve():
    from sciscope.core.experiment import _curve_stats

    alphas = [-2.0, -1.0, 0.0, 1.0, 2.0]
    odd = pd.Series([-2.0, -1.0, 0.0, 1.0, 2.0], index=alphas)
    one_sided = pd.Series([0.0, 0.0, 0.0, 1.0, 2.0], index=alphas)
    even = pd.Series([2.0, 1.0, 0.0, 1.0, 2.0], index=alphas)
    assert _curve_stats(odd, alphas, 2.0, -2.0)["symmetry"] == pytest.approx(1.0)
    assert _curve_stats(one_sided, alphas, 2.0, -2.0)["symmetry"] == pytest.approx(0.0)
    assert _curve_stats(even, alphas, 2.0, -2.0)["symmetry"] == pytest.approx(-1.0)
    assert _curve_stats(even, alphas, 2.0, -2.0)["monotonic"] is False


def test_reference_conditions_and_a_bad_headline_are_reported():
    model = _mlp()
    plan, iv = _plan(model, n_controls=1)
    sweep = run_plan(model, plan, iv, reference={"prompt": {"y0": 9.0}})
    assert sweep.summary()["reference[prompt]"] == 9.0
    plan.headline = "nope"
    with pytest.raises(KeyError, match="nope"):
        run_plan(model, plan, iv)


def test_sweep_plot_has_a_band_over_examples_grey_controls_and_named_references(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from sciscope.core.experiment import PlanSweep

    model = _mlp()
    plan, iv = _plan(model, n_controls=4)
    sweep = run_plan(model, plan, iv, reference={"prompt": {"y0": 1.0}, "real cells": {"y0": -1.0}})
    ci = sweep.interval("y0")
    assert list(ci.index) == [-2.0, -1.0, 0.0, 1.0, 2.0, 4.0] and (ci["n"] == 64).all()
    assert (ci["low"] < ci["value"]).all() and (ci["value"] < ci["high"]).all()
    y = sweep.samples[("steer", 4.0, "y0")]
    assert ci.loc[4.0, "high"] - ci.loc[4.0, "value"] == pytest.approx(1.959964 * y.std(ddof=1) / 8, rel=1e-5)

    ax = sweep.plot("y0")
    handles, labels = ax.get_legend().legend_handles, [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["push_y0", "95% CI (64 examples)", "alpha = 0 (unsteered)", "random directions (4)", "prompt", "real cells"]
    # the band is the interval, shaded around the steered curve
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(ci["low"].min()) and band.max() == pytest.approx(ci["high"].max())
    # the controls' envelope spans their min and max at every alpha
    ctrl = np.array([sweep.curve("y0", c).to_numpy() for c in sweep.controls])
    env = ax.collections[1].get_paths()[0].vertices[:, 1]
    assert env.min() == pytest.approx(ctrl.min()) and env.max() == pytest.approx(ctrl.max())
    # references: horizontal lines at their values, each in its own colour, none grey or the curve's
    hlines = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 1]]  # axhline spans the axes
    assert [line.get_ydata()[0] for line in hlines] == [1.0, -1.0]
    refs = {lab: h for h, lab in zip(handles, labels) if lab in ("prompt", "real cells")}
    colours = {to_rgba(h.get_color()) for h in refs.values()}
    assert colours == {to_rgba(line.get_color()) for line in hlines}
    assert len(colours) == 2 and not colours & {to_rgba("C0"), to_rgba("0.55")}
    assert ax.get_title() == "push_y0: y0 (target, meant to rise)"
    assert sweep.plot("y1").get_title() == "push_y0: y1 (off-target, meant to stay)"
    plt.close("all")

    # saved with its per-example values, a sweep reads back whole: same summary, same band
    sweep.save(tmp_path / "push_y0")
    back = PlanSweep.load(tmp_path / "push_y0")
    assert back.headline == "y0" and back.roles == sweep.roles and back.reference == sweep.reference
    a, b = sweep.summary(), back.summary()
    assert a["effect_plus_ci"] == b["effect_plus_ci"] and a["slope"] == pytest.approx(b["slope"])
    pd.testing.assert_frame_equal(back.interval("y0"), ci)
    # without samples.npz there is no band, and the plot says nothing about one
    (tmp_path / "push_y0" / "samples.npz").unlink()
    bare = PlanSweep.load(tmp_path / "push_y0")
    assert np.isnan(bare.summary()["effect_plus_ci"]).all()
    labels = [t.get_text() for t in bare.plot().get_legend().get_texts()]
    assert not any("CI" in lab for lab in labels) and "random directions (4)" in labels
    plt.close("all")


def test_sweep_plot_marks_broken_runs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = _mlp()
    base = float(_readout(model)["y0"].mean())
    w = model[2].weight[0].detach()
    plan, iv = _plan(model, n_controls=2, broken_above=base + 3.0 * float(w @ w))
    ax = run_plan(model, plan, iv).plot()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "broken runs" in labels
    cross = next(line for line in ax.get_lines() if line.get_marker() == "x")
    assert list(cross.get_xdata()) == [4.0]
    plt.close("all")


def test_plan_and_analysis_validation():
    with pytest.raises(ValueError, match="folder name"):
        SteeringPlan("a/b", AddVector(torch.ones(3), "x"), lambda m: {}, alphas=[1])
    with pytest.raises(ValueError, match="n_controls"):
        SteeringPlan("ok", AddVector(torch.ones(3), "x"), lambda m: {}, alphas=[1], n_controls=-1)
    a = Analysis("count", "model", compute=lambda ctx: 3, headline=lambda r: [{"name": "n", "value": r}])
    rows, seconds = a.run(None)  # type: ignore[arg-type]
    assert rows == [{"name": "n", "value": 3}] and seconds >= 0


def test_add_vector_at_a_site_object_describes_itself_as_json():
    import json

    from sciscope.core.sites import Site

    iv = AddVector(torch.ones(4), Site("1", layout="b d"))
    described = json.loads(json.dumps(iv.describe()))
    assert described["site"] == "1:output" and described["layout"] == "b d"
    model = _mlp()
    with iv.apply(model, 1.0):
        assert count_hooks(model) == 1


def _readout_copies(model: nn.Module, n: int) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        y = model(tile_copies(X, n))
    return [{"y0": p[:, 0].numpy(), "y1": p[:, 1].numpy()} for p in split_copies(y, n)]


@pytest.mark.parametrize("make", [
    lambda m: AddVector(SteeringVector(m[2].weight[0].detach().clone(), "1")),
    lambda m: AddVector(SteeringVector(m[2].weight[0].detach().clone(), "1"), scale="relative", positions=[0]),
    lambda m: Clamp({"2:input": [1, 5], "1": [7]}, widths={"1": 64}),
    lambda m: SteerFeature(create_sae(sae_config("relu", d_in=64, d_sae=16), seed=0), [3], "1",
                           density=np.linspace(0.0, 1.0, 16)),
    lambda m: AblateFeatures(create_sae(sae_config("relu", d_in=64, d_sae=16), seed=0), [3, 4], "1",
                             density=np.linspace(0.0, 1.0, 16)),
], ids=["add", "add-relative-masked", "clamp-two-sites", "steer-feature", "ablate-features"])
def test_a_batched_sweep_gives_the_numbers_of_one_job_at_a_time(make):
    model = _mlp()
    iv = make(model)
    plan = SteeringPlan("p", iv, Scorer(_readout, target=["y0"], off_target=["y1"], batched=_readout_copies),
                        alphas=[-2, -1, 1, 2, 4], n_controls=4, seed=0)
    calls = {"batched": 0}
    inner = plan.scorer.batched

    def counted(m: nn.Module, n: int) -> list[dict[str, np.ndarray]]:
        calls["batched"] += 1
        return inner(m, n)

    plan.scorer.batched = counted
    batched = run_plan(model, plan, iv, max_copies=8)
    assert count_hooks(model) == 0
    assert calls["batched"] == 3  # 5 alphas x (1 + 4 controls) = 25 jobs in batches of 8
    alone = run_plan(model, plan, iv, max_copies=1)
    assert calls["batched"] == 3
    pd.testing.assert_frame_equal(batched.table, alone.table, check_exact=True)
    assert batched.samples.keys() == alone.samples.keys()
    for key in alone.samples:
        np.testing.assert_array_equal(batched.samples[key], alone.samples[key])
    assert batched.table.value.std() > 0


def test_apply_copies_edits_each_copy_alone_and_refuses_a_batch_that_is_not_copies():
    model = _mlp()
    v = SteeringVector(model[2].weight[0].detach().clone(), "1")
    items = [(AddVector(v), 2.0), (None, 0.0), (Clamp({"2:input": [0, 1]}), -1.0), (AddVector(-v.vector, "1"), 1.0)]
    with apply_copies(model, items):
        assert count_hooks(model) == 2  # one hook per edited site (1 and 2:input), whatever the number of copies
        y = model(tile_copies(X, 4))
        with pytest.raises(ShapeError, match="not 4 equal copies"):
            model(X[:64 - 1])
    assert count_hooks(model) == 0
    for (iv, alpha), part in zip(items, split_copies(y, 4)):
        with iv.apply(model, alpha) if iv is not None else contextlib.nullcontext():
            expected = model(X)
        assert torch.equal(part, expected)


def test_a_floating_point_error_in_a_batch_breaks_only_its_own_job():
    model = _mlp()
    v = SteeringVector(model[2].weight[0].detach().clone(), "1")
    base = float(_readout(model)["y0"].mean())

    def check(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if out["y0"].mean() > base + 3.0 * float(v.vector @ v.vector):
            raise FloatingPointError("diverged")
        return out

    plan = SteeringPlan("p", AddVector(v), Scorer(lambda m: check(_readout(m)), target=["y0"],
                                                  batched=lambda m, n: [check(r) for r in _readout_copies(m, n)]),
                        alphas=[1, 2, 4], n_controls=2, seed=0)
    sweep = run_plan(model, plan, plan.intervention, max_copies=16)
    b = sweep.broken()
    assert b[4.0] == 1.0 and b[2.0] == 0.0 and b[1.0] == 0.0
    assert sweep.broken("random-0").max() == 0.0  # the controls in the same batch were not lost
