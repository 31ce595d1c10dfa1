"""Tests of the physics adapter: simulators, stability checks, diagnostics, model, rollouts, steering."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sciscope.core import ConfigError, capture, steer
from sciscope.core.experiment import SteeringPlan, check_batched_scorer, run_plan
from sciscope.core.interventions import AddVector
from sciscope.core.sites import resolve_site
from sciscope.core.testing import check_adapter
from sciscope.domains.physics import (
    FlowSpec,
    GrayScottSpec,
    ModelSpec,
    PhysicsAdapter,
    RegimeClassifier,
    RolloutScorer,
    build_predictor,
    diagnose,
    flow_diagnostics,
    gray_scott_diagnostics,
    load_predictor,
    rollout,
    save_predictor,
    simulate_flow,
    simulate_trajectories,
    simulate_gray_scott,
    velocity_to_vorticity,
)
from sciscope.domains.physics.diagnostics import _periodic_regions, _region_shape

TINY = PhysicsAdapter.test_config


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny() -> tuple[PhysicsAdapter, torch.nn.Module]:
    """The tiny adapter with its model trained once for the module (a few seconds)."""
    ad = PhysicsAdapter(TINY)
    return ad, ad.model()


# ----------------------------------------------------------------------------------------- simulators


def test_gray_scott_regimes_make_spots_and_stripes() -> None:
    spec = GrayScottSpec(n=32, burn_in=1500, frame_every=100, n_frames=2)
    frames = simulate_gray_scott([0.037, 0.035, 0.055, 0.058], [0.065, 0.064, 0.062, 0.062], spec=spec, seed=1)
    assert frames.shape == (4, 2, 2, 32, 32) and frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= -1e-3 and frames.max() <= 1 + 1e-3
    d = gray_scott_diagnostics(frames[:, -1])
    spots, stripes = d.iloc[:2], d.iloc[2:]
    # round spots are compact and many; labyrinth stripes are elongated and few
    assert spots.compactness.min() > stripes.compactness.max() + 0.15
    assert spots.n_components.min() > stripes.n_components.max()


def test_simulators_are_seeded() -> None:
    spec = GrayScottSpec(n=16, burn_in=50, frame_every=10, n_frames=2)
    a = simulate_gray_scott([0.04], [0.063], spec=spec, seed=3)
    b = simulate_gray_scott([0.04], [0.063], spec=spec, seed=3)
    c = simulate_gray_scott([0.04], [0.063], spec=spec, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_flow_laminar_shear_is_a_fixed_point() -> None:
    """Without a perturbation the Kolmogorov shear u = A sin(k y) / (nu k^2 + mu) stays put."""
    spec = FlowSpec(n=32, dt=0.02, drag=0.1, k_forcing=4, init_amplitude=0.0, burn_in=1.0, frame_every=0.5, n_frames=3)
    nu, amp = 0.05, 0.9
    frames = simulate_flow([nu], [amp], spec=spec)
    y = 2 * np.pi * np.arange(32) / 32
    expected = amp / (nu * 16 + 0.1) * np.sin(4 * y)
    assert np.allclose(frames[0, :, 0], expected[None, :, None], atol=1e-5)  # u_x(y), constant in x
    assert np.abs(frames[0, :, 1]).max() < 1e-6  # no u_y


def test_flow_regimes_and_incompressibility() -> None:
    spec = FlowSpec(n=32, burn_in=8.0, frame_every=0.5, n_frames=2)
    nu = np.array([0.25, 0.02])
    frames = simulate_flow(nu, 1.0 * (nu * 16 + 0.1), spec=spec, seed=2)
    d = flow_diagnostics(frames[:, -1])
    assert d.x_variation[0] < 0.05 < 0.3 < d.x_variation[1]  # laminar shear vs vortices
    assert d.high_k_fraction[0] < d.high_k_fraction[1]
    # spectral divergence of the velocity is zero
    k = np.fft.fftfreq(32, 1 / 32)
    ux, uy = np.fft.fft2(frames[1, -1, 0]), np.fft.fft2(frames[1, -1, 1])
    div = np.fft.ifft2(1j * k[None, :] * ux + 1j * k[:, None] * uy).real
    assert np.abs(div).max() < 1e-4 * np.abs(frames[1, -1]).max() * 32


def test_unstable_parameters_are_config_errors_before_simulating(monkeypatch: pytest.MonkeyPatch) -> None:
    import sciscope.domains.physics.data as data

    def never(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("simulated although the config is unstable")

    monkeypatch.setattr(data, "simulate_flow", never)
    monkeypatch.setattr(data, "simulate_gray_scott", never)
    with pytest.raises(ConfigError, match="flow_dt.*CFL|CFL.*flow_dt"):
        PhysicsAdapter({"flow_dt": 0.2})
    with pytest.raises(ConfigError, match="gs_dt"):
        PhysicsAdapter({"gs_dt": 3.0})
    with pytest.raises(ConfigError, match="flow_viscosity_vortex"):
        PhysicsAdapter({"flow_viscosity_vortex": [0.0, 0.01]})
    with pytest.raises(ConfigError, match="gs_feed_spots"):
        PhysicsAdapter({"gs_feed_spots": ["a", "b"]})
    # the same checks guard the simulators when they are called directly
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="CFL"):
        simulate_flow([0.02], [0.5], spec=FlowSpec(dt=1.0))
    with pytest.raises(ConfigError, match="diffusion limit"):
        simulate_gray_scott([0.04], [0.06], spec=GrayScottSpec(du=0.5, dt=1.0))


def _config_error(**override: object) -> str:
    """The ConfigError message of ``PhysicsAdapter.check_config`` on the defaults plus ``override``.

    The adapter's own checks are called directly: the core's Key checks (which reject NaN for
    float keys too) stand in front of them in a run, and must not be what makes them safe.
    """
    with pytest.raises(ConfigError) as err:
        PhysicsAdapter.check_config({**PhysicsAdapter.default_config, **override})
    return str(err.value)


NAN = float("nan")
#: bad values for the simulators' keys; each message must name a real config key (before: a NaN
#: amplitude or drag passed the CFL check, and messages named 'flow_forcing_*', 'flow_n', ...)
_BAD_PHYSICS = [
    ({"flow_init_amplitude": NAN}, "flow_init_amplitude"), ({"flow_drag": NAN}, "flow_drag"),
    ({"flow_drag": float("inf")}, "flow_drag"), ({"flow_drag": -1.0}, "flow_drag"),
    ({"flow_init_amplitude": -1.0}, "flow_init_amplitude"), ({"flow_burn_in": NAN}, "flow_burn_in"),
    ({"flow_dt": NAN}, "flow_dt"), ({"flow_frame_every": NAN}, "flow_frame_every"),
    ({"flow_dt": 5.0}, "flow_dt"), ({"flow_k_forcing": 99}, "flow_k_forcing"), ({"grid": 10}, "grid"),
    ({"flow_viscosity_vortex": [NAN, 0.04]}, "flow_viscosity_vortex"), ({"flow_velocity": [0.8, NAN]}, "flow_velocity"),
    ({"gs_du": NAN}, "gs_du"), ({"gs_dt": NAN}, "gs_dt"), ({"gs_dt": 10.0}, "gs_dt"),
    ({"gs_feed_spots": [0.03, 0.3]}, "gs_feed_spots"), ({"gs_kill_stripes": [NAN, 0.06]}, "gs_kill_stripes"),
    ({"gs_burn_in": -1}, "gs_burn_in"), ({"n_frames": 0, "rollout_start": 0, "context_frames": 0, "rollout_steps": 0}, "n_frames"),
    ({"test_fraction": NAN}, "test_fraction"), ({"lr": NAN}, "lr"), ({"blowup": NAN}, "blowup"),
    ({"physical_margin": NAN}, "physical_margin"), ({"physical_margin": -0.1}, "physical_margin"),
]


@pytest.mark.parametrize(("override", "key"), _BAD_PHYSICS, ids=[k for _, k in _BAD_PHYSICS])
def test_nan_and_unstable_values_fail_naming_real_config_keys(override: dict, key: str) -> None:
    import re

    msg = _config_error(**override)
    named = set(re.findall(r"'([a-z][a-z0-9_*]*)'", msg))
    assert key in named, msg
    assert named <= set(PhysicsAdapter.config_keys), f"{sorted(named - set(PhysicsAdapter.config_keys))} in: {msg}"


def test_nan_amplitude_does_not_switch_off_the_cfl_check() -> None:
    assert "CFL" in _config_error(flow_dt=5.0)
    msg = _config_error(flow_init_amplitude=NAN, flow_dt=5.0)
    assert "flow_init_amplitude" in msg


def test_cli_rejects_an_unstable_time_step_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sciscope.pipelines.cli import main

    rc = main(["run", "physics", "--out", str(tmp_path), "--set", "flow_dt=0.3"])
    assert rc == 2
    assert "flow_dt" in capsys.readouterr().err
    assert not (tmp_path / "physics").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [({"rollout_steps": 99}, "rollout_steps"), ({"patch_size": 5}, "patch_size"), ({"systems": ["plasma"]}, "systems"),
     ({"hidden": 30, "n_heads": 4}, "hidden"), ({"n_per_regime": 1}, "n_per_regime"), ({"nope": 1}, "nope")],
)
def test_bad_config_names_the_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        PhysicsAdapter({**TINY, **override})


# ----------------------------------------------------------------------------------------- diagnostics


def test_regions_wrap_around_the_torus_and_shapes_differ() -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[0:3, 6:9] = True
    mask[14:16, 6:9] = True  # the same blob across the top/bottom edge
    mask[7:9, :] = True  # a stripe across the left/right edge
    _, n = _periodic_regions(mask)
    assert n == 2
    disc = np.hypot(*np.meshgrid(np.arange(32) - 16, np.arange(32) - 16)) < 5
    stripe = np.zeros((32, 32), dtype=bool)
    stripe[15:17, 2:30] = True  # 4 pi A / P^2 = 4 pi 56 / 60^2 ~ 0.2
    assert _region_shape(disc)[1] > 0.5 > 0.25 > _region_shape(stripe)[1]
    assert np.isnan(_region_shape(np.ones((8, 8), dtype=bool))[1])  # covers the torus: no boundary, no shape


def test_flow_diagnostics_of_the_analytic_shear() -> None:
    n, k, U = 32, 3, 0.7
    y = 2 * np.pi * np.arange(n) / n
    vel = np.zeros((2, n, n))
    vel[0] = U * np.sin(k * y)[:, None]
    d = flow_diagnostics(vel, k_forcing=k).iloc[0]
    assert d.energy == pytest.approx(U**2 / 4, rel=1e-9)
    assert d.enstrophy == pytest.approx(U**2 * k**2 / 4, rel=1e-9)
    assert d.x_variation == pytest.approx(0.0, abs=1e-12) and d.high_k_fraction == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(velocity_to_vorticity(vel), -U * k * np.cos(k * y)[:, None])
    bad = vel.copy()
    bad[0, 0, 0] = np.nan
    assert diagnose("flow", np.stack([vel, bad])).iloc[1].isna().all()


def test_regime_classifier_beats_its_shuffled_control() -> None:
    config = PhysicsAdapter.validate_config({"n_per_regime": 6, "n_frames": 4, "gs_burn_in": 1200, "flow_burn_in": 4.0,
                                             "rollout_start": 0, "rollout_steps": 1})
    ts = simulate_trajectories(config)
    diag = ts.frame_diagnostics().merge(ts.table[["trajectory", "system", "regime"]], on="trajectory")
    for system, positive in (("gray_scott", "stripes"), ("flow", "vortex")):
        d = diag[diag.system == system]
        clf = RegimeClassifier(system, positive).fit(d, d.regime, d.trajectory, seed=0)
        assert clf.cv_accuracy > 0.9 and clf.control_accuracy < 0.75, (system, clf)
        p = clf.predict_proba(d)
        assert np.mean((p > 0.5) == (d.regime == positive).to_numpy()) > 0.9
    df = pd.DataFrame({c: [np.nan] for c in clf.columns})
    assert np.isnan(clf.predict_proba(df)).all()
    with pytest.raises(ConfigError, match="fit"):
        RegimeClassifier("flow", "vortex").predict_proba(df)


# ----------------------------------------------------------------------------------------- model


def test_untrained_predictor_is_persistence_and_checks_shapes(tmp_path: Path) -> None:
    spec = ModelSpec(grid=16, patch_size=4, hidden=16, n_layers=2, n_heads=2, context_frames=2)
    model = build_predictor(spec).eval()
    x = torch.randn(3, 2, 2, 16, 16)
    assert torch.count_nonzero(model(x)) == 0  # zero head: next = last frame
    with pytest.raises(ConfigError, match="frames of shape"):
        model(torch.randn(3, 3, 2, 16, 16))
    torch.nn.init.normal_(model.head.weight)
    save_predictor(tmp_path / "p", model, {"key": "k"})
    again, info = load_predictor(tmp_path / "p")
    assert info["key"] == "k" and torch.equal(model(x), again(x))


def test_rollout_flags_divergence_and_keeps_the_others() -> None:
    class Exploding(torch.nn.Module):
        """Doubles example 0 each step (blows up), leaves example 1 alone, NaN for example 2 at step 2."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = torch.zeros_like(frames[:, -1])
            out[0] = frames[0, -1] * 3.0
            if self.calls == 2:
                out[2] = float("nan")
            return out

    ctx = np.ones((3, 2, 1, 4, 4), dtype=np.float32)
    res = rollout(Exploding(), ctx, 5, blowup=50.0)
    assert res.diverged.tolist() == [True, False, True]
    assert res.diverged_at.tolist() == [2, -1, 1]  # 4**3 = 64 > 50 at step index 2
    assert np.isnan(res.frames[0, 2:]).all() and np.isfinite(res.frames[0, :2]).all()
    assert np.allclose(res.frames[1], 1.0)


def test_conformance(tiny, tmp_path: Path) -> None:
    ad, _ = tiny
    report = check_adapter(ad, tmp_path)
    assert report["sites"] == ["block.0", "block.1"] and report["store_rows"] > 0


def test_task_loss_is_the_training_loss_on_test_windows_and_fidelity_brackets_it(tiny) -> None:
    """The task loss is the training objective (weighted next-frame change MSE, no noise, no shift) on the
    held-out windows; splicing the site's own activations back recovers all of it, zeroing the site none."""
    from sciscope.core.fidelity import fidelity
    from sciscope.domains.physics import WindowDataset

    ad, model = tiny
    task = ad.task_loss(ad.ctx)
    assert task.log_probs is None and "MSE" in task.name
    clean = task.fn(model)
    assert np.isfinite(clean) and clean > 0 and task.fn(model) == clean  # deterministic
    ts, test = ad.trajectories, ad.examples("test").inputs  # the tiny set has fewer than TASK_WINDOWS
    weights = np.array([1.0 / ts.norms[s]["change_ms"] for s in ts.table["system"]])
    data = WindowDataset(ad.normalised_frames, test, TINY.get("context_frames", 3), weights, shift=False, noise=0.0)
    with torch.no_grad():
        per = [float(((model(x[None]) - y[None]) ** 2).mean() * w) for x, y, w in (data[i] for i in range(len(data)))]
    assert clean == pytest.approx(np.mean(per), rel=1e-5)

    table = fidelity(model, ad.sae_site, task, {"identity": lambda h: h}, aliases=ad.aliases,
                     positions=ad.fidelity_positions).set_index("condition")
    assert table.loss_recovered["identity"] == pytest.approx(1.0, abs=1e-6)
    assert table.loss_recovered["zero_ablation"] == 0.0
    assert table.loss["zero_ablation"] > table.loss["clean"]
    assert table.kl.isna().all()  # no output distribution: no KL


def test_examples_split_whole_trajectories_and_batches(tiny) -> None:
    ad, model = tiny
    train, test = ad.examples("train"), ad.examples("test")
    assert set(train.obs.trajectory) & set(test.obs.trajectory) == set()
    for ex in (train, test):
        assert set(ex.obs.system) == {"gray_scott", "flow"} and set(ex.obs.regime) == {"spots", "stripes", "laminar", "vortex"}
    gs = train.obs[train.obs.system == "gray_scott"]
    assert gs[["feed", "kill", "compactness"]].notna().all().all() and gs[["viscosity", "enstrophy"]].isna().all().all()
    (x,) = next(iter(ad.batches(train, model, batch_size=5)))
    T = TINY.get("context_frames", 3)
    assert x.shape == (5, T, 2, TINY["grid"], TINY["grid"])
    tr, t = train.inputs[0]
    assert torch.allclose(x[0], torch.from_numpy(ad.normalised_frames[tr, t - T + 1: t + 1]))
    with pytest.raises(ConfigError, match="split"):
        ad.examples("validation")
    base = ad.baseline_features(test)
    assert {k: v.shape[0] for k, v in base.items()} == {k: len(test) for k in base}


def test_training_learns_a_known_change() -> None:
    """Frames that change by a fixed amount per channel and step: Lightning training learns it."""
    from sciscope.domains.physics import WindowDataset, train_predictor

    rng = np.random.default_rng(0)
    step = np.array([0.5, -0.3], dtype=np.float32)[:, None, None] * np.ones((2, 8, 8), dtype=np.float32)
    base = rng.standard_normal((2, 8, 8)).astype(np.float32)
    frames = np.stack([base + t * step for t in range(6)])[None]  # (1, 6, 2, 8, 8)
    data = WindowDataset(frames, [(0, t) for t in range(1, 5)], 2, np.ones(1), shift=False)
    spec = ModelSpec(grid=8, patch_size=4, hidden=16, n_layers=1, n_heads=2, context_frames=2, steps=60, batch_size=4,
                     lr=2e-2, warmup=5, noise=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add barrier waits
    try:
        model, result = train_predictor(spec, data)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        pred = model(torch.from_numpy(frames[:, 2:4]))[0].numpy()
    persistence = float((step**2).mean())
    assert float(((pred - step) ** 2).mean()) < 0.1 * persistence
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]


def test_regime_vector_matches_an_independent_computation(tiny) -> None:
    """The recipe: z over (positions, dim) per window, mean over positions, per trajectory, per regime."""
    ad, model = tiny
    site = ad.steer_site
    vec = ad.regime_vector(model, "flow", site)
    T = ad.config["context_frames"]
    frames = ad.normalised_frames
    table = ad.trajectories.table
    per_traj = {}
    for r in table[(table.system == "flow") & (table.split == "train")].itertuples():
        ctx = torch.from_numpy(np.stack([frames[r.trajectory, t - T + 1: t + 1] for t in range(T - 1, frames.shape[1] - 1)]))
        with capture(model, [site], aliases=ad.aliases) as cap, torch.no_grad():
            model(ctx)
        h = cap[site].double().numpy()  # (windows, P, D)
        z = (h - h.mean(axis=(1, 2), keepdims=True)) / h.std(axis=(1, 2), ddof=1, keepdims=True)
        per_traj[r.trajectory] = (z.mean(1).mean(0), r.regime)
    a = np.mean([v for v, g in per_traj.values() if g == "vortex"], axis=0)
    b = np.mean([v for v, g in per_traj.values() if g == "laminar"], axis=0)
    assert np.allclose(vec.vector.numpy(), a - b, atol=1e-5)
    assert vec.meta["n_a"] + vec.meta["n_b"] == len(per_traj) and vec.method == "regime_delta"


def test_steering_alpha_zero_is_identity_and_random_control_has_equal_norm(tiny) -> None:
    ad, model = tiny
    vec = ad.regime_vector(model, "gray_scott")
    ctx = ad.normalised_frames[:2, :ad.config["context_frames"]]
    base = rollout(model, ctx, 3).frames
    with steer(model, vec, 0.0, site=vec.site, scale="relative", relative_to="example", aliases=ad.aliases):
        zero = rollout(model, ctx, 3).frames
    with steer(model, vec, 0.8, site=vec.site, scale="relative", relative_to="example", aliases=ad.aliases):
        moved = rollout(model, ctx, 3).frames
    assert np.array_equal(base, zero) and not np.allclose(base, moved)
    assert vec.random_like(0).norm == pytest.approx(vec.norm, rel=1e-5)


def test_scorer_counts_diverged_rollouts_and_the_sweep_goes_on(tiny) -> None:
    """An infinite alpha turns every steered rollout NaN: counted as broken, scores NaN, the other alphas scored."""
    ad, model = tiny
    ev = RolloutScorer(ad, "flow")
    vec = ad.regime_vector(model, "flow")
    plan = SteeringPlan("t", AddVector(vec, scale="relative", relative_to="example"), ev.scorer, [0.5, float("inf")], n_controls=1)
    sweep = run_plan(model, plan, plan.intervention, aliases=ad.aliases)
    inf, n = float("inf"), sum(len(s) for s in ev.starts.values())
    for cond in ("steer", "random-0"):
        assert sweep.broken(cond)[inf] == 1.0 and np.isnan(sweep.curve("p_vortex_from_laminar", cond)[inf])
        assert sweep.curve("diverged_fraction", cond)[inf] == 1.0
        for alpha in (0.0, 0.5):
            assert sweep.broken(cond)[alpha] == 0.0 and np.isfinite(sweep.curve("p_vortex_from_laminar", cond)[alpha])
    s = sweep.summary()
    assert s["alpha_plus"] == 0.5 and s["breakdown_alpha"] == inf and s["n_examples"] == len(ev.starts["laminar"])
    assert sweep.roles["p_vortex_from_vortex"] == "off_target" and sweep.roles["broken_fraction"] == "damage"
    # per-rollout arrays; deterministic: the same evaluation twice gives the same numbers
    first, again = ev(model), ev(model)
    assert first["broken_fraction"].shape == (n,) and first["p_vortex_from_laminar"].shape == (len(ev.starts["laminar"]),)
    assert all(np.array_equal(first[k], again[k], equal_nan=True) for k in first)


def test_batched_rollout_scores_equal_one_job_at_a_time(tiny) -> None:
    """The alphas and controls rolled out as copies of one batch (each forward n copy blocks) score
    exactly as one job at a time, also when some copies diverge; the bands stay cached."""
    import dataclasses

    ad, model = tiny
    ev = RolloutScorer(ad, "gray_scott", model)
    bands = ev.bands
    vec = ad.regime_vector(model, "gray_scott")
    iv = AddVector(vec, scale="relative", relative_to="example")
    calls: list[int] = []

    def spy(m: torch.nn.Module, n: int) -> list[dict[str, np.ndarray]]:
        calls.append(n)
        return ev.copies(m, n)

    plan = SteeringPlan("t", iv, dataclasses.replace(ev.scorer, batched=spy), [-0.5, 0.5], n_controls=2)
    sweep = check_batched_scorer(model, plan, iv, aliases=ad.aliases)
    assert calls == [6]  # 3 conditions x 2 alphas in one batched call: the batched path really ran
    assert sweep.broken("steer")[0.5] == 0.0 and np.isfinite(sweep.curve("p_stripes_physical_from_spots")[0.5])
    # an infinite alpha breaks its own copies only (per-row divergence, per-copy norms)
    flow = RolloutScorer(ad, "flow")
    fvec = ad.regime_vector(model, "flow")
    fiv = AddVector(fvec, scale="relative", relative_to="example")
    fsweep = check_batched_scorer(model, SteeringPlan("f", fiv, flow.scorer, [0.5, float("inf")], n_controls=1), fiv,
                                  aliases=ad.aliases)
    assert fsweep.curve("diverged_fraction")[float("inf")] == 1.0 and fsweep.broken("steer")[0.5] == 0.0
    # the unsteered model's bands are cached per (adapter, system, model): a new scorer rolls out nothing
    assert RolloutScorer(ad, "gray_scott", model).bands is bands


def test_steering_plans_and_analyses_write_through_the_context(tiny) -> None:
    from sciscope.core.context import RunContext

    ad, model = tiny
    ctx = RunContext(ad, {"steer_alphas": [-0.5, 0.5], "steer_n_random": 2})
    plans = {p.name: p for p in ad.steering_plans(ctx)}
    assert set(plans) == {"recipe_gray_scott", "recipe_flow", "transfer_gray_scott_to_flow", "transfer_flow_to_gray_scott"}
    plan = plans["transfer_gray_scott_to_flow"]
    assert plan.n_controls == 2 and plan.alphas == [-0.4, -0.2, -0.1, 0.1, 0.2, 0.4]  # the adapter's transfer_alphas
    assert plans["recipe_flow"].alphas == [-0.5, 0.5] and plan.scorer.target[0] == "p_vortex_physical_from_laminar"
    iv = plan.intervention(ctx)
    assert iv.relative_to == "example" and iv.vector.meta["system"] == "gray_scott" and iv.site == ad.steer_site
    assert np.allclose(iv.vector.vector.numpy(), ad.regime_vector(model, "gray_scott").vector.numpy())
    ctx.stage = "steering"
    by_name = {a.name: a for a in ad.analyses()}
    assert [a.stage for a in ad.analyses()] == ["examples", "model", "probes", "features", "steering", "steering", "steering"]
    by_name["rollout_strips"].run(ctx)
    for f in ("recipe_flow/rollout_strips_from_laminar.png", "recipe_gray_scott/rollout_strips_from_spots.png"):
        assert ctx.output(f).is_file(), f
    # the verdicts read the sweeps the steering stage leaves in ctx.live
    gs = plans["recipe_gray_scott"]
    ctx.live["steering:recipe_gray_scott"] = run_plan(model, gs, gs.intervention(ctx), aliases=ad.aliases)
    rows, _ = by_name["steering_verdicts"].run(ctx)
    shares = pd.read_csv(ctx.output("steering_verdicts.csv"))
    row = next(r for r in rows if r["name"] == "recipe_gray_scott: P(stripes and physical) from spots at alpha 0.5")
    at = shares[shares.alpha == 0.5].iloc[0]
    assert row["value"] == pytest.approx(at.p_changed_and_physical_value) and row["baseline"] == pytest.approx(at.p_changed_and_physical_random)
    assert row["verdict"] in ("above baseline", "no better than baseline", "below baseline")
    slopes = pd.read_csv(ctx.output("slope_verdicts.csv"))
    assert set(slopes.score) == {"p_stripes_physical_from_spots", "p_stripes_from_spots", "p_stripes_from_stripes"}
    assert ctx.output("recipe_gray_scott/changed_vs_physical.png").is_file()
    ctx.stage = "model"
    rows, _ = by_name["prediction_errors"].run(ctx)
    one = pd.read_csv(ctx.output("one_step_error.csv")).set_index("system")
    row = next(r for r in rows if r["name"] == "flow: one-step MSE")
    assert row["value"] == pytest.approx(one.loc["flow", "mse_model"]) and row["source"] == "model/one_step_error.csv"


def test_scorer_counts_a_regime_change_only_on_a_physical_rollout(tiny) -> None:
    """Unsteered rollouts lie in the bands they helped set; with bands nothing meets, P(A and physical)
    is 0 while P(A) by the classifier is unchanged, and every scored rollout counts as an artefact."""
    ad, model = tiny
    ev = RolloutScorer(ad, "gray_scott", model)
    assert list(ev.bands.diagnostic) == ["subpatch_power", "patch_boundary_ratio", "u_mean", "bound_excess"]
    assert "unsteered_model_max" in ev.bands and (ev.bands.low <= ev.bands.high).all()
    wide = ev(model)
    scored = np.isfinite(wide["p_stripes_from_spots"])
    assert scored.any() and (wide["physical_from_spots"][scored] == 1).all()
    assert np.allclose(wide["p_stripes_physical_from_spots"][scored], wide["p_stripes_from_spots"][scored])
    ev.bands = ev.bands.assign(low=np.inf)
    narrow = ev(model)
    assert np.array_equal(narrow["p_stripes_from_spots"], wide["p_stripes_from_spots"], equal_nan=True)
    assert (narrow["p_stripes_physical_from_spots"] == 0).all() and (narrow["physical_from_stripes"] == 0).all()
    assert narrow["artefact_fraction"].sum() == (1 - narrow["broken_fraction"]).sum()


def test_probe_sets_hold_each_regime_apart_with_baselines(tiny) -> None:
    """Parameter ranges differ between regimes: each regime gets its own probe set, baseline beside it."""
    ad, _ = tiny
    sets = {p.name: p for p in ad.probe_sets(None)}
    assert set(sets) == {"parameters_gray_scott", "parameters_gray_scott_stripes", "parameters_gray_scott_spots",
                         "parameters_flow", "parameters_flow_vortex", "parameters_flow_laminar"}
    assert all(p.baseline and p.groups == "trajectory" for p in sets.values())
    rows = ad.windows.query(sets["parameters_flow_laminar"].query)
    assert set(rows.regime) == {"laminar"} and set(sets["parameters_flow_laminar"].targets) == {"log10_viscosity", "log10_reynolds"}
    ex = ad.examples("all")
    base = ad.baseline_features(ex)
    assert set(base) == {"radial_spectrum", "radial_spectrum_shape", f"pixels_pca{min(32, len(ad.windows))}"}
    g = ad.config["grid"]
    shape = base["radial_spectrum_shape"].reshape(len(ex), -1)[:, :2 * (g // 2 + 1)].reshape(len(ex), 2, -1)
    assert np.allclose(shape.sum(-1), 1.0, atol=1e-5)  # each channel's power shares sum to 1 (Parseval: no ring lost)


def test_user_predictor_plugs_in(tmp_path: Path) -> None:
    """Any nn.Module with the same call signature: sites are found, capture and steering work."""
    src = tmp_path / "my_predictor.py"
    src.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Mixer(nn.Module):
            def __init__(self, c=2, g=16, d=24):
                super().__init__()
                self.embed = nn.Linear(c * 16, d)
                self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(3)])
                self.out = nn.Linear(d, c * 16)
                self.g = g

            def forward(self, frames):
                b, t, c, g, _ = frames.shape
                x = frames[:, -1].reshape(b, c, g // 4, 4, g // 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 16)
                h = self.embed(x)
                for blk in self.blocks:
                    h = h + blk(h)
                y = self.out(h).reshape(b, g // 4, g // 4, c, 4, 4).permute(0, 3, 1, 4, 2, 5)
                return 0.01 * y.reshape(b, c, g, g)

        def factory():
            torch.manual_seed(0)
            return Mixer()
    """))
    ad = PhysicsAdapter({**TINY, "model": f"{src}:factory"})
    model = ad.model()
    assert ad.sites == ["block.0", "block.1", "block.2"] and ad.aliases == {"block.{i}": "blocks.{i}"}
    resolve_site(model, ad.steer_site, ad.aliases)
    scores = RolloutScorer(ad, "gray_scott")(model)
    assert np.isfinite(np.nanmean(scores["p_stripes_from_spots"]))
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        PhysicsAdapter({**TINY, "model": f"{src}:nothing"}).model()


# ------------------------------------------------------------- physicality and verdicts (constructed)


def _smooth(n: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth periodic field ``(n, n)``: a few low Fourier modes with random phases."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(n) * (2 * np.pi / n), np.arange(n) * (2 * np.pi / n), indexing="ij")
    return sum(rng.normal() * np.cos(kx * x + ky * y + rng.uniform(0, 2 * np.pi)) for kx in range(3) for ky in range(3))


def test_physicality_reads_patch_artefacts_boundedness_and_divergence() -> None:
    from sciscope.domains.physics.physicality import (patch_boundary_ratio, physical_bands, physicality, subpatch_power,
                                                      within_bands)
    from sciscope.domains.physics.simulate import flow_wavenumbers

    n, p = 32, 4
    smooth = np.stack([_smooth(n, s) for s in range(4)]).reshape(2, 2, n, n)  # (m, C, n, n)
    patched = smooth + np.kron(np.random.default_rng(1).normal(size=(2, 2, n // p, n // p)), np.ones((p, p)))
    r_smooth, r_patched = patch_boundary_ratio(smooth, p), patch_boundary_ratio(patched, p)
    assert np.allclose(r_smooth, 1.0, atol=0.25) and (r_patched > 3 * r_smooth).all()
    # the seams put power at wavelengths of a patch or less, where the smooth field has none
    assert (subpatch_power(smooth, p) < 1e-12).all() and (subpatch_power(patched, p) > 0.01).all()
    assert subpatch_power(np.ones((1, 2, n, n)), p)[0] == 0.0 and subpatch_power(patched, 1).max() == 0.0
    assert patch_boundary_ratio(np.ones((1, 2, n, n)), p)[0] == 1.0 and np.isnan(patch_boundary_ratio(np.full((1, 2, n, n), np.nan), p)[0])
    # Gray-Scott: concentrations outside [0, 1] are out of bounds by their excess
    gs = np.clip(0.5 + 0.1 * smooth, 0, 1)
    gs[1, 1, 0, 0] = 1.3
    d = physicality("gray_scott", gs, patch_size=p)
    assert d.bound_excess.tolist() == pytest.approx([0.0, 0.3]) and d.u_mean[0] == pytest.approx(gs[0, 0].mean())
    # flow: a velocity from a stream function is divergence-free; a gradient field is all divergence
    ky, kx = flow_wavenumbers(n)
    psi = np.fft.rfft2(_smooth(n, 7))
    curl = np.stack([np.fft.irfft2(1j * ky * psi, s=(n, n)), np.fft.irfft2(-1j * kx * psi, s=(n, n))])
    grad = np.stack([np.fft.irfft2(1j * kx * psi, s=(n, n)), np.fft.irfft2(1j * ky * psi, s=(n, n))])
    f = physicality("flow", np.stack([curl, grad]), patch_size=p)
    assert f.divergence_fraction[0] < 1e-12 and f.divergence_fraction[1] == pytest.approx(1.0)
    # bands: the union of the references' ranges, widened; a frame outside any band is not physical
    bands = physical_bands({"simulation": f.iloc[:1], "unsteered_model": f.iloc[:1] * 1.1}, margin=0.5)
    assert within_bands(f, bands).tolist() == [True, False]
    with pytest.raises(ConfigError, match="physical_margin"):
        physical_bands({"simulation": f}, margin=-1.0)


def _constructed_sweep(steer: dict, controls: list[dict]) -> "PlanSweep":  # noqa: F821
    """A PlanSweep from per-rollout values ``{score: {alpha: array}}`` of the vector and of each control."""
    from sciscope.core.experiment import PlanSweep

    rows, samples = [], {}
    for cond, scores in [("steer", steer)] + [(f"random-{i}", c) for i, c in enumerate(controls)]:
        for score, by_alpha in scores.items():
            for alpha, v in by_alpha.items():
                samples[(cond, alpha, score)] = np.asarray(v, dtype=float)
                rows.append({"condition": cond, "alpha": alpha, "metric": score, "value": float(np.mean(v))})
        for alpha in next(iter(scores.values())):
            rows.append({"condition": cond, "alpha": alpha, "metric": "__broken__", "value": 0.0})
    roles = {"p_stripes_physical_from_spots": "target", "p_stripes_from_spots": "target", "p_stripes_from_stripes": "off_target",
             "physical_from_spots": "other"}
    params = {"name": "recipe_gray_scott", "alphas": [0.0, -0.6, 0.6], "seed": 0, "headline": "p_stripes_physical_from_spots",
              "targets": ["p_stripes_physical_from_spots", "p_stripes_from_spots"], "off_target": ["p_stripes_from_stripes"],
              "damage": [], "broken_score": None, "n_controls": len(controls)}
    return PlanSweep(pd.DataFrame(rows), samples, roles, params)


def test_steering_verdicts_follow_the_numbers_and_the_baseline_can_win() -> None:
    """Planted: the classifier reads 'stripes' in every steered rollout, but only as many are physical as
    under random directions -- P(stripes and physical) is 'no better than baseline' while the classifier
    alone reads 'above baseline'; a slope below the random directions' reads 'below baseline'."""
    from sciscope.domains.physics.verdicts import alpha_near, changed_rows, control_slopes, slope_rows

    z, ones = np.zeros(8), np.ones(8)
    quarter = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=float)
    steer = {"p_stripes_from_spots": {0.0: z, -0.6: ones, 0.6: ones},
             "p_stripes_physical_from_spots": {0.0: z, -0.6: z, 0.6: quarter},
             "physical_from_spots": {0.0: ones, -0.6: z, 0.6: quarter},
             "p_stripes_from_stripes": {0.0: ones, -0.6: ones, 0.6: ones}}
    controls = [{"p_stripes_from_spots": {0.0: z, -0.6: 0.1 * ones, 0.6: 0.2 * ones},
                 "p_stripes_physical_from_spots": {0.0: z, -0.6: z, 0.6: np.roll(quarter, i)},
                 "physical_from_spots": {0.0: ones, -0.6: ones, 0.6: ones},
                 "p_stripes_from_stripes": {0.0: ones, -0.6: (0.4 + 0.02 * i) * ones, 0.6: ones}}
                for i in range(4)]
    sweep = _constructed_sweep(steer, controls)
    assert alpha_near(sweep, 0.5) == 0.6 and alpha_near(sweep, -2.0) == -0.6
    both, clf = changed_rows(sweep, "gray_scott", 0.6, "steering/steering_verdicts.csv")
    assert both["name"] == "recipe_gray_scott: P(stripes and physical) from spots at alpha 0.6"
    assert (both["value"], both["baseline"], both["control"]) == pytest.approx((0.25, 0.25, 0.0))
    assert both["verdict"] == "no better than baseline"
    assert (clf["value"], clf["baseline"]) == pytest.approx((1.0, 0.2)) and clf["verdict"] == "above baseline"
    # slopes: the target's vs the random directions' |slopes| (their mean is the core summary's)
    slope, ctrl = control_slopes(sweep, "p_stripes_physical_from_spots")
    assert np.abs(ctrl).mean() == pytest.approx(sweep.summary("p_stripes_physical_from_spots", n_boot=0)["control_slope_mean_abs"])
    rows, table = slope_rows(sweep, "steering/recipe_gray_scott/sweep.csv")
    by = {r["name"].split(": slope of ")[1].split(" against")[0]: r for r in rows}
    assert set(by) == {"p_stripes_physical_from_spots", "p_stripes_from_spots", "p_stripes_from_stripes"}
    # both signs push to 'stripes' (the P(stripes) 0.87 at -1.0): slope 0, below every random direction's drift
    assert by["p_stripes_from_spots"]["value"] == pytest.approx(0.0) and by["p_stripes_from_spots"]["verdict"] == "below baseline"
    off = by["p_stripes_from_stripes"]  # the vector leaves stripes alone, random directions move them
    assert off["value"] == pytest.approx(0.0) and off["higher_is_better"] is False and off["verdict"] == "above baseline"
    assert table.set_index("score").loc["p_stripes_from_stripes", "n_controls"] == 4
    # a slope well below every random direction's is 'below baseline'
    weak = _constructed_sweep({"p_stripes_physical_from_spots": {0.0: z, -0.6: z, 0.6: 0.05 * ones}},
                              [{"p_stripes_physical_from_spots": {0.0: z, -0.6: -s * ones, 0.6: s * ones}} for s in (0.5, 0.55, 0.6)])
    weak.roles = {"p_stripes_physical_from_spots": "target"}
    assert slope_rows(weak, "x")[0][0]["verdict"] == "below baseline"


def test_single_trajectory_features_and_the_rho_verdict() -> None:
    """A feature whose top windows all come from one trajectory is flagged; a correlation no stronger than
    the radial spectrum's reads 'no better than baseline'."""
    from sciscope.domains.physics.analyses import _rho_verdict, trajectory_spread

    top = pd.DataFrame({"feature": [0] * 4 + [1] * 4 + [2] * 4, "activation": [3, 2, 1, 1, 3, 2, 1, 1, 1, 0, 0, 0],
                        "trajectory": [5, 5, 5, 5, 1, 2, 2, 3, 9, 8, 7, 6]})
    spread = trajectory_spread(top).set_index("feature")
    assert spread.single_trajectory.tolist() == [True, False, False]  # feature 2 has one active top window only
    assert spread.loc[1, "n_trajectories"] == 3 and spread.loc[1, "top_trajectory"] == 2 and spread.loc[1, "top_share"] == 0.5
    assert _rho_verdict(0.95, 0.94, 96) == "no better than baseline"
    assert _rho_verdict(0.95, 0.5, 96) == "above baseline" and _rho_verdict(0.3, 0.9, 96) == "below baseline"
    assert _rho_verdict(0.9, float("nan"), 96) is None


# ----------------------------------------------------------------------------------------- feature cards


def test_within_regime_ranking_follows_a_parameter_inside_a_regime_not_the_regime() -> None:
    """A feature that tracks feed inside the stripes regime scores rho = 1 there; a pure regime detector
    (constant inside each regime) is not ranked at all, although across regimes it would follow feed."""
    from sciscope.domains.physics.cards import CARD_RANKING, within_regime_association

    rng = np.random.default_rng(0)
    n = 8  # trajectories per regime, 3 windows each
    feed = np.r_[np.linspace(0.05, 0.06, n), np.linspace(0.03, 0.04, n)]
    traj = np.repeat(np.arange(2 * n), 3)
    obs = pd.DataFrame({"trajectory": traj, "system": "gray_scott", "regime": np.where(traj < n, "stripes", "spots"),
                        "feed": feed[traj], "kill": 0.06 + 0.001 * rng.random(2 * n)[traj]})
    follows = np.where(traj < n, feed[traj], 0.0)  # follows feed among stripes, silent among spots
    detector = (traj < n).astype(float)
    acts = np.c_[follows + 1e-4 * rng.random(traj.size), detector, rng.random(traj.size)]
    out = within_regime_association(acts, obs)
    assert out.loc[0, "rho"] == pytest.approx(1.0) and out.loc[0, "of"] == "feed in gray_scott/stripes"
    assert out.loc[0, "n"] == n
    assert np.isnan(out.loc[1, "rho"]) and out.loc[1, "of"] == ""
    assert abs(out.loc[2, "rho"]) < 1.0
    # the card's evidence picture: the coloured points are the stripes trajectories, at their feed
    import matplotlib.pyplot as plt

    from sciscope.domains.physics.cards import _within_regime_figure

    fig, caption = _within_regime_figure(acts[:, 0], obs, 0)
    coloured = [c for c in fig.axes[0].collections if c.get_label().startswith("stripes")]
    assert len(coloured) == 1 and np.allclose(np.sort(coloured[0].get_offsets()[:, 0]), feed[:n])
    assert "ρ = 1.00 within stripes" in fig.axes[0].get_title() and f"{n} stripes trajectories" in caption
    plt.close(fig)
    assert _within_regime_figure(acts[:, 1], obs, 1) is None  # a regime detector: nothing to show
    # the adapter ranks cards by this statistic's rho column, and the features stage computes it
    ad = PhysicsAdapter(TINY)
    assert ad.card_ranking == CARD_RANKING == "within_regime_rho" and "within_regime" in ad.feature_statistics
    assert ad.lens_basis(None) is None and set(ad.card_columns) <= set(ad.windows.columns)


def test_patch_maps_follow_the_predictor_token_order(tiny) -> None:
    """Position 1 + patch * T + frame is patch (row-major) of frame: checked against the model's own
    split of its block output into patches and frames (the head reads ``[:, 1:].reshape(B, P, T, D)``)."""
    from sciscope.domains.physics.cards import patch_maps

    ad, _ = tiny
    T, side = ad.config["context_frames"], ad.config["grid"] // ad.config["patch_size"]
    value = np.arange(side * side * T, dtype=np.float64).reshape(side * side, T)  # value[patch, frame]
    frame = pd.DataFrame({"position": np.arange(1 + side * side * T), "activation": np.r_[7.0, value.ravel()]})
    maps, cls = patch_maps(frame, n_patches_side=side, context=T)
    assert cls == 7.0 and maps.shape == (T, side, side)
    for f in range(T):
        assert np.array_equal(maps[f], value[:, f].reshape(side, side))


def test_field_pictures_draw_each_window_and_its_patch_activation(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card pictures: one row per drawn window (top windows, then a q50 window for contrast), each a
    valid PNG; the activation maps drawn are the windows' patch activations, on one scale."""
    import matplotlib.pyplot as plt

    import sciscope.core.cards as core_cards
    from sciscope.domains.physics import cards

    ad, _ = tiny
    obs = ad.windows
    T, side = ad.config["context_frames"], ad.config["grid"] // ad.config["patch_size"]
    rows = [0, 1, len(obs) - 1]  # two gray_scott windows of one trajectory, one flow window
    examples = pd.concat([pd.DataFrame({"band": ["top", "top", "q50"], "rank": [1, 2, 1], "activation": [2.0, 1.5, 0.5],
                                        "row": rows}), obs.iloc[rows].reset_index(drop=True)], axis=1)

    def fake_positions(ctx, rows, feature):  # the feature fires on patch (1, 2) of the last frame only
        act = np.zeros((side * side, T))
        act[1 * side + 2, T - 1] = 3.0
        return {int(r): pd.DataFrame({"position": np.arange(1 + act.size), "activation": np.r_[0.0, act.ravel()]})
                for r in rows}

    monkeypatch.setattr(core_cards, "position_activations", fake_positions)
    panels = cards.render_field_windows(ad, None, 5, examples)
    assert [p.title for p in panels] == ["strongest windows", "contrast (q50)"]
    assert all(p.png.startswith(b"\x89PNG") and len(p.png) > 2000 for p in panels)
    # the figure itself: the activation image of every window is its patch map
    maps = {r: cards.patch_maps(f, n_patches_side=side, context=T) for r, f in fake_positions(None, rows, 5).items()}
    fields = {r: np.zeros((T, ad.config["grid"], ad.config["grid"])) for r in rows}
    fig = cards._draw(examples.iloc[:2], fields, maps, {"gray_scott": (0.0, 1.0)}, 3.0, ad.config["patch_size"], "t")
    act_images = [ax.images[0] for ax in fig.axes if ax.images and ax.images[0].get_cmap().name == "magma"]
    assert len(act_images) == 2 * T
    last = np.asarray(act_images[T - 1].get_array())
    assert last[1, 2] == 3.0 and last.sum() == 3.0 and act_images[T - 1].get_clim() == (0.0, 3.0)
    plt.close(fig)
    # a pooled SAE: fields only, said in the caption
    monkeypatch.setattr(core_cards, "position_activations", lambda ctx, rows, feature: {})
    pooled = cards.render_field_windows(ad, None, 5, examples)
    assert "pooled" in pooled[0].caption and pooled[0].png.startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------- tracing


def test_tracing_pairs_align_windows_of_two_regimes(tiny) -> None:
    from sciscope.domains.physics.tracing import window_pairs

    from .tracing_checks import check_pairs

    ad, model = tiny
    pairs = ad.tracing_pairs(ad.ctx)
    assert pairs is not None and "spots vs a stripes" in pairs.concept
    (clean,), (bad,) = pairs.clean, pairs.corrupted
    T, n_patches = ad.config["context_frames"], (TINY["grid"] // TINY["patch_size"]) ** 2
    m = check_pairs(model, pairs, n_positions=1 + n_patches * T)
    assert clean.shape == bad.shape == (m["B"], T, 2, TINY["grid"], TINY["grid"])
    # the same time in a spots and a stripes trajectory: every frame differs, none is shared
    windows = window_pairs(ad, m["B"])
    traj = ad.trajectories.table.set_index("trajectory")
    assert all(traj.loc[a, "regime"] == "spots" and traj.loc[b, "regime"] == "stripes" for a, b, _ in windows)
    assert (clean != bad).flatten(2).any(-1).all()
    g = pairs.position_groups
    assert g["class token"] == [0] and len(g["last frame's patches"]) == n_patches
    assert sorted(g["class token"] + g["last frame's patches"] + g["earlier frames' patches"]) == list(range(1 + n_patches * T))
    assert g["last frame's patches"][:2] == [T, 2 * T]  # patch-major, frame-minor: token 1 + p * T + (T - 1)
    with pytest.raises(ConfigError, match="trace_system"):
        PhysicsAdapter({**TINY, "systems": ["flow"], "trace_system": "gray_scott"})


def test_component_layouts_rebuild_the_block_output(tiny) -> None:
    """The spatial and temporal attention outputs, moved to the block outputs' layout, add up with the block's
    input and its MLP output to the block's output; and from_canonical inverts to_canonical."""
    from sciscope.core.components import block_components
    from sciscope.domains.physics.tracing import component_layouts, to_canonical

    ad, model = tiny
    comps = block_components(model, ad.component_templates)[0]
    assert set(comps.parts) == {"attn", "attn_time", "mlp"}
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[comps.resid].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))]
    hooks += [modules[comps.resid].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))]
    for name, site in comps.parts.items():
        hooks.append(modules[site].register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o)))
    x = next(iter(ad.batches(ad.examples("test"), model, batch_size=4)))[0]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    T = ad.config["context_frames"]
    assert seen["attn"].shape[0] == 4 * T and seen["attn_time"].shape[1] == seen["out"].shape[1] - 1
    rebuilt = seen["in"] + to_canonical("attn_time", seen["attn_time"], T) + to_canonical("attn", seen["attn"], T) + seen["mlp"]
    torch.testing.assert_close(rebuilt, seen["out"], atol=1e-5, rtol=1e-5)
    for name, (to, back) in component_layouts(T).items():
        canon = to(seen[name])
        torch.testing.assert_close(canon, to_canonical(name, seen[name], T))
        torch.testing.assert_close(to(back(canon)), canon)


def test_tracing_patches_the_attention_outputs_per_position_group(tiny) -> None:
    """With the pairs' component views, the spatial and temporal attention are traced at every
    position group (not only at all positions), and patching a view at every position does what
    patching the whole tensor does."""
    from sciscope.core.components import block_components
    from sciscope.core.tracing import trace

    ad, model = tiny
    pairs = ad.tracing_pairs(ad.ctx)
    n_pos = 1 + (TINY["grid"] // TINY["patch_size"]) ** 2 * ad.config["context_frames"]
    pairs.position_groups = {**pairs.position_groups, "every position": list(range(n_pos))}
    res = trace(model, pairs, block_components(model, ad.component_templates), progress=False)
    attn = res.table[res.table.component.isin(["attn", "attn_time"])]
    assert attn[["restore", "control", "zero_ablation", "mean_ablation"]].notna().all().all()
    t = res.table.set_index(["component", "group"])
    for comp in ("attn", "attn_time", "mlp"):
        np.testing.assert_allclose(t.loc[(comp, "every position"), "restore"], t.loc[(comp, "all"), "restore"], atol=1e-4)
